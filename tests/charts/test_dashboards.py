"""The Grafana dashboards query only metric names (and labels) the services export.

A dashboard that names a metric nobody exports shows an empty panel forever; llm-d renamed its
metric prefixes three times and its dashboards drifted. Here every expression is checked
against the registries of the real services, built as they are in production."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmd.activator.app import ActivatorConfig
from llmd.activator.app import build as build_activator
from llmd.autoscaler.app import AutoscalerConfig
from llmd.autoscaler.app import build as build_autoscaler
from llmd.dev.charts import charts_dir, render
from llmd.fs_offload.evictor_service import EvictorConfig
from llmd.fs_offload.evictor_service import build as build_evictor
from llmd.fs_offload.metrics import exported_samples as fs_offload_samples
from llmd.indexer.app import IndexerConfig
from llmd.indexer.app import build as build_indexer
from llmd.scheduler.app import SchedulerConfig
from llmd.scheduler.app import build as build_scheduler
from llmd.sidecar.app import SidecarConfig
from llmd.sidecar.app import build as build_sidecar
from llmd.sim.tokenizer import default_tokenizer_dir

DASHBOARDS = sorted((charts_dir() / "llmd" / "dashboards").glob("*.json"))
OURS = re.compile(r"\b((?:llm_d_|llmd_|kvcache_|wva_)[a-zA-Z0-9_]+)\b")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "info": ("_info",),
}


PRECISE_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters: {{tokenizer: {{modelDir: "{tokenizer}"}}}}
- type: prefix-cache-scorer
"""

PD_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, frozenset[str] | None]:
    """Every sample name the services export, with its label names (None: unknown); the FS
    tier's, which vLLM exports, from its definitions."""
    d = tmp_path_factory.mktemp("services")
    (d / "endpoints.yaml").write_text("endpoints: []\n")
    (d / "variants.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmd.ai/v1alpha1",
                "kind": "VariantAutoscaling",
                "metadata": {"name": "v"},
                "spec": {"modelID": "m", "scaleTargetRef": {"name": "p"}},
            }
        )
    )
    apps: list[Any] = [
        build_scheduler(SchedulerConfig(endpoints_file=str(d / "endpoints.yaml"))),
        build_scheduler(  # the precise producer's families (the storage tier's weight)
            SchedulerConfig(
                endpoints_file=str(d / "endpoints.yaml"),
                config_text=PRECISE_CONFIG.format(tokenizer=default_tokenizer_dir()),
            )
        ),
        build_scheduler(  # the P/D handler's decision counters
            SchedulerConfig(endpoints_file=str(d / "endpoints.yaml"), config_text=PD_CONFIG)
        ),
        build_sidecar(SidecarConfig()),
        build_indexer(
            IndexerConfig(endpoints_file=str(d / "endpoints.yaml"), render_url="http://127.0.0.1:9")
        ),
        build_autoscaler(AutoscalerConfig(variants_file=str(d / "variants.yaml"))),
        build_activator(ActivatorConfig(pool="p")),
        build_evictor(EvictorConfig(root=str(d))),
    ]
    names: dict[str, frozenset[str] | None] = dict(fs_offload_samples())
    for app in apps:
        labels_of = {
            n: getattr(c, "_labelnames", None)
            for c, ns in app.registry._collector_to_names.items()
            for n in ns
        }
        for family in app.registry.collect():
            labels = labels_of.get(family.name)
            for suffix in SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = frozenset(labels) if labels is not None else None
    return names


def expressions(doc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for panel in doc["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"], target.get("legendFormat", "")


def test_there_is_a_dashboard_per_service_area() -> None:
    assert [p.stem for p in DASHBOARDS] == [
        "autoscaling",
        "fs-offload",
        "indexer",
        "pd",
        "scheduler",
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_uses_exported_metrics_and_labels(
    path: Path, exported: dict[str, frozenset[str] | None]
) -> None:
    doc = json.loads(path.read_text())
    assert doc["uid"] == f"llmd-{path.stem}"
    assert doc["panels"]
    for title, expr, legend in expressions(doc):
        metrics = OURS.findall(expr)
        assert metrics, f"{title}: {expr} queries no llmd metric"
        unknown = [m for m in metrics if m not in exported]
        assert not unknown, f"{title}: {unknown} are not exported"
        known = [exported[m] for m in metrics]
        if any(k is None for k in known):
            continue
        allowed = frozenset({"le"}).union(*[k for k in known if k is not None])
        used = {
            lbl.strip() for group in BY.findall(expr) for lbl in group.split(",") if lbl.strip()
        }
        used |= set(LEGEND.findall(legend))
        assert used <= allowed, f"{title}: labels {sorted(used - allowed)} not on {metrics}"


def test_the_umbrella_chart_ships_them_for_grafanas_sidecar() -> None:
    docs = render(charts_dir() / "llmd", {"dashboards": {"enabled": True}})
    maps = [d for d in docs if d["metadata"]["name"].startswith("demo-dashboard-")]
    assert len(maps) == len(DASHBOARDS)
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        (body,) = m["data"].values()
        assert json.loads(body)["panels"]
    assert not [
        d for d in render(charts_dir() / "llmd") if d["metadata"]["name"].startswith("demo-dash")
    ]
