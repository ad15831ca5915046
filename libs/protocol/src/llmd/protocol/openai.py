"""The OpenAI API essentials llmd reads and writes, with vLLM 0.32's extensions.

Requests are parsed leniently (unknown fields are kept by the caller's raw body, ignored here)
but typed strictly where llmd relies on a field. Responses mirror vLLM's field sets so that a
simulator built on these types is indistinguishable from vLLM to an OpenAI client.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import msgspec

from llmd.protocol.errors import DecodeError, ProtocolError

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
SSE_DONE = b"data: [DONE]\n\n"


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct, omit_defaults=True):
    """One part of a multi-part chat message (text, image_url, ...)."""

    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    """`{"url": ...}` on an image_url part; the URL itself on an input_image part."""
    audio_url: dict[str, Any] | None = None
    video_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None

    def media(self) -> Any:
        """The part's media reference (URL object or inline data), None for a text part."""
        if self.type not in MEDIA_PART_TYPES:
            return None
        return self.image_url or self.audio_url or self.video_url or self.input_audio


MEDIA_PART_TYPES = frozenset({"image_url", "audio_url", "video_url", "input_audio", "input_image"})
"""Chat content parts an encoder turns into embeddings (vLLM's multimodal inputs)."""


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text content (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


Prompt: TypeAlias = str | list[Any]
"""A text, a list of texts, a list of token ids, or a list of token-id lists (checked on parse)."""


class _RequestCommon(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str | None = None
    """vLLM serves its one base model when a request names none."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    """Where each multimodal item's encoder output can be read, by mm hash (E/P/D)."""
    priority: int | None = None
    user: str | None = None


class CompletionRequest(_RequestCommon, kw_only=True):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists (one entry per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(type(t) is int for t in p):
            return [p]
        return list(p)


class ChatCompletionRequest(_RequestCommon, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


InferenceRequest: TypeAlias = CompletionRequest | ChatCompletionRequest


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = 0
    created_cache_tokens: int | None = None
    multimodal_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: dict[str, Any] | None = None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (0 when the server did not say)."""
        d = self.prompt_tokens_details
        return d.cached_tokens or 0 if d is not None else 0


FinishReason: TypeAlias = Literal["stop", "length", "abort", "error", "repetition"] | None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: Any = None
    prompt_token_ids: list[int] | None = None
    routed_experts: Any = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"
    service_tier: str | None = None
    system_fingerprint: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: Any = None


class ChatResponseMessage(msgspec.Struct):
    role: str
    content: str | None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    tool_calls: list[Any] = msgspec.field(default_factory=list)
    reasoning: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: Any = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    object: str = "chat.completion"
    service_tier: str | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: Any = None
    prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None


class CompletionStreamChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionChunk(msgspec.Struct):
    """One SSE event of a streamed completion (`choices` empty on the final usage chunk)."""

    id: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    object: str = "text_completion"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: Any = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None


class NixlTransferParams(msgspec.Struct, omit_defaults=False):
    """`kv_transfer_params` as vLLM 0.32's NixlConnector returns them from a prefill leg.

    Routers must forward the dict verbatim; this type exists to check shapes and to let the
    simulator produce the same keys.
    """

    do_remote_prefill: bool
    do_remote_decode: bool
    remote_block_ids: list[list[int]] | None
    remote_engine_id: str | None
    remote_request_id: str | None
    remote_host: str | None
    remote_port: int | None
    tp_size: int = 1
    dcp_size: int = 1
    pp_size: int = 1
    remote_num_tokens: int | None = None
    remote_blocks_expiry_time: float | None = None
    transfer_mode: str = "pull"
    remote_prefill_cached_tokens: int | None = None


NIXL_DECODE_REQUIRED = (
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
)
"""Fields a decode leg needs, or vLLM falls back to a local prefill."""

PREFILL_REQUEST_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""What a P/D router sends to a prefill leg as `kv_transfer_params`."""


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: int = 400


class ErrorResponse(msgspec.Struct):
    """vLLM's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_json_encoder = msgspec.json.Encoder()


def parse_request(path: str, body: bytes) -> InferenceRequest:
    """Parse an inference request body for `path`; ProtocolError says what is wrong and where."""
    if path.startswith(CHAT_COMPLETIONS_PATH):
        decoder: msgspec.json.Decoder[Any] = _chat_decoder
    elif path.startswith(COMPLETIONS_PATH):
        decoder = _completion_decoder
    else:
        raise ProtocolError(f"unsupported inference path {path!r}")
    try:
        request: InferenceRequest = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("request body is nested too deeply") from None
    if isinstance(request, CompletionRequest):
        _check_prompt(request.prompt)
    if request.stream_options is not None and not request.stream:
        raise ProtocolError("stream_options can only be set when stream is true")
    return request


def _check_prompt(prompt: Prompt) -> None:
    if isinstance(prompt, str):
        return
    if not prompt:
        raise ProtocolError("prompt must not be empty")
    if all(type(t) is int for t in prompt) or all(isinstance(t, str) for t in prompt):
        return
    for item in prompt:
        if not isinstance(item, list) or not all(type(t) is int for t in item):
            raise ProtocolError(
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of token-id lists"
            )


def error_body(
    message: str, *, kind: str = "BadRequestError", code: int = 400, param: str | None = None
) -> bytes:
    """A vLLM-style error response body (every llmd component builds its errors here)."""
    info = ErrorInfo(message=message, type=kind, param=param, code=code)
    return _json_encoder.encode(ErrorResponse(info))


def encode_json(obj: Any) -> bytes:
    return _json_encoder.encode(obj)


def sse_event(obj: Any) -> bytes:
    """One server-sent event as vLLM writes it: `data: <json>\\n\\n`."""
    return b"data: " + _json_encoder.encode(obj) + b"\n\n"


def iter_sse_data(stream: bytes) -> list[bytes]:
    """The `data:` payloads of a complete SSE body, `[DONE]` included."""
    out: list[bytes] = []
    for block in stream.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def decode_usage(obj: dict[str, Any]) -> Usage | None:
    """The `usage` of a decoded response or chunk, or None."""
    raw = obj.get("usage")
    if raw is None:
        return None
    try:
        return msgspec.convert(raw, Usage)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid usage object: {exc}") from None


USAGE_TAIL_BYTES = 64 * 1024
"""How much of a streamed response's end is kept to find its usage chunk."""
USAGE_BODY_LIMIT = 4 * 1024 * 1024
"""A non-streamed body larger than this is not kept for its usage."""


def usage_from_body(body: bytes, stream: bool) -> Usage | None:
    """The usage of a whole JSON response, or of the last SSE chunk that carries one (the tail
    of a stream is enough); None when there is none or it does not decode. Never raises: the
    body comes from an upstream, and a bad one must not stop the request's accounting."""
    try:
        if not stream:
            obj = msgspec.json.decode(body)
            return decode_usage(obj) if isinstance(obj, dict) else None
        for block in reversed(body.split(b"\n\n")):
            line = block.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]" or b'"usage"' not in payload:
                continue
            obj = msgspec.json.decode(payload)
            usage = decode_usage(obj) if isinstance(obj, dict) else None
            if usage is not None:
                return usage
    except (msgspec.DecodeError, DecodeError, RecursionError, UnicodeDecodeError, ValueError):
        return None
    return None


class UsageTail:
    """Keeps what is needed of a response, chunk by chunk, to read its usage at the end:
    the last `USAGE_TAIL_BYTES` of a stream, or a whole body up to `USAGE_BODY_LIMIT`."""

    __slots__ = ("_buf", "keeping", "stream")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.keeping = True
        self._buf = bytearray()

    def add(self, chunk: bytes) -> None:
        if not self.keeping:
            return
        self._buf += chunk
        if self.stream:
            if len(self._buf) > USAGE_TAIL_BYTES:
                del self._buf[: len(self._buf) - USAGE_TAIL_BYTES]
        elif len(self._buf) > USAGE_BODY_LIMIT:
            self.keeping = False
            self._buf = bytearray()

    def usage(self) -> Usage | None:
        return usage_from_body(bytes(self._buf), self.stream) if self.keeping else None
