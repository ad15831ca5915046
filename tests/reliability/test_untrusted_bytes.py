"""Every parser that takes bytes from outside (clients, engines, files) either returns a value
or raises its one documented error: never another exception, which would escape as a 500, kill a
task or leak accounting. Hypothesis generates the inputs, seeded by the shapes each parser
expects so that deep paths are reached, plus the hostile cases that broke earlier versions."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd.protocol.errors import DecodeError, ProtocolError
from llmd.protocol.kv_events import decode_batch
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.protocol.openai import parse_request, usage_from_body
from llmd.runtime.config import ConfigError, load_config, yaml_mapping
from llmd.runtime.discovery import DiscoveryError, parse_endpoints_document
from llmd.scheduler.app import SchedulerConfig
from llmd.scheduler.config import read_config_text
from llmd.scheduler.framework import LLMRequest
from llmd.scheduler.parsing import ParseError, parse_openai

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOSTILE_BODIES = [
    b"\xff\xfe\x00{",  # not UTF-8
    b"[" * 5000 + b"]" * 5000,  # nested past any recursion limit
    b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"usage": ' + b"{" * 3000 + b"}",
    b"data: " + b"[" * 5000 + b"\n\ndata: [DONE]\n\n",
    b"",
    b"\x91" * 5000 + b"\xc0",  # msgpack nested past any recursion limit
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values,
        "prompt": json_values,
        "messages": json_values,
        "stream": json_values,
        "max_tokens": json_values,
        "usage": json_values,
    },
).map(lambda d: json.dumps(d).encode())
HOSTILE_TEXT = [
    "a: " + "[" * 5000 + "]" * 5000,
    "endpoints: " + "[" * 5000 + "]" * 5000,
    "&a [*a]",
    "\x00\x01",
]
texts = st.one_of(st.text(max_size=300), st.sampled_from(HOSTILE_TEXT))
bodies = st.one_of(st.binary(max_size=300), request_like, st.sampled_from(HOSTILE_BODIES))


@FUZZ
@given(bodies, st.booleans())
def test_usage_reader_never_raises(body: bytes, stream: bool) -> None:
    usage_from_body(body, stream)


@FUZZ
@given(bodies, st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_scheduler_request_parser_only_raises_parse_errors(body: bytes, path: str) -> None:
    req = LLMRequest(request_id="r", path=path, headers={}, body=body)
    with contextlib.suppress(ParseError):
        parse_openai(req)


@FUZZ
@given(bodies, st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_protocol_request_parser_only_raises_protocol_errors(body: bytes, path: str) -> None:
    with contextlib.suppress(ProtocolError, DecodeError):
        parse_request(path, body)


metric_lines = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
                "vllm:prefix_cache_hits_total",
                "vllm:cache_config_info",
                "vllm:lora_requests_info",
                "other_metric",
            ]
        ),
        st.sampled_from(["", '{model_name="m"}', '{block_size="16",num_gpu_blocks="x"}', "{"]),
        st.sampled_from(["0", "1.5", "-3", "+Inf", "-Inf", "NaN", "1e400", "abc", ""]),
    ),
    max_size=8,
).map(lambda lines: "\n".join(f"{n}{lab} {v}" for n, lab, v in lines))


@FUZZ
@given(st.one_of(metric_lines, st.text(max_size=300)))
def test_metrics_parser_only_raises_decode_errors(text: str) -> None:
    try:
        snap = parse_engine_snapshot(text)
    except DecodeError:
        return
    assert snap.waiting is None or snap.waiting >= 0
    assert snap.kv_cache_usage is None or 0.0 <= snap.kv_cache_usage <= 1.0


def test_infinite_queue_is_a_decode_error_not_an_overflow() -> None:
    with pytest.raises(DecodeError, match="not a count"):
        parse_engine_snapshot('vllm:num_requests_waiting{model_name="m"} +Inf\n')


kv_payloads = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(HOSTILE_BODIES),
    st.builds(
        lambda ts, events, rank: msgspec.msgpack.encode([ts, events, rank]),
        json_values,
        st.lists(st.lists(json_values, max_size=6), max_size=4),
        json_values,
    ),
)


@FUZZ
@given(kv_payloads)
def test_kv_event_decoder_only_raises_decode_errors(payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_batch(payload)


@FUZZ
@given(st.one_of(texts, request_like.map(lambda b: b.decode())))
def test_config_readers_only_raise_config_errors(text: str) -> None:
    for read in (
        lambda: yaml_mapping(text, "fuzz"),
        lambda: read_config_text(text, "fuzz"),
    ):
        with contextlib.suppress(ConfigError):
            read()


@FUZZ
@given(st.dictionaries(st.sampled_from(list(SchedulerConfig.model_fields)), st.text(max_size=12)))
def test_service_settings_from_variables_only_raise_config_errors(values: dict[str, str]) -> None:
    env = {f"LLMD_SCHEDULER_{k.upper()}": v for k, v in values.items()}
    with contextlib.suppress(ConfigError):
        load_config(SchedulerConfig, env_prefix="LLMD_SCHEDULER_", env=env)


@FUZZ
@given(st.one_of(texts, request_like.map(lambda b: b.decode())))
def test_discovery_documents_only_raise_discovery_errors(text: str) -> None:
    with contextlib.suppress(DiscoveryError):
        parse_endpoints_document(text)
