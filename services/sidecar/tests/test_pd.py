"""The P/D request transformations (pure)."""

from __future__ import annotations

import random

from llmd.sidecar.pd import (
    REMOTE_DECODE,
    cached_tokens,
    choose,
    decode_body,
    prefill_body,
    prefill_targets,
    target_host,
)


def test_prefill_targets_follow_llm_ds_header_rules() -> None:
    assert prefill_targets(["10.0.0.1:8000"]) == ["10.0.0.1:8000"]
    assert prefill_targets([" http://a:1 , b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    # the leg's scheme is the sidecar's own (--enable-tls): a scheme in the header is dropped,
    # never kept inside the host (it made http://https://a:1)
    assert prefill_targets(["https://a:1", "HTTP://b:2"]) == ["a:1", "b:2"]
    assert prefill_targets(["", " , "]) == []
    assert choose(["a:1", "b:2"], sampling=False) == "a:1"
    picks = {choose(["a:1", "b:2", "c:3"], True, random.Random(s)) for s in range(30)}
    assert picks == {"a:1", "b:2", "c:3"}
    assert target_host("10.0.0.1:8000") == "10.0.0.1"
    assert target_host("[fd00::1]:8000") == "fd00::1"
    assert target_host("prefill-0") == "prefill-0"


def test_the_prefill_leg_is_one_token_without_streaming_and_keeps_the_kv() -> None:
    doc = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 300,
        "kv_transfer_params": {"do_remote_prefill": True},  # a client's value is replaced
    }
    p = prefill_body(doc, "chat")
    assert p["kv_transfer_params"] == REMOTE_DECODE
    assert p["stream"] is False
    assert "stream_options" not in p
    assert (p["max_tokens"], p["max_completion_tokens"], p["min_tokens"]) == (1, 1, 1)
    assert doc["max_tokens"] == 300  # the client's request is untouched
    assert prefill_body({"input": "x"}, "responses")["max_output_tokens"] == 1
    g = prefill_body({"token_ids": [1, 2]}, "generate")
    assert g["sampling_params"] == {"max_tokens": 1, "min_tokens": 1}


def test_the_decode_leg_carries_the_prefill_params_verbatim() -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [[1, 2]], "remote_request_id": "r"}
    doc = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 30}
    d = decode_body(doc, {"kv_transfer_params": params})
    assert d == {**doc, "kv_transfer_params": params}
    assert decode_body(doc, {})["kv_transfer_params"] is None  # none: a local prefill
    assert cached_tokens({"usage": {"prompt_tokens_details": {"cached_tokens": 32}}}) == 32
    assert cached_tokens({"usage": {"prompt_tokens_details": None}}) == 0
