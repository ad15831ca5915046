"""The request transformations of P/D disaggregation with vLLM's NixlConnector, and of the
encoder stage of E/P/D (pure).

The prefill leg is the client's request, non-streaming, capped to one token, with
`kv_transfer_params` asking the prefill engine to keep the KV for a remote decode. The decode
leg is the client's request unchanged except for `kv_transfer_params`: the prefill answer's
object, verbatim (the sidecar never interprets it; vLLM 0.32's shape has nested block lists and
a mandatory `remote_request_id`). Both are llm-d pd-sidecar's `nixlv2` flow.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Literal

Api = Literal["chat", "responses", "generate"]

PREFILLER_HEADER = "x-prefiller-host-port"
REQUEST_ID_HEADER = "x-request-id"
ENCODER_HEADER = "x-encoder-hosts-ports"
"""The encode pods the scheduler picked (E/P/D), comma-separated."""
DP_HEADER = "x-data-parallel-host-port"
"""The rank the scheduler picked, when it sends a data-parallel pod's requests to rank 0."""
ROUTES: dict[str, Api] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "responses",
    "/inference/v1/generate": "generate",
}
"""The intercepted POST routes and how their token limits are named."""
LIMITS: dict[Api, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens", "min_tokens"),
    "responses": ("max_output_tokens",),
    "generate": ("max_tokens", "min_tokens"),
}
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_targets(values: Iterable[str]) -> list[str]:
    """The `host:port`s of the prefiller header (repeated, or comma-separated; trimmed; a
    leading `http://` dropped, as llm-d does, and `https://` too: the scheme of the prefill leg
    is the sidecar's `--enable-tls` choice, and a kept prefix made `http://https://host:port`)."""
    out = []
    for value in values:
        for part in value.split(","):
            p = part.strip()
            for scheme in ("http://", "https://"):
                if p[: len(scheme)].lower() == scheme:
                    p = p[len(scheme) :]
                    break
            if p:
                out.append(p)
    return out


def choose(targets: list[str], sampling: bool, rng: random.Random | None = None) -> str:
    """The first target, or a uniformly random one with prefiller sampling on."""
    if sampling and len(targets) > 1:
        return (rng or random).choice(targets)
    return targets[0]


def target_host(target: str) -> str:
    """The host of `host:port` (IPv6 in brackets), as the allowlist compares it."""
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    host, sep, _ = target.rpartition(":")
    return host if sep else target


def prefill_body(doc: dict[str, Any], api: Api) -> dict[str, Any]:
    """The prefill leg's body: non-streaming, one token, KV kept for a remote decode."""
    # shallow: only top-level keys (and generate's sampling_params) change, and the prompt or
    # messages, the bulk of a request, are shared with the client's document
    p = dict(doc)
    p["kv_transfer_params"] = dict(REMOTE_DECODE)
    p["stream"] = False
    p.pop("stream_options", None)
    if api == "generate":
        params = p.get("sampling_params")
        target = p["sampling_params"] = dict(params) if isinstance(params, dict) else {}
    else:
        target = p
    for name in LIMITS[api]:
        target[name] = 1
    return p


def decode_body(doc: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The decode leg's body: the client's request with the prefill's `kv_transfer_params`
    verbatim (None when the prefill returned none: the decoder then prefills locally)."""
    d = dict(doc)
    d["kv_transfer_params"] = prefill_answer.get("kv_transfer_params")
    return d


def cached_tokens(answer: dict[str, Any]) -> int:
    usage = answer.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


MEDIA_TYPES = frozenset({"image_url", "audio_url", "video_url", "input_audio", "input_image"})
"""Content parts an encoder turns into embeddings."""
ENCODER_FIELDS = ("model", "mm_processor_kwargs", "media_io_kwargs")
"""Client fields an encoder request keeps: the kwargs change the media's processing, and so
the hash under which vLLM stores and looks up its encoder output."""
ENCODER_PATHS: dict[Api, str] = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


def media_items(doc: dict[str, Any], api: Api) -> list[dict[str, Any]]:
    """Every multimodal content part of a chat's messages (or a Responses request's input
    items), in order, repeats included (each is its own encoder item, as vLLM hashes it)."""
    turns = doc.get("input") if api == "responses" else doc.get("messages")
    if api not in ENCODER_PATHS or not isinstance(turns, list):
        return []
    out: list[dict[str, Any]] = []
    for turn in turns:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            out.extend(
                part
                for part in content
                if isinstance(part, dict) and part.get("type") in MEDIA_TYPES
            )
    return out


def encoder_body(doc: dict[str, Any], part: dict[str, Any], api: Api) -> dict[str, Any]:
    """One item's encoder request: the passthrough fields and one user turn holding only
    `part`, capped to one output token (llm-d's priming request)."""
    body = {k: doc[k] for k in ENCODER_FIELDS if k in doc}
    turn = {"role": "user", "content": [part]}
    if api == "responses":
        body["input"] = [turn]
        body["max_output_tokens"] = 1
    else:
        body["messages"] = [turn]
        body["max_tokens"] = 1
    return body
