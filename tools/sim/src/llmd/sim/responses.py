"""vLLM 0.32's OpenAI response bodies and SSE chunks, field for field.

The shapes (key order, which keys are null, which appear only in some chunks) were recorded
from a real vLLM 0.32 server; tests/vllm/test_sim_contract.py keeps them honest.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmd.protocol.openai import error_body

_encode = msgspec.json.Encoder().encode


def encode(obj: Any) -> bytes:
    return _encode(obj)


def usage(
    prompt: int,
    completion: int,
    cached: int | None,
    *,
    chat: bool,
    stream: bool,
) -> dict[str, Any]:
    """The usage object; prompt_tokens_details only with --enable-prompt-tokens-details."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:
        if stream:
            details: dict[str, Any] = {"cached_tokens": cached}
            if chat:
                details["created_cache_tokens"] = 0
        else:
            details = {
                "cached_tokens": cached,
                "created_cache_tokens": 0 if chat else None,
                "multimodal_tokens": None,
            }
        out["prompt_tokens_details"] = details
    elif not stream:
        out["prompt_tokens_details"] = None
    if not stream:
        out["completion_tokens_details"] = None
    return out


def completion(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[str, str | None]],
    usage_obj: dict[str, Any],
    fingerprint: str,
    kv_transfer_params: dict[str, Any] | None,
    ec_transfer_params: dict[str, Any] | None = None,
) -> bytes:
    return _encode(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
                for i, (text, reason) in enumerate(choices)
            ],
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": usage_obj,
            "kv_transfer_params": kv_transfer_params,
            "ec_transfer_params": ec_transfer_params,
            "metrics": None,
        }
    )


def chat_completion(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[str, str | None]],
    usage_obj: dict[str, Any],
    fingerprint: str,
    kv_transfer_params: dict[str, Any] | None,
    ec_transfer_params: dict[str, Any] | None = None,
) -> bytes:
    return _encode(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
                for i, (text, reason) in enumerate(choices)
            ],
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": usage_obj,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": kv_transfer_params,
            "ec_transfer_params": ec_transfer_params,
            "metrics": None,
        }
    )


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


class ChunkWriter:
    """Builds one streamed response's SSE events (completions or chat)."""

    def __init__(self, rid: str, created: int, model: str, *, chat: bool, fingerprint: str) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        self.chat = chat
        self.fingerprint = fingerprint
        self._object = "chat.completion.chunk" if chat else "text_completion"

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": self._object,
            "created": self.created,
            "model": self.model,
        }

    def role(self, index: int) -> bytes:
        """Chat's first chunk for a choice: the assistant role and empty content."""
        obj = self._head()
        obj["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        obj["prompt_token_ids"] = None
        obj["prompt_text"] = None
        return sse(obj)

    def token(self, index: int, text: str, finish_reason: str | None, *, last: bool) -> bytes:
        """A content chunk; `last` chunks carry stop_reason (and the fingerprint if no usage)."""
        obj = self._head()
        if self.chat:
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            if finish_reason is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_token_ids": None,
                "token_ids": None,
            }
        obj["choices"] = [choice]
        if last:
            obj["system_fingerprint"] = self.fingerprint
        return sse(obj)

    def usage(self, usage_obj: dict[str, Any]) -> bytes:
        obj = self._head()
        obj["choices"] = []
        obj["usage"] = usage_obj
        obj["system_fingerprint"] = self.fingerprint
        return sse(obj)

    @staticmethod
    def error(message: str, kind: str, code: int) -> bytes:
        return b"data: " + error_body(message, kind=kind, code=code) + b"\n\n"


DONE = b"data: [DONE]\n\n"
