"""EndpointPickerConfig: llm-d's schema and defaults, and errors with their YAML paths."""

from __future__ import annotations

import pytest

from llmd.runtime.config import ConfigError
from llmd.scheduler.config import BuiltConfig, read_config_text
from llmd.scheduler.core import build_core


def built(text: str | None, experimental: bool = False) -> BuiltConfig:
    return build_core(text, allow_experimental=experimental).built


def errors(text: str, experimental: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        built(text, experimental)
    return [str(i) for i in exc.value.issues]


def test_default_is_the_optimized_baseline_plus_overload_filter() -> None:
    b = built(None)
    prof = b.profiles["default"]
    assert {s.type_name: w for s, w in prof.scorers} == {
        "queue-scorer": 2,
        "kv-cache-utilization-scorer": 2,
        "prefix-cache-scorer": 3,
    }
    assert [f.type_name for f in prof.filters] == ["utilization-filter"]
    assert prof.picker.type_name == "max-score-picker"
    assert b.handler.type_name == "single-profile-handler"
    assert "approx-prefix-cache-producer" in b.plugins  # auto-created for the prefix scorer


def test_llm_d_sample_config_loads_unchanged() -> None:
    b = built(
        """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: decode-filter
- type: max-score-picker
- type: single-profile-handler
- type: metrics-data-source
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
"""
    )
    prof = b.profiles["default"]
    assert [f.type_name for f in prof.filters] == ["decode-filter"]
    assert [(s.type_name, w) for s, w in prof.scorers] == [("prefix-cache-scorer", 2)]


def test_no_profiles_means_one_default_profile_with_every_filter_scorer_picker() -> None:
    b = built("plugins:\n- type: queue-scorer\n- type: random-picker\n- type: decode-filter\n")
    prof = b.profiles["default"]
    assert prof.picker.type_name == "random-picker"
    assert [s.type_name for s, _ in prof.scorers] == ["queue-scorer"]
    assert prof.scorers[0][1] == 1.0


def test_every_error_is_reported_with_its_yaml_path() -> None:
    got = errors(
        """
plugins:
- type: queue-scorer
- type: no-such-scorer
- type: load-aware-scorer
  parameters: {threshold: "many"}
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 1, bogus: 2}
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: -1
  - pluginRef: missing
  - pluginRef: max-score-picker
  - pluginRef: random-picker
"""
    )
    text = "\n".join(got)
    assert "plugins[1].type: unknown plugin type 'no-such-scorer'" in text
    assert "plugins[2].parameters.threshold" in text
    assert "plugins[3].parameters.bogus" in text
    assert "schedulingProfiles[0].plugins[0].weight" in text


def test_reference_and_picker_errors_have_paths() -> None:
    got = errors(
        """
plugins:
- type: max-score-picker
- type: random-picker
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: nope
  - pluginRef: max-score-picker
  - pluginRef: random-picker
"""
    )
    text = "\n".join(got)
    assert "schedulingProfiles[0].plugins[0].pluginRef: no plugin named 'nope'" in text
    assert "a profile takes one picker, got 2" in text


def test_experimental_plugins_need_the_flag() -> None:
    text = "plugins:\n- type: session-affinity-scorer\n"
    assert any("--allow-experimental-plugins" in e for e in errors(text))
    assert "session-affinity-scorer" in built(text, experimental=True).plugins


def test_bad_yaml_api_version_and_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as exc:
        read_config_text("plugins: [\n", "t")
    assert "line" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        read_config_text("apiVersion: v9\nplugnis: []\n", "t")
    text = str(exc.value)
    assert "apiVersion" in text
    assert "plugnis" in text


def test_multiple_profiles_need_a_handler_and_parsers_are_checked() -> None:
    got = errors(
        """
plugins:
- type: queue-scorer
schedulingProfiles:
- {name: a, plugins: [{pluginRef: queue-scorer}]}
- {name: b, plugins: [{pluginRef: queue-scorer}]}
requestHandler:
  parsers: [{pluginRef: grpc-parser}]
"""
    )
    text = "\n".join(got)
    assert "2 scheduling profiles need a profile handler" in text
    assert "requestHandler.parsers[0].pluginRef" in text


def test_precise_producer_parameters_are_checked_with_paths() -> None:
    text = "\n".join(
        errors(
            """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {}
    tokenProcessorConfig: {blockSizeTokens: 0, hashAlgorithm: md5}
    speculativeTTL: soon
- type: prefix-cache-scorer
"""
        )
    )
    assert "plugins[0].parameters.tokenizer" in text
    assert "give modelDir (a tokenizer directory) or renderUrl (a vLLM server)" in text
    assert "plugins[0].parameters.tokenProcessorConfig.blockSizeTokens" in text
    assert "plugins[0].parameters.tokenProcessorConfig.hashAlgorithm" in text
    assert "plugins[0].parameters.speculativeTTL" in text


def test_precise_producer_replaces_the_approximate_one() -> None:
    b = built(
        """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {renderUrl: "http://127.0.0.1:1"}
- type: prefix-cache-scorer
"""
    )
    assert "approx-prefix-cache-producer" not in b.plugins
    assert [p.type_name for p in b.producers] == ["precise-prefix-cache-producer"]
