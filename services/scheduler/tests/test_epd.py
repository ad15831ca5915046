"""E/P/D: an encode profile run after decode for multimodal chats, its picks in
x-encoder-hosts-ports, with llm-d's plugin names and decision types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmd.protocol import headers as hdr
from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core
from llmd.scheduler.director import Director
from llmd.scheduler.framework import LLMRequest
from llmd.scheduler.plugins.disagg import DisaggProfileHandler

from .conftest import completion, make_director

# llm-d's simulator E/P/D shape: an encode profile with encode-filter, the multimodal decider
# for encode and the prefix-based decider for prefill
EPD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16}
- type: prefix-cache-scorer
- type: queue-scorer
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-multimodal-decider
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
- type: disagg-profile-handler
  parameters:
    deciders: {encode: always-disagg-multimodal-decider, prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: encode
  plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer},
            {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2},
            {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""
ROLES = {
    0: {"llm-d.ai/role": "encode"},
    1: {"llm-d.ai/role": "prefill"},
    2: {"llm-d.ai/role": "decode"},
}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


def chat(director: Director, content: object) -> LLMRequest:
    req = director.new_request({}, "/v1/chat/completions")
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    req.body = json.dumps(body).encode()
    return req


def counted(director: Director, kind: str) -> float:
    handler = director.built.handler
    assert isinstance(handler, DisaggProfileHandler)
    name = "disagg-profile-handler"
    return float(handler.decisions[0].labels(name, name, "m", kind)._value.get())


def test_a_multimodal_chat_gets_an_encoder_a_prefiller_and_a_decoder() -> None:
    d, _, _ = make_director(3, EPD, labels=ROLES)
    text = [{"type": "text", "text": "describe this picture in detail " * 8}, IMAGE, IMAGE]
    dec = d.schedule(chat(d, text))
    assert dec.endpoints[0].name == "pod-2"  # decode is the destination
    assert dec.set_headers[hdr.ENCODER_HOSTS_PORTS] == "127.0.0.1:9000"
    assert dec.result is not None
    assert hdr.PREFILLER_HOST_PORT in dec.set_headers, dec.result.profiles["decode"].explain
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9001"
    assert counted(d, "encode-prefill-decode") == 1
    assert dec.result is not None
    why = dec.result.profiles["decode"].explain
    assert why["encode"]["reason"] == "2 multimodal item(s)"
    assert why["pd"]["decision"] == "encode-prefill-decode"


def test_a_text_chat_never_visits_an_encoder() -> None:
    d, _, _ = make_director(3, EPD, labels=ROLES)
    dec = d.schedule(chat(d, [{"type": "text", "text": "just words " * 20}]))
    assert hdr.ENCODER_HOSTS_PORTS not in dec.set_headers
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9001"
    assert counted(d, "prefill-decode") == 1
    dec = d.schedule(completion(d, "a completion has no media " * 10))
    assert hdr.ENCODER_HOSTS_PORTS not in dec.set_headers


def test_a_short_multimodal_chat_is_encode_decode() -> None:
    d, _, _ = make_director(3, EPD, labels=ROLES)
    dec = d.schedule(chat(d, [IMAGE]))  # too few text tokens for the prefill decider
    assert dec.set_headers[hdr.ENCODER_HOSTS_PORTS] == "127.0.0.1:9000"
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    assert counted(d, "encode-decode") == 1


def test_without_an_encode_pod_the_request_is_served_and_says_who_encodes() -> None:
    d, _, _ = make_director(2, EPD, labels={0: ROLES[1], 1: ROLES[2]})
    dec = d.schedule(chat(d, [{"type": "text", "text": "describe " * 40}, IMAGE]))
    assert hdr.ENCODER_HOSTS_PORTS not in dec.set_headers
    assert counted(d, "prefill-decode") == 1
    assert dec.result is not None
    outcome = dec.result.profiles["decode"].explain["encode"]["outcome"]
    assert outcome == "no encode pod passed the encode profile: the prefill pod encodes itself"


def test_several_encode_picks_are_comma_joined_and_ipv6_is_bracketed() -> None:
    config = EPD.replace(
        "- type: max-score-picker\n",
        "- type: max-score-picker\n- type: random-picker\n  name: two\n"
        "  parameters: {maxNumOfEndpoints: 2}\n",
        1,
    ).replace(
        "[{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]",
        "[{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: two}]",
    )
    labels = {0: ROLES[0], 1: ROLES[0], 2: ROLES[2]}
    d, _, _ = make_director(3, config, labels=labels)
    dec = d.schedule(chat(d, [IMAGE]))
    got = sorted(dec.set_headers[hdr.ENCODER_HOSTS_PORTS].split(","))
    assert got == ["127.0.0.1:9000", "127.0.0.1:9001"]


def test_e_pd_needs_no_prefill_profile_but_a_named_encode_decider_needs_its_profile() -> None:
    epd_only = EPD.replace(
        "- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer},\n"
        "            {pluginRef: max-score-picker}]\n",
        "",
    ).replace(", prefill: prefix-based-pd-decider", "")
    d, _, _ = make_director(2, epd_only, labels={0: ROLES[0], 1: ROLES[2]})
    dec = d.schedule(chat(d, [{"type": "text", "text": "words " * 40}, IMAGE]))
    assert dec.set_headers[hdr.ENCODER_HOSTS_PORTS] == "127.0.0.1:9000"
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    no_encode = EPD.replace(
        "- name: encode\n  plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}, "
        "{pluginRef: max-score-picker}]\n",
        "",
    )
    with pytest.raises(ConfigError, match="no scheduling profile named 'encode'"):
        build_core(no_encode)
    wrong = EPD.replace("deciders: {encode: always-disagg-multimodal-decider",
                        "deciders: {encode: prefix-based-pd-decider")  # fmt: skip
    with pytest.raises(ConfigError, match="is not an encode decider"):
        build_core(wrong)


def test_llm_ds_own_e_p_d_config_routes_a_multimodal_chat_to_an_encoder() -> None:
    corpus = Path(__file__).parent / "compat" / "llm-d" / "scheduler" / "sim-e-p-d-epp-config.yaml"
    d, _, _ = make_director(3, corpus.read_text(), labels=ROLES)
    dec = d.schedule(chat(d, [{"type": "text", "text": "what is in the picture? " * 8}, IMAGE]))
    assert dec.endpoints[0].name == "pod-2"
    assert dec.set_headers[hdr.ENCODER_HOSTS_PORTS] == "127.0.0.1:9000"
    # that config runs no prefix-cache producer, and llm-d's prefix-based decider does not
    # disaggregate without prefix information: encode-decode, as llm-d routes it
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    assert dec.result is not None
    why = dec.result.profiles["decode"].explain["pd"]
    assert why == {"reason": "no prefix information (no prefix-cache producer ran)",
                   "decision": "encode-decode"}  # fmt: skip
