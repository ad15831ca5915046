"""P/D disaggregation plugins with llm-d's names: decode first, prefill when the decider says
so, the prefill pick in x-prefiller-host-port, decisions counted and explained."""

from __future__ import annotations

import pytest

from llmd.protocol import headers as hdr
from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core
from llmd.scheduler.director import Director
from llmd.scheduler.framework import SchedulingError
from llmd.scheduler.plugins.disagg import DisaggProfileHandler

from .conftest import completion, make_director

ROLES = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"},
         2: {"llm-d.ai/role": "decode"}}  # fmt: skip
PROFILES = """
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2},
            {pluginRef: queue-scorer}]
"""


def config(decider: str) -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: 16}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
{decider}
{PROFILES}"""


PREFIX_DECIDER = """- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}"""


def counted(director: Director, kind: str) -> float:
    """The decision count, the same under llm-d's current and deprecated metric names."""
    handler = director.built.handler
    assert isinstance(handler, DisaggProfileHandler)
    name = "disagg-profile-handler"
    values = [c.labels(name, name, "m", kind)._value.get() for c in handler.decisions]
    assert len(values) == 2
    assert values[0] == values[1]
    return float(values[0])


def test_always_disagg_picks_a_decode_pod_and_names_a_prefill_pod() -> None:
    decider = "- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n" \
              "  parameters: {deciders: {prefill: always-disagg-pd-decider}}"  # fmt: skip
    d, _, _ = make_director(3, config(decider), labels=ROLES)
    dec = d.schedule(completion(d, "hello " * 10))
    assert dec.endpoints[0].name in {"pod-1", "pod-2"}  # decode pods only
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"  # the prefill pod
    assert counted(d, "prefill-decode") == 1


def test_the_prefix_decider_disaggregates_only_long_uncached_prompts() -> None:
    d, _, _ = make_director(3, config(PREFIX_DECIDER), labels=ROLES)
    short = d.schedule(completion(d, "short prompt"))
    assert hdr.PREFILLER_HOST_PORT not in short.set_headers
    long_prompt = "a long shared system prompt " * 200  # ~1.4k estimated tokens
    first = d.schedule(completion(d, long_prompt + "question one"))
    assert first.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"
    d.complete(first, "natural")
    # the same prefix again: the decode pod holds it, so few tokens are left to prefill
    again = d.schedule(completion(d, long_prompt + "question two"))
    assert again.endpoints[0].name == first.endpoints[0].name
    assert hdr.PREFILLER_HOST_PORT not in again.set_headers
    assert counted(d, "decode-only") == 2
    assert counted(d, "prefill-decode") == 1
    assert again.result is not None
    why = again.result.profiles["decode"].explain["pd"]
    assert why["decision"] == "decode-only"
    assert "not cached on" in why["reason"]


def test_no_decode_pod_is_a_503_and_no_prefill_pod_is_decode_only() -> None:
    decider = "- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n" \
              "  parameters: {deciders: {prefill: always-disagg-pd-decider}}"  # fmt: skip
    d, _, _ = make_director(1, config(decider), labels={0: {"llm-d.ai/role": "prefill"}})
    with pytest.raises(SchedulingError) as exc:
        d.schedule(completion(d, "x"))
    assert exc.value.status == 503
    d, _, _ = make_director(2, config(decider),
                            labels={0: {"llm-d.ai/role": "decode"}, 1: {"llm-d.ai/role": "decode"}})  # fmt: skip
    dec = d.schedule(completion(d, "x"))
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    assert counted(d, "decode-only") == 1


def test_a_handler_naming_a_missing_decider_or_profile_is_refused() -> None:
    bad = "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: nope}}"
    with pytest.raises(ConfigError, match="'nope' is not a P/D decider"):
        build_core(config(bad))
    wrong = ("- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n"
             "  parameters: {profiles: {prefill: pre}, deciders: {prefill: always-disagg-pd-decider}}")  # fmt: skip
    with pytest.raises(ConfigError, match="no scheduling profile named 'pre'"):
        build_core(config(wrong))
