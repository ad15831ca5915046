"""A shared filesystem KV tier (llmd-fs-offload) for simulated engines.

Every engine of one storage domain in this process shares one `StorageTier`: a volume of
`capacity_blocks` blocks, least recently used out. An engine stores the full blocks of each
prompt as it computes them (vLLM offloads prompt blocks), and before computing a prompt looks up
the blocks after its GPU prefix hit: consecutive stored blocks are loaded, taking
`latency + bytes / read bandwidth` off the GPU, instead of being prefilled. Stores and evictions
are published as `BlockStored` / `BlockRemoved` with medium `STORAGE` and ownership
`fs:<domain>`, as the real tier and its evictor do, so llmd's index credits the whole domain.

Bandwidth is a pipe per direction: each engine's link (`read_gbps`, `write_gbps`) and, when set,
the volume's own limit shared by every engine of the domain (`volume_read_gbps`,
`volume_write_gbps`). A transfer starts when its pipes are free (first come, first served), so
concurrent loads queue behind each other as they do on a saturated link. A store waits for the
write pipes; if it would wait longer than `max_write_queued_s` it is dropped (the real tier's
back-pressure, counted), and a stored block becomes visible (looked up, announced) only once its
write has finished.

With `dir` set, the volume is also shared between processes (the local stack runs one process
per engine): every store and eviction is appended to `<dir>/<domain>.blocks`, and each process
reads the lines it has not seen before every lookup and store. Each process keeps its own
least-recently-used order of the shared blocks; an eviction one process makes is seen by all.
The volume's shared bandwidth limits (`volume_*_gbps`) stay per process.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import Field

from llmd.runtime.config import StrictModel

OWNERSHIP_PREFIX = "fs:"


class StorageConfig(StrictModel):
    """The simulated shared volume an engine mounts."""

    domain: str = Field(min_length=1, description="engines with the same domain share files")
    capacity_tokens: int = Field(default=10_000_000, gt=0, description="KV tokens the volume holds")
    read_gbps: float = Field(default=10.0, gt=0, description="load bandwidth per engine, GB/s")
    write_gbps: float = Field(default=10.0, gt=0, description="store bandwidth per engine, GB/s")
    volume_read_gbps: float | None = Field(
        default=None, gt=0, description="the volume's read bandwidth shared by its engines"
    )
    volume_write_gbps: float | None = Field(
        default=None, gt=0, description="the volume's write bandwidth shared by its engines"
    )
    max_write_queued_s: float = Field(
        default=30.0, ge=0, description="a store queued longer is dropped (0: never dropped)"
    )
    latency_ms: float = Field(default=1.0, ge=0, description="per-load latency")
    kv_bytes_per_token: int = Field(
        default=131_072, gt=0, description="KV bytes per token (Llama-3.1-8B bf16: 131,072)"
    )
    dir: str | None = Field(
        default=None,
        min_length=1,
        description="share the volume with engines in other processes through this directory",
    )


class StoreResult(NamedTuple):
    stored: list[bytes]
    """Blocks newly stored (visible once `done`)."""
    evicted: list[bytes]
    """Announced blocks pushed out to make room."""
    done: float
    """When the write finishes."""
    dropped: bool
    """The write queue was too long: nothing stored."""


class StorageTier:
    def __init__(self, config: StorageConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.capacity_blocks = max(1, config.capacity_tokens // block_size)
        self._blocks: OrderedDict[bytes, float] = OrderedDict()
        """Block -> the simulated time its write finishes (it is found from then on)."""
        self.stored = 0
        self.evicted = 0
        self.loads = 0
        self.loaded_blocks = 0
        self.dropped_stores = 0
        self._read_free_at = 0.0
        self._write_free_at = 0.0
        self._log: int | None = None
        self._log_pos = 0
        if config.dir is not None:
            os.makedirs(config.dir, exist_ok=True)
            path = os.path.join(config.dir, f"{config.domain}.blocks")
            self._log = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    def close(self) -> None:
        if self._log is not None:
            os.close(self._log)
            self._log = None

    def _sync(self) -> None:
        """Apply the shared log's lines this process has not read yet (`+ HASH DONE` stored,
        `- HASH` evicted); a line still being written is left for the next read."""
        if self._log is None:
            return
        chunks: list[bytes] = []
        at = self._log_pos
        while chunk := os.pread(self._log, 1 << 20, at):
            chunks.append(chunk)
            at += len(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1
        self._log_pos += end
        for line in data[:end].splitlines():
            op, _, rest = line.partition(b" ")
            if op == b"+":
                h, _, done = rest.partition(b" ")
                key = bytes.fromhex(h.decode())
                self._blocks[key] = float(done)
                self._blocks.move_to_end(key)
                if len(self._blocks) > self.capacity_blocks:
                    self._blocks.popitem(last=False)
            elif op == b"-":
                self._blocks.pop(bytes.fromhex(rest.decode()), None)

    def _append(self, stored: Sequence[bytes], done: float, evicted: Sequence[bytes]) -> None:
        if self._log is None:
            return
        lines = [f"+ {h.hex()} {done!r}\n" for h in stored]
        lines += [f"- {h.hex()}\n" for h in evicted]
        os.write(self._log, "".join(lines).encode())  # one O_APPEND write: never interleaved

    @property
    def ownership(self) -> str:
        return OWNERSHIP_PREFIX + self.config.domain

    def __len__(self) -> int:
        return len(self._blocks)

    def consecutive(self, hashes: Sequence[bytes], start: int, end: int, now: float) -> int:
        """How many of hashes[start:end] are stored (written by `now`), from `start`, without
        a gap."""
        self._sync()
        n = 0
        for h in hashes[start:end]:
            ready = self._blocks.get(h)
            if ready is None or ready > now:
                break
            self._blocks.move_to_end(h)
            n += 1
        return n

    def store(
        self, hashes: Sequence[bytes], now: float = 0.0, link_free_at: float = 0.0
    ) -> StoreResult:
        """Store blocks (already stored ones are only refreshed). A store that would queue
        past `max_write_queued_s` stores nothing (counted in `dropped_stores`)."""
        self._sync()
        stored: list[bytes] = []
        evicted: list[bytes] = []
        removed: list[bytes] = []
        new = []
        for h in hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                new.append(h)
        if not new:
            return StoreResult(stored, evicted, now, False)
        c = self.config
        nbytes = len(new) * self.block_size * c.kv_bytes_per_token
        start = max(now, link_free_at)
        if c.volume_write_gbps is not None:
            start = max(start, self._write_free_at)
        if c.max_write_queued_s and start - now > c.max_write_queued_s:
            self.dropped_stores += 1
            return StoreResult(stored, evicted, now, True)
        done = start + nbytes / (c.write_gbps * 1e9)
        if c.volume_write_gbps is not None:
            self._write_free_at = start + nbytes / (c.volume_write_gbps * 1e9)
            done = max(done, self._write_free_at)
        for h in new:
            self._blocks[h] = done
            stored.append(h)
            if len(self._blocks) > self.capacity_blocks:
                old, ready = self._blocks.popitem(last=False)
                removed.append(old)
                if ready <= now:  # a block still being written was never announced
                    evicted.append(old)
        self.stored += len(stored)
        self.evicted += len(evicted)
        self._append(stored, done, removed)
        return StoreResult(stored, evicted, done, False)

    def written(self, h: bytes, done: float) -> bool:
        """Whether the block whose write finished at `done` is still stored (announce it)."""
        return self._blocks.get(h) == done

    def bytes_of(self, blocks: int) -> int:
        return blocks * self.block_size * self.config.kv_bytes_per_token

    def load_done(self, blocks: int, now: float, link_free_at: float) -> tuple[float, float]:
        """When a load of `blocks` started at `now` finishes, and when the engine's read link
        is free again (it is busy until `link_free_at`)."""
        c = self.config
        nbytes = self.bytes_of(blocks)
        link_done = max(now, link_free_at) + nbytes / (c.read_gbps * 1e9)
        done = link_done
        if c.volume_read_gbps is not None:
            self._read_free_at = max(now, self._read_free_at) + nbytes / (c.volume_read_gbps * 1e9)
            done = max(done, self._read_free_at)
        return done + c.latency_ms / 1000, link_done


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
    """Drop every domain's tier (a new fleet starts with empty volumes; a volume shared through
    a directory keeps its blocks there)."""
    for tier in _TIERS.values():
        tier.close()
    _TIERS.clear()
