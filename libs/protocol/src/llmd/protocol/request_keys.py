"""llm-d's request keys: the index's primary key space, compatible with Go llm-d replicas.

Two chained 64-bit schemes, both seeded by `hash_seed` and the model name:

* `cbor-fnv` (llm-d default): `H(p, toks, x) = FNV-1a-64(canonical CBOR [p, toks, x])`,
  `init = FNV-1a-64(hash_seed)`, `model_init = H(init, nil, model)`,
  `key[0] = H(model_init, chunk0, extra0)`, `key[i] = H(key[i-1], chunk_i, extra_i)`;
  `extra_i` is nil or the block's multimodal ids as `[{"Hash": id}, ...]`.
* `xxh64` (llm-d router): `XXH64(parent u64 LE ‖ tokens u32 LE ‖ per extra: len u64 LE ‖ utf8)`,
  `init = XXH64(hash_seed)`, `model_init = H(init, [], [model])`.

Only full chunks of `block_size` tokens get keys. The CBOR encoding of `[p, toks, nil]` is built
directly from bytes (cbor2 for the token array) rather than through a generic encoder per
block; tests check it against cbor2 and against golden values from Go.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Literal, TypeAlias

import cbor2
import fnv_c
import xxhash

from llmd.protocol.errors import ProtocolError

RequestKeyAlgo: TypeAlias = Literal["cbor-fnv", "xxh64"]
REQUEST_KEY_ALGOS: tuple[RequestKeyAlgo, ...] = ("cbor-fnv", "xxh64")
DEFAULT_BLOCK_SIZE = 16
EMPTY_KEY = 0
"""Key value 0 is llm-d's sentinel for "no parent: start from the model's init key"."""

BlockExtras: TypeAlias = Sequence[Sequence[str] | None] | None
"""Per block: the ids (multimodal hashes, cache salt) mixed into that block's key, or None."""

_fnv = fnv_c.fnv1a_64
_CBOR_NULL = b"\xf6"
_LITTLE = sys.byteorder == "little"
_pack_q = struct.Struct("<Q").pack


def _cbor_uint(value: int) -> bytes:
    """Minimal-length CBOR unsigned integer (major type 0), as canonical encoders write it."""
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return b"\x18" + value.to_bytes(1, "big")
    if value < 0x10000:
        return b"\x19" + value.to_bytes(2, "big")
    if value < 0x100000000:
        return b"\x1a" + value.to_bytes(4, "big")
    return b"\x1b" + value.to_bytes(8, "big")


_TOKEN_TABLE_SIZE = 1 << 18
_token_table: list[bytes] = []


def _cbor_tokens(chunk: Sequence[int]) -> bytes:
    """Canonical CBOR of a list of token ids (what cbor2.dumps writes, ~5x faster): the
    encodings of ids below 2^18 come from a table built on first use."""
    table = _token_table
    if not table:
        table.extend(_cbor_uint(i) for i in range(_TOKEN_TABLE_SIZE))
    n = len(chunk)
    head = bytes((0x80 + n,)) if n < 24 else b"\x98" + bytes((n,)) if n < 256 else None
    if head is None:
        return cbor2.dumps(list(chunk))
    try:
        return head + b"".join([table[t] for t in chunk])
    except (IndexError, TypeError):
        if any(not isinstance(t, int) or t < 0 or t >= 1 << 64 for t in chunk):
            raise ProtocolError("token ids must be unsigned integers below 2^64") from None
        return head + b"".join([_cbor_uint(t) for t in chunk])


def _cbor_extra(extra: Sequence[str] | None) -> bytes:
    if not extra:
        return _CBOR_NULL
    return cbor2.dumps([{"Hash": s} for s in extra], canonical=True)


def _fnv_model_init(hash_seed: str, model: str) -> int:
    init = _fnv(hash_seed.encode())
    key: int = _fnv(b"\x83" + _cbor_uint(init) + _CBOR_NULL + cbor2.dumps(model))
    return key


def _u32_bytes(tokens: Sequence[int]) -> bytes:
    try:
        arr = array("I", tokens)
    except OverflowError:
        raise ProtocolError("token ids must fit in an unsigned 32-bit integer") from None
    if arr.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte "I"
        arr = array("L", tokens)
    if not _LITTLE:  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def _xxh_extra(extra: Sequence[str] | None) -> bytes:
    if not extra:
        return b""
    parts = []
    for s in extra:
        raw = s.encode()
        parts.append(_pack_q(len(raw)) + raw)
    return b"".join(parts)


def _xxh_key(parent: int, token_bytes: bytes, extra_bytes: bytes) -> int:
    return xxhash.xxh64_intdigest(_pack_q(parent) + token_bytes + extra_bytes)


def _xxh_model_init(hash_seed: str, model: str) -> int:
    init = xxhash.xxh64_intdigest(hash_seed.encode())
    return _xxh_key(init, b"", _xxh_extra([model]))


def model_init_key(model: str, hash_seed: str = "", algo: str = "cbor-fnv") -> int:
    """The chain's starting key for a model (the parent of block 0)."""
    if algo == "cbor-fnv":
        return _fnv_model_init(hash_seed, model)
    if algo == "xxh64":
        return _xxh_model_init(hash_seed, model)
    raise ProtocolError(f"unknown request-key algorithm {algo!r}; expected {REQUEST_KEY_ALGOS}")


def request_keys(
    token_ids: Sequence[int],
    model: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    hash_seed: str = "",
    extras: BlockExtras = None,
    parent: int = EMPTY_KEY,
    algo: str = "cbor-fnv",
) -> list[int]:
    """llm-d request keys for every full `block_size` chunk of `token_ids`.

    `parent` continues a chain from an existing key (0 starts at the model's init key).
    """
    if block_size <= 0:
        raise ProtocolError(f"block_size must be positive, got {block_size}")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    if extras is not None and len(extras) < n_blocks:
        raise ProtocolError(f"extras has {len(extras)} entries for {n_blocks} full blocks")
    prev = parent if parent != EMPTY_KEY else model_init_key(model, hash_seed, algo)
    out: list[int] = []
    if algo == "cbor-fnv":
        for i in range(n_blocks):
            chunk = token_ids[i * block_size : (i + 1) * block_size]
            extra = _cbor_extra(extras[i]) if extras is not None else _CBOR_NULL
            prev = _fnv(b"\x83" + _cbor_uint(prev) + _cbor_tokens(chunk) + extra)
            out.append(prev)
        return out
    if algo == "xxh64":
        raw = _u32_bytes(token_ids)
        step = block_size * 4
        for i in range(n_blocks):
            extra = _xxh_extra(extras[i]) if extras is not None else b""
            prev = _xxh_key(prev, raw[i * step : (i + 1) * step], extra)
            out.append(prev)
        return out
    raise ProtocolError(f"unknown request-key algorithm {algo!r}; expected {REQUEST_KEY_ALGOS}")
