"""OpenAI request parsing and response shapes."""

from __future__ import annotations

import json

import msgspec
import pytest

from llmd.protocol import DecodeError, ProtocolError
from llmd.protocol.openai import (
    NIXL_DECODE_REQUIRED,
    SSE_DONE,
    ChatCompletionRequest,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    NixlTransferParams,
    decode_usage,
    error_body,
    iter_sse_data,
    parse_request,
    sse_event,
)

# Captured from real vLLM 0.32 (a prefill response carrying kv_transfer_params).
VLLM_PREFILL_PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2, 3]],
    "remote_engine_id": "c94bae7b-5f75-457b-8ec3-9ae9a993d536",
    "remote_request_id": "cmpl-test-req-1-0-8989af83",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 300,
    "remote_blocks_expiry_time": None,
    "transfer_mode": "pull",
    "remote_prefill_cached_tokens": 0,
}


def test_model_is_optional_as_on_vllm() -> None:
    req = parse_request("/v1/completions", b'{"prompt":"x"}')
    assert req.model is None


def test_completion_and_chat_requests_parse_with_unknown_fields() -> None:
    req = parse_request(
        "/v1/completions",
        b'{"model":"m","prompt":"hi","max_tokens":5,"stream":true,'
        b'"stream_options":{"include_usage":true},"frobnicate":1}',
    )
    assert isinstance(req, CompletionRequest)
    assert (req.model, req.prompt, req.max_tokens, req.stream) == ("m", "hi", 5, True)
    chat = parse_request(
        "/v1/chat/completions",
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
                "max_completion_tokens": 7,
                "cache_salt": "s",
            }
        ).encode(),
    )
    assert isinstance(chat, ChatCompletionRequest)
    assert chat.messages[0].text() == "ab"
    assert chat.output_limit() == 7
    assert chat.cache_salt == "s"


def test_token_id_prompts_are_accepted() -> None:
    req = parse_request("/v1/completions", b'{"model":"m","prompt":[1,2,3]}')
    assert isinstance(req, CompletionRequest)
    assert req.prompt == [1, 2, 3]


@pytest.mark.parametrize(
    ("path", "body", "error", "message"),
    [
        ("/v1/completions", b"{not json", DecodeError, "not valid JSON"),
        ("/v1/completions", b'{"model":"m"}', DecodeError, "prompt"),
        (
            "/v1/completions",
            b'{"model":"m","prompt":"x","max_tokens":"ten"}',
            DecodeError,
            "max_tokens",
        ),
        ("/v1/chat/completions", b'{"model":"m","messages":"hi"}', DecodeError, "messages"),
        (
            "/v1/completions",
            b'{"model":"m","prompt":"x","stream_options":{}}',
            ProtocolError,
            "stream",
        ),
        ("/v2/other", b"{}", ProtocolError, "unsupported"),
    ],
)
def test_bad_requests_get_precise_errors(
    path: str, body: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        parse_request(path, body)


def test_usage_reads_cached_tokens_from_a_real_vllm_response() -> None:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 122,
            "total_tokens": 125,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 96, "created_cache_tokens": None},
        },
    }
    usage = decode_usage(body)
    assert usage is not None
    assert usage.cached_tokens == 96
    resp = msgspec.convert(body, CompletionResponse)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 122
    assert decode_usage({"usage": None}) is None
    with pytest.raises(DecodeError, match="usage"):
        decode_usage({"usage": {"prompt_tokens": "x"}})


def test_sse_framing_round_trips() -> None:
    chunk = CompletionChunk(id="cmpl-1", created=1, model="m", choices=[])
    stream = sse_event(chunk) + SSE_DONE
    assert stream.startswith(b"data: {")
    datas = iter_sse_data(stream)
    assert datas[-1] == b"[DONE]"
    assert json.loads(datas[0])["object"] == "text_completion"


def test_nixl_params_from_real_vllm_keep_every_key() -> None:
    params = msgspec.convert(VLLM_PREFILL_PARAMS, NixlTransferParams)
    assert msgspec.to_builtins(params) == VLLM_PREFILL_PARAMS
    assert all(VLLM_PREFILL_PARAMS[k] is not None for k in NIXL_DECODE_REQUIRED)


def test_error_body_is_vllm_shaped() -> None:
    err = json.loads(error_body("bad model", code=404, kind="NotFoundError"))
    assert err == {
        "error": {"message": "bad model", "type": "NotFoundError", "param": None, "code": 404}
    }


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_every_prompt_shape_normalises_to_a_list(prompt: object, expected: list[object]) -> None:
    req = parse_request("/v1/completions", json.dumps({"model": "m", "prompt": prompt}).encode())
    assert isinstance(req, CompletionRequest)
    assert req.prompts() == expected


@pytest.mark.parametrize("prompt", [[], [1, "a"], [[1, "x"]], [{"a": 1}]])
def test_malformed_prompts_are_rejected(prompt: object) -> None:
    with pytest.raises(ProtocolError, match="prompt"):
        parse_request("/v1/completions", json.dumps({"model": "m", "prompt": prompt}).encode())
