"""Data-parallel ranks behind one sidecar port: llm-d's data-parallel-profile-handler and the
P/D handlers' primaryPort. The gateway is sent to the pod's primary port, the picked rank
travels in x-data-parallel-host-port, and the accounting stays on that rank."""

from __future__ import annotations

import pytest

from llmd.protocol import headers as hdr
from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core

from .conftest import completion, make_director


def config(handler: str) -> str:
    """A P/D config (prefill and decode profiles) with `handler`'s plugins."""
    return f"""
plugins:
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
{handler}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: queue-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: queue-scorer}}]
"""


DP = """
plugins:
- type: queue-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 3}
- type: data-parallel-profile-handler
  parameters: {primaryPort: 8000}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""


def test_a_rank_is_picked_and_reached_through_the_primary_port() -> None:
    d, ds, _ = make_director(4, DP)  # four ranks of one pod: 127.0.0.1:9000-9003
    busy = ds.all()[0]
    busy.inflight_requests = 5
    dec = d.schedule(completion(d, "hello"))
    rank = dec.endpoints[0]
    assert rank is not busy
    assert dec.primary == "127.0.0.1:8000"
    assert dec.destination == "127.0.0.1:8000"  # three fallback ranks, one pod: listed once
    assert dec.set_headers == {hdr.DATA_PARALLEL_HOST_PORT: rank.key}
    assert rank.inflight_requests == 1  # the rank carries the load, not the primary port
    d.response_headers(dec, 200)
    d.complete(dec, "natural", served="127.0.0.1:8000")
    assert rank.inflight_requests == 0
    assert d.metrics.served_elsewhere._value.get() == 0


def test_the_default_primary_port_is_llm_d_s_8000_and_one_profile_is_required() -> None:
    d, _, _ = make_director(2, DP.replace("  parameters: {primaryPort: 8000}\n", ""))
    assert d.schedule(completion(d, "x")).primary == "127.0.0.1:8000"
    two = DP + "- name: other\n  plugins: [{pluginRef: queue-scorer}]\n"
    with pytest.raises(ConfigError, match="runs exactly one scheduling profile; the config has 2"):
        build_core(two)
    with pytest.raises(ConfigError, match="primaryPort"):
        build_core(DP.replace("primaryPort: 8000", "primaryPort: 70000"))


def test_a_p_d_handler_with_primary_port_sends_the_decode_rank_and_the_prefill_pod() -> None:
    handler = """- type: always-disagg-pd-decider
- type: pd-profile-handler
  parameters: {deciderPluginName: always-disagg-pd-decider, primaryPort: 8000}"""
    roles = {0: {"llm-d.ai/role": "prefill"}, 2: {"llm-d.ai/role": "decode"}}
    d, _, _ = make_director(3, config(handler), labels=roles)
    dec = d.schedule(completion(d, "hello " * 10))
    assert dec.primary == "127.0.0.1:8000"
    assert dec.set_headers[hdr.DATA_PARALLEL_HOST_PORT] == dec.endpoints[0].key
    assert dec.endpoints[0].name in {"pod-1", "pod-2"}
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"  # its own port
    # without primaryPort nothing is rewritten and no rank header is sent
    plain, _, _ = make_director(3, config(handler.replace(", primaryPort: 8000", "")), labels=roles)
    dec = plain.schedule(completion(plain, "hello " * 10))
    assert dec.primary == dec.endpoints[0].key
    assert hdr.DATA_PARALLEL_HOST_PORT not in dec.set_headers
