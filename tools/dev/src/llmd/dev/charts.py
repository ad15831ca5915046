"""Render, lint and validate llmd's Helm charts offline (no cluster, no helm binary).

Helm itself renders and lints (Helm v4's Go SDK through `helm_python`). Every rendered manifest
is then validated: built-in kinds against the Kubernetes OpenAPI schemas of a pinned version
(`kubernetes_validate`, strict: an unknown field is an error), custom kinds against their CRD's
own schema (the charts' `crds/`) or, for other projects' kinds the charts write (Gateway API
Inference Extension's InferencePool, the Prometheus Operator's ServiceMonitor), against schemas
of the fields llmd writes (`schemas/`).

`llmd-dev charts` runs all of it over every chart and every well-lit path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version manifests are validated against."""

SCHEMAS = Path(__file__).parent / "schemas"
COMPONENTS = (
    "llmd-scheduler",
    "llmd-model-server",
    "llmd-sim",
    "llmd-indexer",
    "llmd-autoscaler",
    "llmd-activator",
    "llmd-fs-evictor",
)
UMBRELLA = "llmd"
# what a chart needs to render at all (a required value without a safe default)
REQUIRED_VALUES: Mapping[str, dict[str, Any]] = {
    "llmd-model-server": {"global": {"modelName": "example/model"}},
    "llmd-activator": {"deployment": "example-engines"},
    "llmd-fs-evictor": {"claimName": "example-kv", "global": {"modelName": "example/model"}},
}

log = logging.getLogger(__name__)


class ChartError(Exception):
    """A chart that does not render, lint or validate; the message says where and why."""


def charts_dir() -> Path:
    """The repository's charts/ (this module lives in tools/dev/src/llmd/dev)."""
    return Path(__file__).resolve().parents[5] / "charts"


def _helm() -> Any:
    import helm_python

    # Helm logs each symlinked subchart at INFO; forward only its warnings, into our logging
    helm_python.enable_logging(logging.WARNING, logging.getLogger("llmd.dev.helm"))
    return helm_python


@contextlib.contextmanager
def _helm_stderr() -> Iterator[None]:
    """Helm's Go loader prints a line on stderr for every symlinked subchart (the charts link
    their dependencies); keep those out of the output and pass anything else on as a warning."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip() and "found symbolic link in path" not in line:
                    log.warning("helm: %s", line)


def render(
    chart: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "demo",
    namespace: str = "llm",
) -> list[dict[str, Any]]:
    """The chart's manifests for these values, as parsed documents (empty ones dropped).

    The chart is loaded afresh for every render: Helm drops disabled subcharts from a loaded
    chart in place, so a loaded chart is not reusable across values."""
    helm = _helm()
    try:
        with _helm_stderr(), helm.Chart.load(chart) as loaded:
            crds = [yaml.safe_load(c["data"]) for c in loaded.crds]
            out = loaded.render(dict(values or {}), name=release, namespace=namespace)
    except helm.HelmError as exc:
        raise ChartError(f"{chart.name}: {str(exc).strip()}") from None
    docs: list[dict[str, Any]] = [d for d in crds if d]
    for path in sorted(out):
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"]["llmd.dev/source"] = path
                docs.append(doc)
    return docs


def lint(chart: Path, values: Mapping[str, Any] | None = None) -> list[str]:
    """Helm lint (strict: warnings count) with subcharts; the findings, empty when clean."""
    with _helm_stderr():
        report = _helm().lint(
            chart,
            dict(values or {}),
            strict=True,
            with_subcharts=True,
            kube_version=f"v{KUBERNETES_VERSION}",
        )
    found = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return found + [str(e) for e in report["errors"]]


@dataclass
class Validator:
    """Validates manifests; custom kinds by the CRDs it has seen and the bundled schemas."""

    version: str = KUBERNETES_VERSION
    custom: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for path in sorted(SCHEMAS.glob("*.json")):
            kind_group, version = path.stem.rsplit("_", 1)
            _kind, group = kind_group.split(".", 1)
            schema = json.loads(path.read_text())
            self.custom[(f"{group}/{version}", schema["properties"]["kind"]["const"])] = schema

    def learn_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd["spec"]
        for v in spec["versions"]:
            schema = v["schema"]["openAPIV3Schema"]
            self.custom[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = schema

    def validate(self, doc: Mapping[str, Any]) -> None:
        import kubernetes_validate

        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        source = ((doc.get("metadata") or {}).get("annotations") or {}).get("llmd.dev/source")
        if source:
            where = f"{source}: {where}"
        key = (str(doc.get("apiVersion")), str(doc.get("kind")))
        if doc.get("kind") == "CustomResourceDefinition":
            self.learn_crd(doc)
        if key in self.custom:
            try:
                jsonschema.validate(dict(doc), _openapi_to_jsonschema(self.custom[key]))
            except jsonschema.ValidationError as exc:
                path = ".".join(str(p) for p in exc.absolute_path) or "(document)"
                raise ChartError(f"{where}: {path}: {exc.message}") from None
            return
        try:
            kubernetes_validate.validate(dict(doc), self.version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise ChartError(f"{where}: no schema for {key[0]} {key[1]}") from None
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(document)"
            raise ChartError(f"{where}: {path}: {exc.message}") from None


def _openapi_to_jsonschema(schema: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema (drop the x-kubernetes-* keys)."""
    if isinstance(schema, Mapping):
        return {
            k: _openapi_to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kube")
        }
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(v) for v in schema]
    return schema


def validate_all(docs: list[dict[str, Any]], validator: Validator | None = None) -> None:
    """Validate every manifest (CRDs first, so that their objects are checked by them)."""
    v = validator or Validator()
    for doc in sorted(docs, key=lambda d: d.get("kind") != "CustomResourceDefinition"):
        v.validate(doc)


def path_values(root: Path | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each well-lit path's values (charts/paths/<path>/values.yaml) by name."""
    base = (root or charts_dir()) / "paths"
    for d in sorted(p for p in base.iterdir() if (p / "values.yaml").is_file()):
        yield d.name, yaml.safe_load((d / "values.yaml").read_text()) or {}


def check_all(root: Path | None = None) -> list[str]:
    """Lint, render and validate every component chart (defaults) and the umbrella chart with
    every path's values. Returns one line per problem, empty when all is well."""
    base = root or charts_dir()
    problems: list[str] = []
    cases: list[tuple[str, Path, dict[str, Any]]] = [
        (name, base / name, REQUIRED_VALUES.get(name, {})) for name in COMPONENTS
    ]
    cases.append((UMBRELLA, base / UMBRELLA, {}))
    cases += [(f"{UMBRELLA} + paths/{p}", base / UMBRELLA, v) for p, v in path_values(base)]
    for label, chart, values in cases:
        problems += [f"{label}: lint: {m}" for m in lint(chart, values)]
        try:
            docs = render(chart, values)
            validate_all(docs)
        except ChartError as exc:
            problems.append(f"{label}: {exc}")
            continue
        log.info("%s: %d manifests valid", label, len(docs))
    return problems
