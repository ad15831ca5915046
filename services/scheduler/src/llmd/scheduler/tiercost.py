"""What a shared-storage KV hit is worth, measured: the storage tier's weight.

A GPU prefix hit saves the whole prefill of its tokens (weight 1.0). A hit on a shared volume
(llmd-fs-offload) saves the prefill but costs a reload, so it is worth

    weight = 1 - reload seconds per token / recompute seconds per token

clamped to [0, 1]: 0 when reading the KV back takes as long as computing it again.

Both costs come from the engines' own counters, read by the scheduler's scrape:

- recompute: `vllm:request_prefill_time_seconds_sum` over
  `vllm:prompt_tokens_by_source_total{source="local_compute"}`, on every endpoint;
- reload: `vllm:kv_offload_load_time_total` over
  `vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`, on endpoints that mount
  a shared volume (the `llmd.ai/storage-domain` label).

Both are what a request waits per token, queueing included. Deltas between scrapes feed sums
that decay with a half-life (default 2 minutes), so the weight follows load changes and an
engine's restart (its counters fall) only drops that one interval. Until both sums hold
`min_tokens` tokens the prior weight is used, and the source says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmd.protocol.metrics import EngineSnapshot

MAX_TRACKED_ENDPOINTS = 4096


@dataclass(frozen=True, slots=True)
class _Counters:
    prefill_s: float
    computed: float
    load_s: float
    external: float


@dataclass(frozen=True, slots=True)
class StorageCost:
    weight: float
    source: str
    """"measured", or "prior" while there is too little evidence."""
    reload_s_per_token: float | None
    recompute_s_per_token: float | None


class StorageWeightEstimator:
    def __init__(
        self, *, prior: float = 0.8, half_life_s: float = 120.0, min_tokens: float = 2048
    ) -> None:
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior weight {prior} is not in [0, 1]")
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.prior = prior
        self.half_life_s = half_life_s
        self.min_tokens = min_tokens
        self._last: dict[str, _Counters] = {}
        self._sums = [0.0, 0.0, 0.0, 0.0]  # prefill_s, computed, load_s, external
        self._at: float | None = None
        self.resets = 0
        """Counter decreases seen (an engine restarted); that interval is skipped."""

    def observe(self, now: float, snapshots: list[tuple[str, EngineSnapshot, bool]]) -> StorageCost:
        """Fold in the endpoints' latest snapshots: (key, snapshot, mounts a shared volume).
        Endpoints missing from the list are forgotten."""
        if self._at is not None and now > self._at:
            decay = math.pow(0.5, (now - self._at) / self.half_life_s)
            self._sums = [v * decay for v in self._sums]
        self._at = now
        seen: dict[str, _Counters] = {}
        for key, snap, in_domain in snapshots[:MAX_TRACKED_ENDPOINTS]:
            cur = _Counters(
                snap.prefill_seconds or 0.0,
                snap.computed_tokens or 0.0,
                (snap.kv_load_seconds or 0.0) if in_domain else 0.0,
                (snap.external_tokens or 0.0) if in_domain else 0.0,
            )
            seen[key] = cur
            prev = self._last.get(key)
            if prev is None:
                continue
            deltas = (
                cur.prefill_s - prev.prefill_s,
                cur.computed - prev.computed,
                cur.load_s - prev.load_s,
                cur.external - prev.external,
            )
            if min(deltas) < 0:
                self.resets += 1
                continue
            for i, d in enumerate(deltas):
                self._sums[i] += d
        self._last = seen
        return self.cost()

    @property
    def tracked(self) -> int:
        """Endpoints whose last counters are kept (bounded by MAX_TRACKED_ENDPOINTS)."""
        return len(self._last)

    def cost(self) -> StorageCost:
        prefill_s, computed, load_s, external = self._sums
        recompute = prefill_s / computed if computed >= self.min_tokens else None
        reload = load_s / external if external >= self.min_tokens else None
        if recompute is None or reload is None or recompute <= 0:
            return StorageCost(self.prior, "prior", reload, recompute)
        weight = min(1.0, max(0.0, 1.0 - reload / recompute))
        return StorageCost(weight, "measured", reload, recompute)
