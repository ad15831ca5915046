"""InferenceObjectives from a file: the priority behind llm-d's objective header.

A request naming an objective (`x-llm-d-inference-objective`, or the `x-gateway-` alias) gets
that objective's `spec.priority`; an unknown objective, or none, is priority 0, as in llm-d.
In a cluster the same documents are llm-d's `InferenceObjective` resources; without an API
server they come from a YAML file of such documents (`--inference-objectives-file`):

    apiVersion: llm-d.ai/v1alpha2
    kind: InferenceObjective
    metadata: {name: premium}
    spec: {priority: 10, poolRef: {name: my-pool}}

The priority labels the request metrics (`priority`) and orders flow control's bands.

With `--inference-objectives-source kubernetes` they are the `inferenceobjectives` of the pool's
namespace, listed through the official client every `OBJECTIVES_REFRESH_S`: llm-d's group
`llm-d.ai/v1alpha2`, or the older `inference.networking.x-k8s.io/v1alpha2` when the newer one is
not installed (llm-d's rule). Objectives whose `spec.poolRef.name` names another pool are
ignored; an object that does not parse is skipped and logged, the others still apply; when the
API server cannot be read the last good set stays in force.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from llmd.runtime.cluster import ClusterError, kube_call
from llmd.runtime.config import ConfigError, ConfigIssue

log = logging.getLogger(__name__)

MAX_OBJECTIVES = 10_000
KINDS = ("InferenceObjective",)
API_GROUPS = ("llm-d.ai/", "inference.networking.x-k8s.io/")
KUBE_GROUPS = (("llm-d.ai", "v1alpha2"), ("inference.networking.x-k8s.io", "v1alpha2"))
PLURAL = "inferenceobjectives"
OBJECTIVES_REFRESH_S = 10.0


def parse_objectives(text: str, origin: str = "objectives") -> dict[str, int]:
    """name -> priority from a multi-document YAML text; ConfigError lists every problem."""
    issues: list[ConfigIssue] = []
    out: dict[str, int] = {}
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"not YAML: {exc}")], origin) from None
    for i, doc in enumerate(docs):
        where = f"document {i + 1}"
        if not isinstance(doc, dict):
            issues.append(ConfigIssue(where, "not a mapping"))
            continue
        items: list[Any] = doc["items"] if doc.get("kind") == "List" else [doc]
        for item in items:
            _one(item, where, out, issues)
    if len(out) > MAX_OBJECTIVES:
        issues.append(ConfigIssue("", f"{len(out)} objectives, over {MAX_OBJECTIVES}"))
    if issues:
        raise ConfigError(issues, origin)
    return out


def _one(doc: Any, where: str, out: dict[str, int], issues: list[ConfigIssue]) -> None:
    if not isinstance(doc, dict):
        issues.append(ConfigIssue(where, "not a mapping"))
        return
    api, kind = str(doc.get("apiVersion", "")), doc.get("kind")
    if kind not in KINDS or not api.startswith(API_GROUPS):
        issues.append(
            ConfigIssue(
                where, f"expected an InferenceObjective, got {kind!r} ({api or 'no apiVersion'})"
            )
        )
        return
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") if meta else None
    if not isinstance(name, str) or not name:
        issues.append(ConfigIssue(f"{where}.metadata.name", "required"))
        return
    spec = doc.get("spec") or {}
    priority = spec.get("priority", 0) if isinstance(spec, dict) else None
    if priority is None:
        priority = 0
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not -(2**31) <= priority < 2**31
    ):
        issues.append(ConfigIssue(f"{where}.spec.priority", "must be a 32-bit integer"))
        return
    if name in out:
        issues.append(ConfigIssue(f"{where}.metadata.name", f"objective {name!r} given twice"))
        return
    out[name] = priority


def load_objectives(path: str | Path) -> dict[str, int]:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc}")]) from None
    return parse_objectives(text, f"inference objectives {p}")


class KubeObjectives:
    """The InferenceObjectives of one namespace that apply to one pool, from the API server."""

    def __init__(self, custom_api: Any, namespace: str, pool_name: str) -> None:
        self.api = custom_api
        self.namespace = namespace
        self.pool_name = pool_name

    async def list(self) -> tuple[dict[str, int], list[str]]:
        """(name -> priority, one message per object skipped). ClusterError when neither API
        group can be read."""
        doc: Any = None
        for group, version in KUBE_GROUPS:
            try:
                doc = await kube_call(
                    f"listing {PLURAL}.{group} in {self.namespace}",
                    self.api.list_namespaced_custom_object,
                    group, version, self.namespace, PLURAL,
                )  # fmt: skip
                break
            except ClusterError as exc:
                if exc.status != 404:
                    raise
        if doc is None:
            raise ClusterError(
                f"no InferenceObjective API installed ({', '.join(g for g, _ in KUBE_GROUPS)})",
                404,
            )
        out: dict[str, int] = {}
        problems: list[str] = []
        for item in doc.get("items", []) if isinstance(doc, dict) else []:
            meta = item.get("metadata", {}) if isinstance(item, dict) else {}
            where = f"{meta.get('namespace', self.namespace)}/{meta.get('name', '?')}"
            spec = item.get("spec") if isinstance(item, dict) else None
            pool = (spec or {}).get("poolRef") if isinstance(spec, dict) else None
            if isinstance(pool, dict) and pool.get("name") not in (None, self.pool_name):
                continue  # another pool's objective
            issues: list[ConfigIssue] = []
            _one(item, where, out, issues)
            problems += [str(i) for i in issues]
        return out, problems
