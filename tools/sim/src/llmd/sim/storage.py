"""A shared filesystem KV tier (llmd-fs-offload) for simulated engines.

Every engine of one storage domain in this process shares one `StorageTier`: a volume of
`capacity_blocks` blocks, least recently used out. An engine stores the full blocks of each
prompt as it computes them (vLLM offloads prompt blocks), and before computing a prompt looks up
the blocks after its GPU prefix hit: consecutive stored blocks are loaded, taking
`latency + bytes / read bandwidth` off the GPU, instead of being prefilled. Stores and evictions
are published as `BlockStored` / `BlockRemoved` with medium `STORAGE` and ownership
`fs:<domain>`, as the real tier and its evictor do, so llmd's index credits the whole domain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from llmd.runtime.config import StrictModel

OWNERSHIP_PREFIX = "fs:"


class StorageConfig(StrictModel):
    """The simulated shared volume an engine mounts."""

    domain: str = Field(min_length=1, description="engines with the same domain share files")
    capacity_tokens: int = Field(default=10_000_000, gt=0, description="KV tokens the volume holds")
    read_gbps: float = Field(default=10.0, gt=0, description="load bandwidth per engine, GB/s")
    latency_ms: float = Field(default=1.0, ge=0, description="per-load latency")
    kv_bytes_per_token: int = Field(
        default=131_072, gt=0, description="KV bytes per token (Llama-3.1-8B bf16: 131,072)"
    )


class StorageTier:
    def __init__(self, config: StorageConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.capacity_blocks = max(1, config.capacity_tokens // block_size)
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self.stored = 0
        self.evicted = 0
        self.loads = 0
        self.loaded_blocks = 0

    @property
    def ownership(self) -> str:
        return OWNERSHIP_PREFIX + self.config.domain

    def __len__(self) -> int:
        return len(self._blocks)

    def consecutive(self, hashes: Sequence[bytes], start: int, end: int) -> int:
        """How many of hashes[start:end] are stored, from `start`, without a gap."""
        n = 0
        for h in hashes[start:end]:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        return n

    def store(self, hashes: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Store blocks (already stored ones are only refreshed); (stored, evicted)."""
        stored: list[bytes] = []
        evicted: list[bytes] = []
        for h in hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
                continue
            self._blocks[h] = None
            stored.append(h)
            if len(self._blocks) > self.capacity_blocks:
                old, _ = self._blocks.popitem(last=False)
                evicted.append(old)
        self.stored += len(stored)
        self.evicted += len(evicted)
        return stored, evicted

    def load_seconds(self, blocks: int) -> float:
        c = self.config
        nbytes = blocks * self.block_size * c.kv_bytes_per_token
        return c.latency_ms / 1000 + nbytes / (c.read_gbps * 1e9)


_TIERS: dict[str, StorageTier] = {}


def shared_tier(config: StorageConfig, block_size: int) -> StorageTier:
    """The tier of `config.domain` in this process (created by its first engine)."""
    tier = _TIERS.get(config.domain)
    if tier is None:
        tier = _TIERS[config.domain] = StorageTier(config, block_size)
    elif tier.config != config or tier.block_size != block_size:
        raise ValueError(
            f"storage domain {config.domain!r}: engines disagree on its settings "
            f"({tier.config} with block {tier.block_size} vs {config} with block {block_size})"
        )
    return tier


def forget_tiers() -> None:
    """Drop every domain's tier (a new fleet starts with empty volumes)."""
    _TIERS.clear()
