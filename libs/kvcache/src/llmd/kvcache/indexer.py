"""The indexer façade: prompt tokens -> request keys -> per-pod prefix hits, with speculative
entries for just-routed requests and a health check of every pod's index entries.

Index health (no peer has it): each response's engine-reported `cached_tokens` is compared with
what the index predicted for that pod when the request was routed. A pod whose recent
predictions keep missing (lost events, a misconfigured publisher, a wrong block size or hash
seed) is marked untrusted: its scores are down-weighted, a resync is triggered (clear + replay),
and both are logged and exported. Good predictions make it trusted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmd.kvcache.index import (
    DEFAULT_TIER_WEIGHTS,
    SPECULATIVE_TIER,
    TIER_GPU,
    Index,
    InMemoryIndex,
    PodEntry,
    PrefixHit,
    apply_storage_domains,
    domain_query_pods,
)
from llmd.kvcache.keys import TokenProcessor
from llmd.kvcache.metrics import KVCacheMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    window: int = 16
    """Recent responses per pod that are judged."""
    min_samples: int = 6
    max_mean_error_blocks: float = 1.0
    max_miss_fraction: float = 0.5
    untrusted_weight: float = 0.25
    """Multiplier on an untrusted pod's prefix score."""
    resync_cooldown_s: float = 30.0
    max_pods: int = 4096
    """Pods whose health is tracked; past it the longest-tracked one is forgotten."""


@dataclass(slots=True)
class PodHealth:
    errors: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=64))
    """Unexplained cached blocks per response (the engine had them, the index did not know),
    and 1 when there were any."""
    untrusted: bool = False
    last_resync: float = 0.0
    resyncs: int = 0

    def mean_error(self) -> float:
        return sum(abs(e) for e, _ in self.errors) / len(self.errors) if self.errors else 0.0

    def miss_fraction(self) -> float:
        return sum(m for _, m in self.errors) / len(self.errors) if self.errors else 0.0


class KVCacheIndexer:
    """Scoring over any `Index` backend; the embedded scheduler and llmd-indexer both use it."""

    def __init__(
        self,
        index: Index,
        processor: TokenProcessor | None = None,
        *,
        weights: Mapping[str, float] | None = None,
        metrics: KVCacheMetrics | None = None,
        speculative_ttl_s: float = 2.0,
        max_speculative: int = 65_536,
        health: HealthConfig | None = None,
        resync: Callable[[str, str], Coroutine[Any, Any, None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.processor = processor or TokenProcessor()
        self.weights = dict(DEFAULT_TIER_WEIGHTS if weights is None else weights)
        self.metrics = metrics or KVCacheMetrics()
        self.speculative_ttl_s = speculative_ttl_s
        self._spec: deque[tuple[float, list[int], PodEntry]] = deque()
        self.max_speculative = max_speculative
        self.health_config = health or HealthConfig()
        self.health: dict[str, PodHealth] = {}
        self.resync_cb = resync
        self.clock = clock
        self._backend = "memory" if isinstance(index, InMemoryIndex) else "valkey"
        self._lookup_hist = self.metrics.lookup_seconds.labels(self._backend)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def block_size(self) -> int:
        return self.processor.block_size

    # --- scoring -----------------------------------------------------------------------------

    def keys(self, tokens: Sequence[int], model: str, cache_salt: str | None = None) -> list[int]:
        return self.processor.prompt_keys(tokens, model, cache_salt=cache_salt)

    def _trusted(self, hits: dict[str, PrefixHit]) -> dict[str, PrefixHit]:
        for pod, h in hits.items():
            ph = self.health.get(pod)
            if ph is not None and ph.untrusted:
                h.score *= self.health_config.untrusted_weight
        return hits

    def score_sync(
        self,
        keys: Sequence[int],
        pods: Collection[str] | None,
        domains: Mapping[str, str] | None = None,
    ) -> dict[str, PrefixHit]:
        """In-memory backends only: the scheduler's hot path without an await. `domains` maps
        pods to their storage domain: a pod is credited with its domain's shared-volume hits."""
        assert isinstance(self.index, InMemoryIndex)
        self._expire()
        t = time.perf_counter()
        hits = self.index.longest_prefix_sync(keys, domain_query_pods(pods, domains), self.weights)
        hits = apply_storage_domains(hits, domains or {})
        self._looked_up(time.perf_counter() - t, hits)
        return self._trusted(hits)

    def _looked_up(self, seconds: float, hits: dict[str, PrefixHit]) -> None:
        self._lookup_hist.observe(seconds)
        m = self.metrics
        m.lookup_latency.observe(seconds)
        m.lookup_requests.inc()
        best = max((h.blocks for h in hits.values()), default=0)
        if best:
            m.lookup_hits.inc(best)

    async def score(
        self,
        keys: Sequence[int],
        pods: Collection[str] | None,
        domains: Mapping[str, str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, PrefixHit]:
        """As `score_sync`; `weights` override the configured tier weights for this call."""
        await self._expire_async()
        t = time.perf_counter()
        w = self.weights if not weights else {**self.weights, **weights}
        hits = await self.index.longest_prefix(keys, domain_query_pods(pods, domains), w)
        hits = apply_storage_domains(hits, domains or {})
        self._looked_up(time.perf_counter() - t, hits)
        return self._trusted(hits)

    # --- speculative entries ---------------------------------------------------------------

    def _spec_entry(self, pod: str) -> PodEntry:
        return PodEntry(pod, SPECULATIVE_TIER, speculative=True)

    def speculate_sync(self, keys: Sequence[int], pod: str) -> None:
        """Record that `pod` is about to compute `keys` (until its events confirm, or TTL)."""
        if not keys or self.speculative_ttl_s <= 0:
            return
        assert isinstance(self.index, InMemoryIndex)
        entry = self._spec_entry(pod)
        self.index.add_sync(None, keys, entry)
        for old_keys, old in self._remember(list(keys), entry):
            self.index.evict_request_keys_sync(old_keys, old)

    async def speculate(self, keys: Sequence[int], pod: str) -> None:
        if not keys or self.speculative_ttl_s <= 0:
            return
        entry = self._spec_entry(pod)
        await self.index.add(None, keys, entry)
        for old_keys, old in self._remember(list(keys), entry):
            await self.index.evict_request_keys(old_keys, old)

    def _remember(self, keys: list[int], entry: PodEntry) -> list[tuple[list[int], PodEntry]]:
        """Track a speculative entry for expiry; returns those pushed out by the bound (the
        caller evicts them now, in its own sync or async way)."""
        self._spec.append((self.clock() + self.speculative_ttl_s, keys, entry))
        over = []
        while len(self._spec) > self.max_speculative:
            _, old_keys, old = self._spec.popleft()
            over.append((old_keys, old))
        return over

    def _expire(self) -> None:
        spec = self._spec
        if not spec:
            return
        now = self.clock()
        assert isinstance(self.index, InMemoryIndex)
        while spec and spec[0][0] <= now:
            _, keys, entry = spec.popleft()
            self.index.evict_request_keys_sync(keys, entry)

    async def _expire_async(self) -> None:
        spec = self._spec
        now = self.clock()
        while spec and spec[0][0] <= now:
            _, keys, entry = spec.popleft()
            await self.index.evict_request_keys(keys, entry)

    # --- index health ------------------------------------------------------------------------

    def observe(
        self,
        pod: str,
        predicted_tokens: int,
        cached_tokens: int,
        prompt_tokens: int,
        engine_block_size: int,
        speculative_tokens: int = 0,
    ) -> None:
        """Compare one response's `cached_tokens` with the routing-time prediction.

        `predicted_tokens` counts blocks confirmed by events on the GPU tier;
        `speculative_tokens` adds those only just routed there (not confirmed yet). Both are
        capped as vLLM caps hits (never the prompt's last token; whole engine blocks).

        Only a hit the index could not explain counts against it: the engine had more cached
        than even the speculative prediction (events missing, a wrong block size, hash seed or
        model name). Over-predictions are exported but not judged: under cache pressure the
        engine evicts blocks between routing and prefill, which is not the index's fault.
        """
        ebs = max(1, engine_block_size)
        cap = ((max(0, prompt_tokens - 1)) // ebs) * ebs
        predicted = (min(predicted_tokens, cap) // ebs) * ebs
        upper = (min(max(predicted_tokens, speculative_tokens), cap) // ebs) * ebs
        err = (predicted - cached_tokens) // ebs
        unexplained = max(0, (cached_tokens - upper) // ebs)
        h = self.health.get(pod)
        if h is None:
            if len(self.health) >= self.health_config.max_pods:
                oldest = next(iter(self.health))  # insertion order: the longest-known pod
                del self.health[oldest]
            h = self.health[pod] = PodHealth()
        h.errors.append((unexplained, int(unexplained > 0)))
        while len(h.errors) > self.health_config.window:
            h.errors.popleft()
        outcome = "exact" if err == 0 else ("over" if err > 0 else "under")
        self.metrics.predictions.labels(pod, outcome).inc()
        self.metrics.prediction_error.labels(pod).set(abs(err))
        self._judge(pod, h)

    def _judge(self, pod: str, h: PodHealth) -> None:
        cfg = self.health_config
        if len(h.errors) < cfg.min_samples:
            return
        bad = (
            h.mean_error() > cfg.max_mean_error_blocks and h.miss_fraction() > cfg.max_miss_fraction
        )
        if bad and not h.untrusted:
            h.untrusted = True
            self.metrics.untrusted.labels(pod).set(1)
            log.warning(
                "KV index for %s is untrustworthy: mean error %.1f blocks, %.0f%% of the last %d "
                "responses missed; down-weighting it and resyncing",
                pod,
                h.mean_error(),
                100 * h.miss_fraction(),
                len(h.errors),
            )
        elif not bad and h.untrusted and h.miss_fraction() <= cfg.max_miss_fraction / 2:
            h.untrusted = False
            self.metrics.untrusted.labels(pod).set(0)
            log.info("KV index for %s is trusted again", pod)
        if h.untrusted and self.clock() - h.last_resync >= cfg.resync_cooldown_s:
            h.last_resync = self.clock()
            h.resyncs += 1
            self.metrics.resyncs.labels(pod).inc()
            h.errors.clear()
            if self.resync_cb is not None:
                try:
                    task = asyncio.get_running_loop().create_task(
                        self.resync_cb(pod, "predictions kept missing")
                    )
                except RuntimeError:
                    return
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def health_snapshot(self) -> dict[str, dict[str, float | int | bool]]:
        return {
            pod: {
                "untrusted": h.untrusted,
                "mean_error_blocks": round(h.mean_error(), 3),
                "miss_fraction": round(h.miss_fraction(), 3),
                "samples": len(h.errors),
                "resyncs": h.resyncs,
            }
            for pod, h in self.health.items()
        }


def confirmed_gpu_blocks(hit: PrefixHit | None) -> int:
    """Blocks of a hit that events confirmed on the GPU tier (what vLLM's cached_tokens counts)."""
    if hit is None:
        return 0
    return hit.tiers.get(TIER_GPU, 0)
