"""vLLM KV-cache events: typed events, the batch codec and the topic convention.

On the wire (vLLM 0.32) a ZMQ multipart message is `[topic, seq (8 bytes BE), payload]` and the
payload is a msgpack array `[ts, events, data_parallel_rank]`. Each event is a msgpack map tagged
by `"type"` (0.32) or, from older vLLM, a positional array `[type, field1, field2, ...]`. The
decoder accepts both, tolerates absent trailing fields and unknown keys, and accepts hashes as
u64 ints or as `bin` digests. The encoder writes the 0.32 map form byte-for-byte as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec

from llmd.protocol.errors import DecodeError, TopicError

BlockHash: TypeAlias = int | bytes
"""A block hash as published: a u64 (default) or the raw digest bytes."""

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)
"""Replay end marker sent by vLLM's ROUTER socket after the last buffered batch."""

_U64_MASK = (1 << 64) - 1


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks that became cached (one event per newly full run of blocks of one KV group)."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks evicted from a tier (vLLM sends one event per evicted hash)."""

    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """The engine dropped its whole prefix cache (reset_prefix_cache)."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class _WireBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One decoded payload: the events of one engine step."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    unknown_events: int = 0
    """Events of a type this decoder does not know (skipped, counted)."""


# Positional field order of the legacy array encoding (= 0.32 declaration order).
BLOCK_STORED_FIELDS: tuple[str, ...] = tuple(BlockStored.__struct_fields__)
BLOCK_REMOVED_FIELDS: tuple[str, ...] = tuple(BlockRemoved.__struct_fields__)

_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def to_u64(block_hash: BlockHash) -> int:
    """The 64-bit form of a published hash: ints as is, digests by their last 8 bytes (BE)."""
    if isinstance(block_hash, int):
        return block_hash & _U64_MASK
    return int.from_bytes(block_hash[-8:], "big")


# --- decoding -------------------------------------------------------------------------------


def _hash(value: Any, where: str) -> BlockHash:
    if type(value) is int:
        if 0 <= value <= _U64_MASK:
            return value
        raise DecodeError(f"{where}: hash {value} is not an unsigned 64-bit integer")
    if isinstance(value, bytes):
        return value
    raise DecodeError(f"{where}: hash must be int or bytes, got {type(value).__name__}")


def _hash_list(value: Any, where: str) -> list[BlockHash]:
    if not isinstance(value, list):
        raise DecodeError(f"{where}: expected a list of hashes, got {type(value).__name__}")
    # Fast path: vLLM's default is a list of u64 ints.
    for h in value:
        if type(h) is not int or h < 0 or h > _U64_MASK:
            return [_hash(h, where) for h in value]
    return value


def _opt_hash(value: Any, where: str) -> BlockHash | None:
    return None if value is None else _hash(value, where)


def _int_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"{where}: expected a list of ints, got {type(value).__name__}")
    for t in value:
        if type(t) is not int:
            raise DecodeError(f"{where}: token ids must be ints, got {type(t).__name__}")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    if value is None or type(value) is int:
        return value
    raise DecodeError(f"{where}: expected int or nil, got {type(value).__name__}")


def _int(value: Any, where: str, default: int) -> int:
    if value is None:
        return default
    if type(value) is int:
        return value
    raise DecodeError(f"{where}: expected int, got {type(value).__name__}")


def _opt_str(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"{where}: expected str or nil, got {type(value).__name__}")


def _extra_keys(value: Any, where: str) -> list[tuple[Any, ...] | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DecodeError(f"{where}: expected a list, got {type(value).__name__}")
    out: list[tuple[Any, ...] | None] = []
    for item in value:
        if item is None:
            out.append(None)
        elif isinstance(item, list | tuple):
            out.append(tuple(tuple(k) if isinstance(k, list) else k for k in item))
        else:
            raise DecodeError(f"{where}: per-block extra keys must be arrays or nil")
    return out


def _block_stored(f: dict[str, Any], where: str) -> BlockStored:
    get = f.get
    return BlockStored(
        block_hashes=_hash_list(get("block_hashes", []), f"{where}.block_hashes"),
        parent_block_hash=_opt_hash(get("parent_block_hash"), f"{where}.parent_block_hash"),
        token_ids=_int_list(get("token_ids"), f"{where}.token_ids"),
        block_size=_int(get("block_size"), f"{where}.block_size", 0),
        lora_id=_opt_int(get("lora_id"), f"{where}.lora_id"),
        medium=_opt_str(get("medium"), f"{where}.medium"),
        lora_name=_opt_str(get("lora_name"), f"{where}.lora_name"),
        extra_keys=_extra_keys(get("extra_keys"), f"{where}.extra_keys"),
        group_idx=_opt_int(get("group_idx"), f"{where}.group_idx"),
        kv_cache_spec_kind=_opt_str(get("kv_cache_spec_kind"), f"{where}.kv_cache_spec_kind"),
        kv_cache_spec_sliding_window=_opt_int(
            get("kv_cache_spec_sliding_window"), f"{where}.kv_cache_spec_sliding_window"
        ),
        locality=_opt_str(get("locality"), f"{where}.locality"),
        ownership=_opt_str(get("ownership"), f"{where}.ownership"),
        session_id=_opt_str(get("session_id"), f"{where}.session_id"),
    )


def _block_removed(f: dict[str, Any], where: str) -> BlockRemoved:
    get = f.get
    return BlockRemoved(
        block_hashes=_hash_list(get("block_hashes", []), f"{where}.block_hashes"),
        medium=_opt_str(get("medium"), f"{where}.medium"),
        group_idx=_opt_int(get("group_idx"), f"{where}.group_idx"),
        locality=_opt_str(get("locality"), f"{where}.locality"),
        ownership=_opt_str(get("ownership"), f"{where}.ownership"),
    )


def _all_cleared(f: dict[str, Any], where: str) -> AllBlocksCleared:
    return AllBlocksCleared()


_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], str], KVEvent]]] = {
    "BlockStored": (BLOCK_STORED_FIELDS, _block_stored),
    "BlockRemoved": (BLOCK_REMOVED_FIELDS, _block_removed),
    "AllBlocksCleared": ((), _all_cleared),
}


def _event(raw: Any, where: str) -> KVEvent | None:
    """Decode one event; None for an event type this decoder does not know."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw:
        tag = raw[0]
        fields = None
    else:
        raise DecodeError(f"{where}: an event must be a map or a non-empty array")
    if not isinstance(tag, str):
        raise DecodeError(f"{where}: event type must be a string, got {type(tag).__name__}")
    spec = _BUILDERS.get(tag)
    if spec is None:
        return None
    names, build = spec
    if fields is None:
        fields = dict(zip(names, raw[1:], strict=False))
    return build(fields, f"{where}({tag})")


def decode_batch(payload: bytes | bytearray | memoryview) -> EventBatch:
    """Decode one KV-event payload. Raises DecodeError (and only that) on bad input."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        raise DecodeError(f"payload is not valid msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise DecodeError("payload must be an array [ts, events, data_parallel_rank]")
    ts, raw_events = raw[0], raw[1]
    if type(ts) is int:
        ts = float(ts)
    if not isinstance(ts, float):
        raise DecodeError(f"batch ts must be a number, got {type(ts).__name__}")
    if not isinstance(raw_events, list):
        raise DecodeError(f"batch events must be an array, got {type(raw_events).__name__}")
    rank = _opt_int(raw[2] if len(raw) > 2 else None, "batch.data_parallel_rank")
    events: list[KVEvent] = []
    unknown = 0
    for i, item in enumerate(raw_events):
        event = _event(item, f"events[{i}]")
        if event is None:
            unknown += 1
        else:
            events.append(event)
    return EventBatch(ts=ts, events=events, data_parallel_rank=rank, unknown_events=unknown)


# --- encoding -------------------------------------------------------------------------------


def encode_batch(batch: EventBatch) -> bytes:
    """Encode in vLLM 0.32's form: outer array, map-encoded events tagged by "type"."""
    return _encoder.encode(_WireBatch(batch.ts, batch.events, batch.data_parallel_rank))


def encode_batch_legacy(batch: EventBatch) -> bytes:
    """Encode in the pre-0.32 positional-array form (all fields present), for compat tests."""
    events: list[list[Any]] = []
    for ev in batch.events:
        names = ev.__struct_fields__
        events.append([type(ev).__name__, *(getattr(ev, n) for n in names)])
    return _encoder.encode([batch.ts, events, batch.data_parallel_rank])


# --- framing and topics ---------------------------------------------------------------------


def encode_seq(seq: int) -> bytes:
    """The 8-byte big-endian sequence frame."""
    return seq.to_bytes(SEQ_BYTES, "big")


def decode_seq(frame: bytes) -> int:
    """Parse the sequence frame; END_SEQ (all ones) decodes to -1."""
    if len(frame) != SEQ_BYTES:
        raise DecodeError(f"sequence frame must be {SEQ_BYTES} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


TOPIC_PREFIX = "kv@"


@dataclass(frozen=True, slots=True)
class KVTopic:
    """The publisher identity carried in the topic frame `kv@<pod>@<model>`."""

    pod: str
    model: str

    def __str__(self) -> str:
        return f"{TOPIC_PREFIX}{self.pod}@{self.model}"

    def encode(self) -> bytes:
        return str(self).encode()


def format_topic(pod: str, model: str) -> str:
    """Build a topic; the pod id must not contain '@' (the model name may)."""
    if not pod or "@" in pod:
        raise TopicError(f"pod id {pod!r} must be non-empty and contain no '@'")
    if not model:
        raise TopicError("model name must be non-empty")
    return f"{TOPIC_PREFIX}{pod}@{model}"


def parse_topic(topic: str | bytes) -> KVTopic:
    """Split `kv@<pod>@<model>`; model names may contain '/' and '@' (llm-d rejects the latter)."""
    if isinstance(topic, bytes | bytearray | memoryview):
        try:
            topic = bytes(topic).decode("utf-8")
        except UnicodeDecodeError:
            raise TopicError("topic is not valid UTF-8") from None
    if not topic.startswith(TOPIC_PREFIX):
        raise TopicError(f"topic {topic!r} does not start with {TOPIC_PREFIX!r}")
    pod, sep, model = topic[len(TOPIC_PREFIX) :].partition("@")
    if not sep or not pod or not model:
        raise TopicError(f"topic {topic!r} is not of the form kv@<pod>@<model>")
    return KVTopic(pod=pod, model=model)
