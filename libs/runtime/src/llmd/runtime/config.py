"""Typed service configuration: pydantic models loaded from YAML, with environment overrides.

Precedence (lowest first): model defaults, the YAML file, environment variables
`<PREFIX><FIELD>__<SUBFIELD>=value` (values parsed as YAML scalars, so `3`, `true`, `[a, b]`
work), then explicit overrides. Every invalid field is reported at once with its dotted path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)

MAX_CONFIG_BYTES = 4 * 1024 * 1024


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (dotted path, `source` telling file/env) and what."""

    path: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.path}" if self.path else "(root)"
        return f"{where}: {self.message}" + (f" [{self.source}]" if self.source else "")


class ConfigError(ValueError):
    """A configuration that cannot be used; `issues` lists every problem."""

    def __init__(self, issues: list[ConfigIssue], origin: str = "configuration") -> None:
        self.issues = issues
        lines = "\n".join(f"  - {i}" for i in issues)
        super().__init__(f"invalid {origin} ({len(issues)} problem(s)):\n{lines}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"{path} is {size} bytes, over {MAX_CONFIG_BYTES}")])
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", f"{path} is not UTF-8 text")]) from None
    return yaml_mapping(text, str(path))


def yaml_mapping(text: str, name: str, origin: str = "configuration") -> dict[str, Any]:
    """The YAML mapping in `text` ({} when empty); ConfigError says where it is malformed."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("", f"{name} is not valid YAML{where}: {problem}")], origin
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"{name} must hold a mapping, got {type(data).__name__}")], origin
        )
    return data


def _env_overrides(env: Mapping[str, str], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested overrides from `PREFIX` variables and a map of dotted path → variable name."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var, raw in env.items():
        if not var.startswith(prefix) or len(var) == len(prefix):
            continue
        parts = [p.lower() for p in var[len(prefix) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        sources[".".join(parts)] = var
    return tree, sources


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _alias_map(model: type[BaseModel]) -> dict[str, str]:
    """Lower-cased field name / alias → the key the model expects (for env var names)."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        out[name.lower()] = info.alias or name
        if info.alias:
            out[info.alias.lower()] = info.alias
    return out


def _restore_keys(tree: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Env var names are case-insensitive; map them back onto the model's field names."""
    names = _alias_map(model)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        target = names.get(key, key)
        info = model.model_fields.get(target) or next(
            (f for f in model.model_fields.values() if f.alias == target), None
        )
        sub = getattr(info, "annotation", None) if info else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            value = _restore_keys(value, sub)
        out[target] = value
    return out


def load_config(
    model: type[T],
    path: str | Path | None = None,
    *,
    env_prefix: str | None = "LLMD_",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build a validated `model` from defaults, a YAML file, env variables and overrides."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    sources: dict[str, str] = {}
    if env_prefix:
        tree, sources = _env_overrides(os.environ if env is None else env, env_prefix)
        data = _merge(data, _restore_keys(tree, model))
    if overrides:
        data = _merge(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            source = sources.get(dotted.lower(), str(path) if path is not None else "")
            issues.append(ConfigIssue(dotted, err["msg"], source))
        origin = f"configuration {path}" if path is not None else "configuration"
        raise ConfigError(issues, origin) from None
