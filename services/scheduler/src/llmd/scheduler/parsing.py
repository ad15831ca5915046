"""Request parsers: from a buffered body to the fields the scheduler routes on.

`openai-parser` decodes only what routing needs (model, stream, prompt or messages, tools,
max_tokens, cache_salt) with msgspec, which skips every other field without building it. The
prompt becomes llm-d's token estimate: the bytes a 4-bytes-per-token packing hashes (texts) or
the little-endian uint32 array of pre-tokenized ids. `passthrough-parser` routes by load only.
"""

from __future__ import annotations

from array import array
from typing import Any

import msgspec

from llmd.protocol.errors import DecodeError
from llmd.protocol.openai import MEDIA_PART_TYPES
from llmd.scheduler.framework import LLMRequest

COMPLETIONS_SUFFIXES = ("/completions", "/completions/render")
CHAT_SUFFIXES = ("/chat/completions", "/chat/completions/render")


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_Part] | None = None


class _RoutingView(msgspec.Struct):
    model: str | None = None
    stream: bool | None = False
    prompt: str | list[Any] | None = None
    messages: list[_Message] | None = None
    tools: list[Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    cache_salt: str | None = None


_decoder = msgspec.json.Decoder(_RoutingView)
_encoder = msgspec.json.Encoder()


class ParseError(ValueError):
    """The body cannot be routed; the message is returned to the client with a 400."""


def _token_bytes(ids: list[Any]) -> bytes:
    if not all(type(t) is int and 0 <= t < 2**32 for t in ids):
        raise ParseError("prompt token ids must be integers in [0, 2^32)")
    return array("I", ids).tobytes()


def _completion_prompts(prompt: str | list[Any]) -> list[bytes]:
    if isinstance(prompt, str):
        return [prompt.encode()]
    if not prompt:
        raise ParseError("prompt must not be empty")
    if all(type(t) is int for t in prompt):
        return [_token_bytes(prompt)]
    out: list[bytes] = []
    for item in prompt:
        if isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, list):
            out.append(_token_bytes(item))
        else:
            raise ParseError(
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of token-id lists"
            )
    return out


def _chat_prompt(messages: list[_Message], tools: list[Any] | None) -> bytes:
    parts: list[bytes] = []
    if tools:
        parts.append(_encoder.encode(tools))
    for m in messages:
        parts.append(m.role.encode())
        content = m.content
        if isinstance(content, str):
            parts.append(content.encode())
        elif content:
            parts.extend(p.text.encode() for p in content if p.text)
    return b"".join(parts)


HEAD_ROLES = ("system", "developer")


def _chat_head(messages: list[_Message]) -> tuple[tuple[str, str], ...]:
    """The leading system/developer messages as (role, text), the parsed strings themselves."""
    head: list[tuple[str, str]] = []
    for m in messages:
        if m.role not in HEAD_ROLES:
            break
        content = m.content
        if isinstance(content, str):
            head.append((m.role, content))
        elif content:
            head.append((m.role, "".join(p.text for p in content if p.text)))
    return tuple(head)


def is_inference_path(path: str) -> bool:
    return path.endswith(COMPLETIONS_SUFFIXES) or path.endswith(CHAT_SUFFIXES)


def parse_openai(request: LLMRequest, *, head: bool = False) -> None:
    """Fill the routing fields of `request` from its OpenAI body; ParseError when invalid.
    With `head`, also a chat's leading system/developer messages (for hot-prompt learning)."""
    try:
        view = _decoder.decode(request.body)
    except msgspec.ValidationError as exc:
        raise ParseError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ParseError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ParseError("request body is nested too deeply") from None
    if not view.model:
        raise ParseError("model not found in request body")
    chat = request.path.endswith(CHAT_SUFFIXES)
    if chat:
        if view.messages is None:
            raise ParseError("chat completions need a 'messages' list")
        request.prompt_bytes = [_chat_prompt(view.messages, view.tools)]
        request.media_items = sum(
            p.type in MEDIA_PART_TYPES
            for m in view.messages
            if isinstance(m.content, list)
            for p in m.content
        )
        if head:
            request.head = _chat_head(view.messages)
    else:
        if view.prompt is None:
            raise ParseError("completions need a 'prompt'")
        request.prompt_bytes = _completion_prompts(view.prompt)
    request.model = view.model
    request.target_model = request.target_model or view.model
    request.stream = bool(view.stream)
    request.max_tokens = (
        view.max_completion_tokens if view.max_completion_tokens is not None else view.max_tokens
    )
    request.cache_salt = view.cache_salt or ""
    request.prompt_tokens = sum((len(b) + 3) // 4 for b in request.prompt_bytes)
    request.parsed = True


def rewrite_model(body: bytes, target: str) -> bytes:
    """The body with its `model` replaced (for x-llm-d-model-name-rewrite)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:  # pragma: no cover - parse_openai already checked
        raise DecodeError(str(exc)) from None
    obj["model"] = target
    return _encoder.encode(obj)
