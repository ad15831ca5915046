"""Reading llm-d configs: legacy parameters land where llmd reads them, tokenizer sources,
engine kinds, objectives, session tokens and the legacy metric names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core
from llmd.scheduler.metrics import LegacyNames, legacy_name
from llmd.scheduler.objectives import parse_objectives
from llmd.scheduler.plugins.scorers import decode_endpoint
from llmd.sim.tokenizer import default_tokenizer_dir

HEAD = "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\n"


def families(text: str | None) -> dict[str, str]:
    core = build_core(text)
    out = generate_latest(core.registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(out)}


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        build_core(text, allow_experimental=True)
    return [str(i) for i in exc.value.issues]


def test_two_prefix_producers_each_get_their_own_series() -> None:
    core = build_core(
        HEAD
        + """
plugins:
- {type: approx-prefix-cache-producer, name: gpu}
- {type: approx-prefix-cache-producer, name: cpu, parameters: {autoTune: false}}
- {type: prefix-cache-scorer, name: gpu-scorer, parameters: {prefixMatchInfoProducerName: gpu}}
- {type: prefix-cache-scorer, name: cpu-scorer, parameters: {prefixMatchInfoProducerName: cpu}}
"""
    )
    text = generate_latest(core.registry).decode()
    for name in ("gpu", "cpu"):
        assert f'llm_d_epp_prefix_indexer_size{{plugin_name="{name}"' in text
    fams = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert fams["llm_d_epp_prefix_indexer_hit_ratio"] == "histogram"
    assert fams["llm_d_epp_prefix_indexer_hit_bytes"] == "histogram"


def test_token_producer_vllm_url_feeds_the_precise_producer() -> None:
    core = build_core(
        HEAD
        + """
plugins:
- type: token-producer
  parameters: {modelName: m, vllm: {url: "http://render:8000"}}
- type: precise-prefix-cache-producer
  parameters: {tokenProcessorConfig: {blockSize: 64, hashSeed: "42"}}
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}}
"""
    )
    precise = core.built.plugins["precise-prefix-cache-producer"]
    params = precise.params
    assert params.tokenizer is not None
    assert params.tokenizer.render_url == "http://render:8000"
    assert params.token_processor_config.block_size_tokens == 64
    assert core.built.plugins["token-producer"].params.backend == "vllm"


def test_tokenizers_pool_config_reads_a_local_tokenizer(tmp_path: Path) -> None:
    model_dir = tmp_path / "org" / "tiny"
    model_dir.parent.mkdir()
    model_dir.symlink_to(default_tokenizer_dir())
    core = build_core(
        HEAD
        + f"""
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    indexerConfig:
      tokenizersPoolConfig: {{modelName: org/tiny, hf: {{tokenizersCacheDir: "{tmp_path}"}}}}
"""
    )
    producer = core.built.plugins["precise-prefix-cache-scorer-producer"]
    assert producer.params.tokenizer.model_dir == str(model_dir)
    scorer = core.built.plugins["precise-prefix-cache-scorer"]
    assert scorer.params.prefix_match_info_producer_name == "precise-prefix-cache-scorer-producer"


def test_legacy_scorer_parameters_configure_the_producer_it_creates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        core = build_core(
            HEAD
            + """
plugins:
- type: prefix-cache-scorer
  parameters: {maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 1000, hashBlockSize: 5}
- type: no-hit-lru-scorer
  parameters: {prefixPluginType: prefix-cache-scorer, prefixPluginName: approx-prefix-cache-producer}
"""
        )
    approx = core.built.plugins["approx-prefix-cache-producer"]
    assert approx.params.max_prefix_blocks_to_match == 256
    assert approx.params.lru_capacity_per_server == 1000
    lru = core.built.plugins["no-hit-lru-scorer"]
    assert lru.params.prefix_match_info_producer_name == "approx-prefix-cache-producer"
    assert "deprecated" in caplog.text


def test_engine_kinds() -> None:
    core = build_core(
        HEAD
        + """
plugins:
- type: core-metrics-extractor
  parameters:
    defaultEngine: sglang
    engineConfigs:
    - {name: custom, queuedRequestsSpec: "my_queue{kind=waiting}", kvUsageSpec: my_kv}
"""
    )
    d = core.built.datalayer
    assert d.default_engine == "sglang"
    assert d.dialect_for({}).name == "sglang"
    assert d.dialect_for({"llm-d.ai/engine-type": "vllm"}).name == "vllm"
    custom = d.dialect_for({"inference.networking.k8s.io/engine-type": "custom"})
    assert custom.waiting is not None
    assert custom.waiting.labels == (("kind", "waiting"),)
    with pytest.raises(ValueError, match="no metric mapping"):
        d.dialect_for({"llm-d.ai/engine-type": "mystery"})


def test_bad_data_layer_parameters_are_clear() -> None:
    got = issues(
        HEAD
        + """
plugins:
- {type: core-metrics-extractor, parameters: {defaultEngine: mystery}}
- {type: metrics-data-source, parameters: {scheme: https}}
- {type: prefix-cache-scorer}
"""
    )
    assert any("unknown engine 'mystery'" in i for i in got), got
    assert any("HTTPS is not available in llmd" in i for i in got), got


def test_missing_features_are_named_once() -> None:
    got = issues(
        HEAD
        + """
plugins:
- {type: pd-slo-profile-handler}
- {type: pd-slo-pair-optimizer}
- {type: prefill-filter}
- {type: decode-filter}
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
- {name: decode, plugins: [{pluginRef: decode-filter}]}
"""
    )
    assert len(got) == 2, got
    assert all("with SLO pair optimisation" in i for i in got), got


def test_unknown_types_stay_unknown() -> None:
    got = issues(HEAD + "plugins:\n- {type: no-such-plugin}\n")
    assert "neither llmd nor llm-d has it" in got[0]


def test_objectives() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: premium}
spec: {priority: 10}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -5}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: plain}
"""
    assert parse_objectives(text) == {"premium": 10, "batch": -5, "plain": 0}
    with pytest.raises(ConfigError) as exc:
        parse_objectives(
            "kind: Pod\napiVersion: v1\n---\n"
            "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\n"
            "metadata: {name: x}\nspec: {priority: high}\n"
        )
    msgs = [str(i) for i in exc.value.issues]
    assert any("expected an InferenceObjective" in m for m in msgs), msgs
    assert any("32-bit integer" in m for m in msgs), msgs


@pytest.mark.parametrize(
    "token", ["", "%%%", "bm8tc2xhc2g", "x" * 600, "////", "ZGVmYXVsdC9zaW0tMA=="]
)
def test_session_tokens_from_clients_are_untrusted(token: str) -> None:
    got = decode_endpoint(token)
    assert got is None or got == "default/sim-0"


def test_legacy_metric_names() -> None:
    assert legacy_name("llm_d_epp_request_size_bytes") == "llm_d_router_epp_request_sizes"
    assert legacy_name("llm_d_epp_average_queue_size") == "llm_d_router_epp_average_queue_size"
    assert legacy_name("llm_d_epp_request_ttft_seconds") is None
    core = build_core(None)
    core.registry.register(LegacyNames(core.registry))
    text = generate_latest(core.registry).decode()
    fams = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert fams["llm_d_router_epp_request"] == "counter"
    assert fams["llm_d_router_epp_request_sizes"] == "histogram"
    assert fams["llm_d_epp_request"] == "counter"  # the current names stay
