"""The KV block pool with prefix caching, modelled on vLLM 0.32's v1/core block pool.

Block 0 is the null block vLLM reserves, so a pool of N blocks has N - 1 usable ones and block
ids in `kv_transfer_params` start at 1, as on vLLM. A block is cached once it is full and
computed; cached blocks whose reference count drops to zero stay in the free queue (LRU order)
and can be hit again until they are reused, which evicts them. Two requests that compute the
same prefix in the same step both cache it (vLLM keeps duplicates), so duplicate BlockStored
and BlockRemoved events happen here as they do on vLLM.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmd.protocol.hashing import ExtraKeys, event_hash, to_event_extra_keys
from llmd.protocol.kv_events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(eq=False, slots=True)
class KVBlock:
    """One physical block: its id, how many requests use it, and its hash once cached."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass(slots=True)
class CacheStats:
    """Prefix-cache counters in tokens, as vLLM counts them."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass(eq=False, slots=True)
class BlockOwner:
    """What the pool needs of a request: its tokens, block hashes and blocks."""

    block_hashes: list[bytes] = field(default_factory=list)
    blocks: list[KVBlock] = field(default_factory=list)
    num_cached_blocks: int = 0
    """Leading blocks of `blocks` that are cached (hit or stored by this request)."""


class BlockPool:
    """Blocks, the free queue, the hash map and the KV events they produce."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[0].ref_cnt = 1  # the null block is never free
        self._free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self._cached: dict[bytes, dict[int, KVBlock]] = {}
        self.stats = CacheStats()
        self.pending_events: list[KVEvent] = []

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the share of usable blocks not in the free queue."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    @property
    def num_cached_hashes(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        entries = self._cached.get(block_hash)
        if not entries:
            return None
        return next(iter(entries.values()))

    def longest_prefix(self, hashes: Sequence[bytes], max_blocks: int) -> list[KVBlock]:
        """Cached blocks for the longest prefix of `hashes`, at most `max_blocks` of them."""
        if not self.enable_caching:
            return []
        hit: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.lookup(h)
            if block is None:
                break
            hit.append(block)
        return hit

    # -- allocation ------------------------------------------------------------------------

    def can_allocate(self, num_new: int, touched: Iterable[KVBlock] = ()) -> bool:
        """Whether `num_new` fresh blocks fit after taking `touched` hits out of the free queue."""
        reclaimed = sum(1 for b in touched if b.ref_cnt == 0)
        return num_new <= len(self._free) - reclaimed

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take cache hits into use (out of the free queue if nobody held them)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        """`n` blocks from the head of the free queue, evicting cached ones (BlockRemoved)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out: list[KVBlock] = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        h = block.block_hash
        assert h is not None
        entries = self._cached.get(h)
        if entries is not None:
            entries.pop(block.block_id, None)
            if not entries:
                del self._cached[h]
        block.block_hash = None
        self.stats.evictions += 1
        self.pending_events.append(BlockRemoved(block_hashes=[event_hash(h)], medium=MEDIUM_GPU))

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Release a request's blocks; the tail goes first into the queue so it is evicted first."""
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # -- caching ---------------------------------------------------------------------------

    def cache_full_blocks(
        self,
        owner: BlockOwner,
        num_full: int,
        tokens: Sequence[int],
        extra_keys: Sequence[ExtraKeys],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        """Cache owner's blocks [num_cached_blocks, num_full) and publish one BlockStored."""
        start = owner.num_cached_blocks
        if not self.enable_caching or num_full <= start:
            owner.num_cached_blocks = max(start, num_full)
            return
        bs = self.block_size
        new_hashes: list[int] = []
        for i in range(start, num_full):
            block = owner.blocks[i]
            h = owner.block_hashes[i]
            if block.block_hash is None:
                block.block_hash = h
                self._cached.setdefault(h, {})[block.block_id] = block
            new_hashes.append(event_hash(h))
        parent = event_hash(owner.block_hashes[start - 1]) if start > 0 else None
        event_extra: list[tuple[Any, ...] | None] = to_event_extra_keys(extra_keys[start:num_full])
        self.pending_events.append(
            BlockStored(
                block_hashes=list(new_hashes),
                parent_block_hash=parent,
                token_ids=list(tokens[start * bs : num_full * bs]),
                block_size=bs,
                lora_id=lora_id,
                medium=MEDIUM_GPU,
                lora_name=lora_name,
                extra_keys=event_extra,
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )
        owner.num_cached_blocks = num_full

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (vLLM refuses while blocks are in use); AllBlocksCleared."""
        if len(self._free) != self.num_blocks - 1:
            return False
        for entries in self._cached.values():
            for block in entries.values():
                block.block_hash = None
        self._cached.clear()
        self.pending_events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self.pending_events = self.pending_events, []
        return events
