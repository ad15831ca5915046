"""Variants: one model served by several Deployments (accelerator, parallelism, cost).

Declared as `VariantAutoscaling` objects in WVA's shape (`llmd.ai/v1alpha1`), as YAML documents
in a file locally or as custom objects in a cluster:

    apiVersion: llmd.ai/v1alpha1
    kind: VariantAutoscaling
    metadata:
      name: llama-8b-h100
      namespace: llm
      labels: {inference.optimization/acceleratorName: H100}
    spec:
      scaleTargetRef: {kind: Deployment, name: llama-8b-h100-decode}
      modelID: meta-llama/Llama-3.1-8B
      variantCost: "10.0"
      minReplicas: 1
      maxReplicas: 10

`scaleTargetRef.name` is the pool the autoscaler scales (a Deployment in Kubernetes, a pool of
the local process pool). Replicas of a variant are found by the pod label `llm-d.ai/variant`
(WVA's label) unless the annotation `llmd.ai/pod-selector` gives another selector. Fields of
WVA's older model-based CRD (`modelProfile`, `sloClassRef`) are accepted; of them only
`modelProfile.accelerators[].maxBatchSize` is used (a replica's batch limit, which the engines
do not export): the saturation analyzer needs no performance profile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmd.runtime.config import ConfigError, ConfigIssue, YamlSyntaxError, parse_duration

API_VERSIONS = frozenset({"llmd.ai/v1alpha1", "llm-d.ai/v1alpha1"})
KIND = "VariantAutoscaling"
ACCELERATOR_LABEL = "inference.optimization/acceleratorName"
VARIANT_LABEL = "llm-d.ai/variant"
SELECTOR_ANNOTATION = "llmd.ai/pod-selector"
RETENTION_ANNOTATION = "llmd.ai/scale-to-zero-retention"
MAX_VARIANTS = 256
IGNORED_SPEC = frozenset({"modelProfile", "sloClassRef", "variantID", "variantProfile"})
KNOWN_SPEC = frozenset(
    {"scaleTargetRef", "modelID", "variantCost", "minReplicas", "maxReplicas", "accelerator",
     "acceleratorCount"}
) | IGNORED_SPEC  # fmt: skip


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of serving a model, and its scaling bounds."""

    name: str
    namespace: str
    model_id: str
    target: str
    """The pool (Deployment) whose replicas this variant scales."""
    cost: float
    """Cost of one replica (WVA's `variantCost`; relative units)."""
    min_replicas: int
    max_replicas: int
    accelerator: str = ""
    selector: str = ""
    retention_s: float | None = None
    """Idle time before scale-to-zero (None: the autoscaler's default)."""
    max_batch: int | None = None
    """Requests one replica runs at once (`modelProfile.accelerators[].maxBatchSize`, vLLM's
    `--max-num-seqs`), when declared; otherwise learned from the engines."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _issue(where: str, msg: str) -> ConfigIssue:
    return ConfigIssue(where, msg)


def parse_variant(doc: Any, where: str) -> Variant:
    """One VariantAutoscaling object; ConfigError naming the field otherwise."""
    if not isinstance(doc, Mapping):
        raise ConfigError([_issue(where, "a VariantAutoscaling must be a mapping")], "variants")
    issues: list[ConfigIssue] = []
    if doc.get("apiVersion") not in API_VERSIONS:
        issues.append(
            _issue(
                f"{where}.apiVersion",
                f"expected one of {sorted(API_VERSIONS)}, got {doc.get('apiVersion')!r}",
            )
        )
    if doc.get("kind") != KIND:
        issues.append(_issue(f"{where}.kind", f"expected {KIND}, got {doc.get('kind')!r}"))
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        issues.append(_issue(where, "metadata and spec must be mappings"))
        raise ConfigError(issues, "variants")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        issues.append(_issue(f"{where}.metadata.name", "required"))
    unknown = sorted(set(spec) - KNOWN_SPEC)
    if unknown:
        issues.append(_issue(f"{where}.spec", f"unknown field(s) {unknown}"))
    model = spec.get("modelID")
    if not isinstance(model, str) or not model:
        issues.append(_issue(f"{where}.spec.modelID", "required, a non-empty string"))
    ref = spec.get("scaleTargetRef") or {}
    target = ref.get("name", name) if isinstance(ref, Mapping) else None
    if not isinstance(target, str) or not target:
        issues.append(_issue(f"{where}.spec.scaleTargetRef.name", "must be a non-empty string"))
    kinds = {"Deployment", "StatefulSet", "LeaderWorkerSet"}
    if isinstance(ref, Mapping) and ref.get("kind", "Deployment") not in kinds:
        issues.append(_issue(f"{where}.spec.scaleTargetRef.kind", f"unsupported {ref['kind']!r}"))
    try:
        cost = float(spec.get("variantCost", "10"))
        if not cost >= 0 or cost == float("inf"):
            raise ValueError(cost)
    except (TypeError, ValueError):
        issues.append(_issue(f"{where}.spec.variantCost", "must be a non-negative number"))
        cost = 0.0
    lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas", 10)
    if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0:
        issues.append(_issue(f"{where}.spec.minReplicas", "must be an integer >= 0"))
        lo = 0
    if not isinstance(hi, int) or isinstance(hi, bool) or hi < 1:
        issues.append(_issue(f"{where}.spec.maxReplicas", "must be an integer >= 1"))
        hi = 1
    if lo > hi:
        issues.append(_issue(f"{where}.spec", f"minReplicas {lo} > maxReplicas {hi}"))
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    retention: float | None = None
    if RETENTION_ANNOTATION in annotations:
        try:
            retention = parse_duration(str(annotations[RETENTION_ANNOTATION]))
        except ValueError as exc:
            issues.append(_issue(f"{where}.metadata.annotations.{RETENTION_ANNOTATION}", str(exc)))
    if issues:
        raise ConfigError(issues, "variants")
    assert isinstance(name, str)
    assert isinstance(model, str)
    assert isinstance(target, str)
    accelerator = str(spec.get("accelerator") or labels.get(ACCELERATOR_LABEL, ""))
    max_batch = _max_batch(spec, accelerator)
    return Variant(
        name=name,
        namespace=str(meta.get("namespace") or "default"),
        model_id=model,
        target=target,
        cost=cost,
        min_replicas=lo,
        max_replicas=hi,
        accelerator=accelerator,
        selector=str(annotations.get(SELECTOR_ANNOTATION) or f"{VARIANT_LABEL}={name}"),
        retention_s=retention,
        max_batch=max_batch,
    )


def _max_batch(spec: Mapping[str, Any], accelerator: str) -> int | None:
    """`maxBatchSize` of the profile for this accelerator (else the first profile's)."""
    profile = spec.get("modelProfile")
    accs = profile.get("accelerators") if isinstance(profile, Mapping) else None
    if not isinstance(accs, list):
        return None
    entries = [a for a in accs if isinstance(a, Mapping)]
    chosen = next((a for a in entries if a.get("acc") == accelerator), None)
    if chosen is None and entries:
        chosen = entries[0]
    size = chosen.get("maxBatchSize") if chosen is not None else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def parse_variants(docs: Iterable[Any], origin: str = "variants") -> list[Variant]:
    """Every VariantAutoscaling in `docs` (a `kind: List` is unwrapped); names and targets
    must be unique."""
    out: list[Variant] = []
    issues: list[ConfigIssue] = []
    flat: list[Any] = []
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            flat.extend(doc.get("items") or [])
        else:
            flat.append(doc)
    for i, doc in enumerate(flat):
        try:
            out.append(parse_variant(doc, f"[{i}]"))
        except ConfigError as exc:
            issues.extend(exc.issues)
    if len(out) > MAX_VARIANTS:
        issues.append(_issue("", f"{len(out)} variants, at most {MAX_VARIANTS}"))
    seen: dict[str, str] = {}
    for v in out:
        for what, key in (("name", v.key), ("target", f"{v.namespace}/{v.target}")):
            tag = f"{what}:{key}"
            if tag in seen:
                issues.append(_issue(v.name, f"duplicate {what} {key} (also {seen[tag]})"))
            seen[tag] = v.name
    if issues:
        raise ConfigError(issues, origin)
    if not out:
        raise ConfigError([_issue("", "no VariantAutoscaling objects")], origin)
    return out


def load_variants(path: str | Path) -> list[Variant]:
    """The variants in a YAML file (one or more documents)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([_issue("", f"cannot read {p}: {exc}")], f"variants {p}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError([_issue("", f"{p} is not valid YAML: {exc}")], f"variants {p}") from None
    except RecursionError:
        raise ConfigError([_issue("", str(YamlSyntaxError("nested too deeply")))]) from None
    return parse_variants(docs, f"variants {p}")


def by_model(variants: Iterable[Variant]) -> dict[str, list[Variant]]:
    """Variants grouped by the model they serve (cheapest first within a model)."""
    out: dict[str, list[Variant]] = {}
    for v in variants:
        out.setdefault(v.model_id, []).append(v)
    for vs in out.values():
        vs.sort(key=lambda v: (v.cost, v.name))
    return out
