"""vLLM 0.32 prefix-cache block hashing, bit for bit.

A block hash is `H((parent_digest or NONE_HASH, tuple(block_token_ids), extra_keys or None))`
where H serialises with pickle protocol 5 (`sha256`, `xxhash`) or canonical CBOR (`sha256_cbor`,
`xxhash_cbor`) and digests with SHA-256 or XXH3-128. NONE_HASH = H(seed) with seed =
PYTHONHASHSEED, else the fixed string "vllm-none-hash" for the SHA-256 algorithms (vLLM draws a
random seed per process for xxhash, which no outsider can reproduce, so we require one).
Only full blocks are hashed. Events carry the 64-bit form: the digest's last 8 bytes, big-endian.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import cbor2
import xxhash

from llmd.protocol.errors import ProtocolError

HashAlgo: TypeAlias = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[HashAlgo, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
ExtraKeys: TypeAlias = tuple[Any, ...] | None
"""One block's extra keys as vLLM builds them, e.g. (("lora", name, path), ("cache_salt", s))."""

_PICKLE_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL on every Python vLLM 0.32 supports
_U64_MASK = (1 << 64) - 1


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()


def _sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _xxh_pickle(obj: object) -> bytes:
    return xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL))


def _xxh_cbor(obj: object) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


_HASH_FNS: dict[str, Callable[[object], bytes]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
    "xxhash": _xxh_pickle,
    "xxhash_cbor": _xxh_cbor,
}


def hash_function(algo: str) -> Callable[[object], bytes]:
    """The serialise-and-digest function vLLM uses for `--prefix-caching-hash-algo algo`."""
    try:
        return _HASH_FNS[algo]
    except KeyError:
        raise ProtocolError(
            f"unknown hash algorithm {algo!r}; expected one of {HASH_ALGOS}"
        ) from None


def none_hash_seed(algo: str, seed: str | None = None) -> str:
    """The seed vLLM hashes into NONE_HASH: explicit, PYTHONHASHSEED, or the fixed default."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if algo.startswith("sha256"):
        return DEFAULT_NONE_HASH_SEED
    raise ProtocolError(
        f"{algo} seeds NONE_HASH randomly per vLLM process unless PYTHONHASHSEED is set; "
        "pass the engines' PYTHONHASHSEED as seed"
    )


def none_hash(algo: str = "sha256", seed: str | None = None) -> bytes:
    """vLLM's NONE_HASH: the parent of the first block of every chain."""
    return hash_function(algo)(none_hash_seed(algo, seed))


def vllm_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: str = "sha256",
    extra_keys: Sequence[ExtraKeys] | None = None,
    seed: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of every full block of `token_ids`, chained as vLLM 0.32 chains them.

    `extra_keys[i]` is block i's extra-key tuple (or None); `parent` continues an existing chain
    (the digest of the block before `token_ids[0]`). Token ids must be Python ints.
    """
    if block_size <= 0:
        raise ProtocolError(f"block_size must be positive, got {block_size}")
    fn = hash_function(algo)
    prev = parent if parent else fn(none_hash_seed(algo, seed))
    n_blocks = len(token_ids) // block_size
    if extra_keys is not None and len(extra_keys) < n_blocks:
        raise ProtocolError(f"extra_keys has {len(extra_keys)} entries for {n_blocks} full blocks")
    tokens = tuple(token_ids)
    out: list[bytes] = []
    for i in range(n_blocks):
        start = i * block_size
        extra = extra_keys[i] if extra_keys is not None else None
        prev = fn((prev, tokens[start : start + block_size], extra))
        out.append(prev)
    return out


def event_hash(digest: bytes) -> int:
    """The 64-bit int vLLM publishes for a digest (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)."""
    return int.from_bytes(digest, "big") & _U64_MASK


@dataclass(frozen=True, slots=True)
class MultiModalItem:
    """One multimodal input's identity and placement in the prompt, as vLLM hashes it."""

    identifier: str
    offset: int
    length: int


def block_extra_keys(
    num_tokens: int,
    block_size: int,
    *,
    lora: tuple[str, str] | None = None,
    mm_items: Sequence[MultiModalItem] = (),
    cache_salt: str | None = None,
) -> list[ExtraKeys]:
    """Per-block extra keys in vLLM 0.32's order: LoRA, multimodal items, cache salt.

    `lora` is (adapter name, adapter path); it goes into every block. Each multimodal item
    overlapping a block contributes ("mm", identifier, offset - block_start). The salt goes into
    block 0 only.
    """
    out: list[ExtraKeys] = []
    for i in range(num_tokens // block_size):
        start, end = i * block_size, (i + 1) * block_size
        keys: list[Any] = []
        if lora is not None:
            keys.append(("lora", lora[0], lora[1]))
        for item in mm_items:
            if item.offset < end and item.offset + item.length > start:
                keys.append(("mm", item.identifier, item.offset - start))
        if cache_salt is not None and start == 0:
            keys.append(("cache_salt", cache_salt))
        out.append(tuple(keys) if keys else None)
    return out


def to_event_extra_keys(extra_keys: Sequence[ExtraKeys]) -> list[tuple[Any, ...] | None]:
    """The published form of extra keys: mm → (id, rel_offset), others → their bare value.

    The LoRA path is dropped (events carry only the adapter name), as vLLM does.
    """
    out: list[tuple[Any, ...] | None] = []
    for keys in extra_keys:
        if keys is None:
            out.append(None)
            continue
        out.append(tuple(tuple(k[1:]) if k[0] == "mm" else k[1] for k in keys))
    return out
