"""The approximate prefix index: where this scheduler sent which prompt prefixes.

Hashing follows llm-d's approx-prefix-cache-producer exactly, so indexes and block counts agree:

    h0  = xxh64(target_model || cache_salt)
    for each chunk of `block_size` pseudo-tokens (4 prompt bytes each; the last chunk may be short):
        block_id = xxh64(the chunk's bytes)        # = the little-endian uint32 token array
        h_i      = xxh64(le64(block_id) || le64(h_{i-1}))

Two things differ from llm-d, both deliberate:
* an endpoint's match counts only while its blocks are contiguous from the start (llm-d keeps
  counting a pod past a block it lacks while another pod keeps the chain alive);
* each endpoint's LRU holds the engine's real capacity converted to index blocks
  (num_gpu_blocks x engine block size / index block size) instead of num_gpu_blocks index blocks.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

_xxh = xxhash.xxh64_intdigest
_pack2 = struct.Struct("<QQ").pack

MIN_BLOCK_SIZE_TOKENS = 64
BYTES_PER_TOKEN = 4


def prompt_hashes(
    prompts: Sequence[bytes], model: str, cache_salt: str, block_size: int, max_blocks: int
) -> list[int]:
    """Chained block hashes of every prompt (pseudo-token bytes), at most `max_blocks` each."""
    step = block_size * BYTES_PER_TOKEN
    seed = _xxh((model + cache_salt).encode())
    out: list[int] = []
    for raw in prompts:
        prev = seed
        n = (len(raw) + step - 1) // step
        if max_blocks > 0:
            n = min(n, max_blocks)
        for i in range(n):
            chunk = raw[i * step : (i + 1) * step]
            if len(chunk) % BYTES_PER_TOKEN:
                chunk += b"\0" * (BYTES_PER_TOKEN - len(chunk) % BYTES_PER_TOKEN)
            prev = _xxh(_pack2(_xxh(chunk), prev))
            out.append(prev)
    return out


class ApproxPrefixIndex:
    """hash -> endpoints, with one bounded LRU of hashes per endpoint."""

    def __init__(self, default_capacity: int) -> None:
        self.default_capacity = default_capacity
        self._owners: dict[int, set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._owners)

    @property
    def entries(self) -> int:
        return sum(len(lru) for lru in self._lru.values())

    def set_capacity(self, endpoint: str, blocks: int) -> None:
        self._capacity[endpoint] = max(1, blocks)
        lru = self._lru.get(endpoint)
        if lru is not None:
            self._trim(endpoint, lru)

    def add(self, endpoint: str, hashes: Iterable[int]) -> None:
        """Record that `endpoint` now holds these blocks (most recent last)."""
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        owners = self._owners
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            holders = owners.get(h)
            if holders is None:
                owners[h] = {endpoint}
            else:
                holders.add(endpoint)
        self._trim(endpoint, lru)

    def _trim(self, endpoint: str, lru: OrderedDict[int, None]) -> None:
        capacity = self._capacity.get(endpoint, self.default_capacity)
        while len(lru) > capacity:
            h, _ = lru.popitem(last=False)
            self.evictions += 1
            holders = self._owners.get(h)
            if holders is not None:
                holders.discard(endpoint)
                if not holders:
                    del self._owners[h]

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per endpoint, the number of leading blocks it holds contiguously."""
        owners = self._owners
        if not hashes:
            return {}
        first = owners.get(hashes[0])
        if not first:
            return {}
        active = set(first)
        counts: dict[str, int] = {}
        depth = 1
        for h in hashes[1:]:
            holders = owners.get(h)
            nxt = active & holders if holders else set()
            if nxt != active:
                for ep in active - nxt:
                    counts[ep] = depth
                if not nxt:
                    return counts
                active = nxt
            depth += 1
        for ep in active:
            counts[ep] = depth
        return counts

    def remove_endpoint(self, endpoint: str) -> None:
        lru = self._lru.pop(endpoint, None)
        self._capacity.pop(endpoint, None)
        if lru is None:
            return
        for h in lru:
            holders = self._owners.get(h)
            if holders is not None:
                holders.discard(endpoint)
                if not holders:
                    del self._owners[h]

    def endpoints(self) -> list[str]:
        return list(self._lru)
