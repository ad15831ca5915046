from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmd.autoscaler.variants import by_model, load_variants, parse_variant, parse_variants
from llmd.runtime.config import ConfigError

# the shape llm-d-benchmark's WVA v0.6/v0.7 template renders
WVA_V07 = """
apiVersion: llmd.ai/v1alpha1
kind: VariantAutoscaling
metadata:
  name: llama-8b-decode
  namespace: llm-d-sim
  labels:
    inference.optimization/acceleratorName: H100
    llm-d.ai/model: llama-8b
    wva.llmd.ai/controller-instance: llm-d-sim
spec:
  scaleTargetRef: {kind: Deployment, name: llama-8b-decode}
  modelID: meta-llama/Llama-3.1-8B
  variantCost: "10.0"
  minReplicas: 1
  maxReplicas: 10
"""


def va(name: str, **spec: Any) -> dict[str, Any]:
    body = {"modelID": "m", "scaleTargetRef": {"kind": "Deployment", "name": name}} | spec
    return {
        "apiVersion": "llmd.ai/v1alpha1",
        "kind": "VariantAutoscaling",
        "metadata": {"name": name, "namespace": "llm"},
        "spec": body,
    }


def test_wva_template_loads_with_its_fields() -> None:
    v = parse_variant(yaml.safe_load(WVA_V07), "[0]")
    assert (v.name, v.namespace, v.model_id, v.target) == (
        "llama-8b-decode", "llm-d-sim", "meta-llama/Llama-3.1-8B", "llama-8b-decode"
    )  # fmt: skip
    assert (v.cost, v.min_replicas, v.max_replicas, v.accelerator) == (10.0, 1, 10, "H100")
    assert v.selector == "llm-d.ai/variant=llama-8b-decode"
    assert v.retention_s is None


def test_defaults_and_the_older_model_based_fields() -> None:
    doc = va("a", modelProfile={"accelerators": [{"acc": "A100", "accCount": 1}]},
             sloClassRef={"name": "premium", "key": "opt-125m"})  # fmt: skip
    del doc["spec"]["scaleTargetRef"]
    doc["metadata"]["annotations"] = {
        "llmd.ai/pod-selector": "app=a",
        "llmd.ai/scale-to-zero-retention": "90s",
    }
    v = parse_variant(doc, "[0]")
    assert (v.target, v.cost, v.min_replicas, v.max_replicas) == ("a", 10.0, 1, 10)
    assert (v.selector, v.retention_s) == ("app=a", 90.0)
    assert v.max_batch is None  # no maxBatchSize declared
    profiles = {"accelerators": [{"acc": "A100", "accCount": 1, "maxBatchSize": 8},
                                 {"acc": "H100", "accCount": 1, "maxBatchSize": 64}]}  # fmt: skip
    doc = va("b", modelProfile=profiles)
    assert parse_variant(doc, "[0]").max_batch == 8  # no accelerator: the first profile
    doc["metadata"]["labels"] = {"inference.optimization/acceleratorName": "H100"}
    assert parse_variant(doc, "[0]").max_batch == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apiVersion": "v1"}, "apiVersion"),
        ({"kind": "Deployment"}, "kind"),
        ({"spec": {"scaleTargetRef": {"name": "x"}}}, "spec.modelID"),
        (
            {"spec": {"modelID": "m", "minReplicas": 3, "maxReplicas": 2}},
            "minReplicas 3 > maxReplicas 2",
        ),
        ({"spec": {"modelID": "m", "minReplicas": -1}}, "spec.minReplicas"),
        ({"spec": {"modelID": "m", "maxReplicas": 0}}, "spec.maxReplicas"),
        ({"spec": {"modelID": "m", "variantCost": "cheap"}}, "spec.variantCost"),
        ({"spec": {"modelID": "m", "variantCost": "-1"}}, "spec.variantCost"),
        ({"spec": {"modelID": "m", "replicas": 3}}, "unknown field(s) ['replicas']"),
        (
            {"spec": {"modelID": "m", "scaleTargetRef": {"kind": "Job", "name": "x"}}},
            "unsupported 'Job'",
        ),
        ({"metadata": {"name": ""}}, "metadata.name"),
        ({"metadata": "x"}, "must be mappings"),
    ],
)
def test_bad_objects_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    doc = va("a") | change
    with pytest.raises(ConfigError) as err:
        parse_variants([doc])
    assert message in str(err.value)


def test_every_problem_reported_and_duplicates_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_variants([va("a"), va("a"), {"kind": "VariantAutoscaling"}])
    text = str(err.value)
    assert "duplicate name llm/a" in text
    assert "duplicate target llm/a" in text
    assert "[2].apiVersion" in text
    with pytest.raises(ConfigError, match="no VariantAutoscaling"):
        parse_variants([None])


def test_list_unwrapped_and_grouped_cheapest_first(tmp_path: Path) -> None:
    items = [va("h100", variantCost="10"), va("l40s", variantCost="5"), va("other", modelID="n")]
    f = tmp_path / "v.yaml"
    f.write_text(
        yaml.safe_dump({"kind": "List", "items": items[:2]}) + "---\n" + yaml.safe_dump(items[2])
    )
    groups = by_model(load_variants(f))
    assert [v.name for v in groups["m"]] == ["l40s", "h100"]
    assert [v.name for v in groups["n"]] == ["other"]


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_variants(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_variants(bad)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000)
    with pytest.raises(ConfigError):
        load_variants(deep)
