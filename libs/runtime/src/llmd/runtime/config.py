"""Typed service configuration: pydantic models loaded from YAML, with environment overrides.

Precedence (lowest first): model defaults, the YAML file, environment variables
`<PREFIX><FIELD>__<SUBFIELD>=value`, then explicit overrides (a service's command-line flags).
Values from variables and flags are strings: a string field takes them as they are, any other
field reads them as YAML (so `3`, `true`, `[a, b]` work). Every invalid field is reported at
once with its dotted path and where it came from (file, variable or flag).

`Seconds` is the one duration type: `50ms`, `1.5s`, `2m`, `1h` or a plain number of seconds.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)

MAX_CONFIG_BYTES = 4 * 1024 * 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds from `50ms`, `1s`, `2m`, `1h` or a number of seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (e.g. 50ms, 1s, 2m)")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    m = _DURATION.match(str(value))
    if m is None:
        raise ValueError(f"{value!r} is not a duration (e.g. 50ms, 1s, 2m)")
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    return float(m.group(1)) * unit


def to_seconds(value: Any) -> Any:
    """The validator behind `Seconds` (durations as text or numbers to float seconds)."""
    return parse_duration(value) if isinstance(value, str | int | float) else value


Seconds = Annotated[float, BeforeValidator(to_seconds)]
"""A duration in seconds, written as `50ms`, `1s`, `2m`, `1h` or a number."""


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


def read_config_text(path: Path, field: str = "") -> str:
    """The text of a config file named by `field`; ConfigError when it cannot be read, is over
    `MAX_CONFIG_BYTES` or is not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [ConfigIssue(field, f"{path} is {size} bytes, over {MAX_CONFIG_BYTES}")]
            )
        return path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue(field, f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(field, f"{path} is not UTF-8 text")]) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml_mapping(read_config_text(path), str(path))


class YamlSyntaxError(ValueError):
    """Text that is not YAML llmd can read (syntax, or nesting past the parser's limit)."""


def load_yaml(text: str) -> Any:
    """The one YAML reader for text from outside: YamlSyntaxError (with the position when
    known) is the only error it raises."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlSyntaxError(f"not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise YamlSyntaxError("not valid YAML: nested too deeply") from None


def yaml_mapping(text: str, name: str, origin: str = "configuration") -> dict[str, Any]:
    """The YAML mapping in `text` ({} when empty); ConfigError says where it is malformed."""
    try:
        data = load_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue("", f"{name} is {exc}")], origin) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"{name} must hold a mapping, got {type(data).__name__}")], origin
        )
    return data


def takes_text(annotation: Any) -> bool:
    """True when a field of this type takes a raw string as it is (str, str | None, Literal)."""
    origin = typing.get_origin(annotation)
    if annotation is str:
        return True
    if origin is typing.Annotated:
        return takes_text(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(takes_text(a) for a in args)
    return False


def _scalar(annotation: Any) -> bool:
    """A field pydantic reads from text itself (numbers, booleans): no YAML, so `0123` is 123,
    not YAML 1.1's octal 83."""
    origin = typing.get_origin(annotation)
    if annotation in (int, float, bool):
        return True
    if origin is typing.Annotated:
        return _scalar(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_scalar(a) or takes_text(a) for a in args)
    return False


def text_value(raw: str, annotation: Any) -> Any:
    """A value given as text (a variable, a flag) for a field of type `annotation`: text and
    scalar fields get the text itself; lists, mappings and unknown fields read it as YAML."""
    if takes_text(annotation) or _scalar(annotation) or not raw.strip():
        return raw
    try:
        return load_yaml(raw)
    except YamlSyntaxError:
        return raw


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    """The annotation at a dotted path of lower-cased names/aliases (None when unknown)."""
    current: Any = model
    for part in parts:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        target = _alias_map(current).get(part)
        info = current.model_fields.get(target or "") or next(
            (f for f in current.model_fields.values() if f.alias == target), None
        )
        if info is None:
            return None
        current = info.annotation
    return current


def _env_overrides(
    env: Mapping[str, str], prefix: str, model: type[BaseModel] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested overrides from `PREFIX` variables and a map of dotted path → variable name."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var, raw in env.items():
        if not var.startswith(prefix) or len(var) == len(prefix):
            continue
        parts = [p.lower() for p in var[len(prefix) :].split("__")]
        annotation = _field_annotation(model, parts) if model is not None else None
        value = text_value(raw, annotation)
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
    override_sources: Mapping[str, str] | None = None,
) -> T:
    """Build a validated `model` from defaults, a YAML file, env variables and overrides.

    `override_sources` names where each override came from (dotted path → `--flag`)."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    sources: dict[str, str] = {}
    if env_prefix:
        tree, sources = _env_overrides(os.environ if env is None else env, env_prefix, model)
        data = _merge(data, _restore_keys(tree, model))
    if overrides:
        data = _merge(data, overrides)
        sources.update({k.lower(): v for k, v in (override_sources or {}).items()})
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
