"""The flow-control plugins, by llm-d's type names: saturation detectors, usage-limit policies,
fairness and ordering policies, and the in-flight eviction filter and order."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from llmd.runtime.config import parse_duration
from llmd.scheduler.flowcontrol.spec import Duration
from llmd.scheduler.framework import (
    EndpointState,
    Filter,
    LLMRequest,
    NoParams,
    Plugin,
    PluginHandle,
    PluginParams,
)

# --- saturation detectors ----------------------------------------------------------------------


class SaturationDetector:
    """Pool saturation from the candidate endpoints: below 1.0 there is headroom."""

    name: str
    type_name: ClassVar[str]

    def pool_saturation(self, endpoints: Sequence[EndpointState], now: float) -> float:
        raise NotImplementedError

    stale_count: int = 0
    """Endpoints judged by in-flight accounting (stale or missing metrics) at the last reading."""


class UtilizationParams(PluginParams):
    queue_depth_threshold: float = Field(default=5, gt=0, alias="queueDepthThreshold")
    kv_cache_util_threshold: float = Field(default=0.8, gt=0, alias="kvCacheUtilThreshold")
    metrics_staleness_threshold: Duration | None = Field(
        default=None, alias="metricsStalenessThreshold"
    )
    """Older metrics are stale. Default: the scheduler's own threshold (llm-d's 200 ms halts a
    pool whose scrapes stretch past it)."""
    headroom: float = Field(default=0.0, ge=0)
    staleness_policy: Literal["inflight", "saturated", "ignore"] = Field(
        default="inflight", alias="stalenessPolicy"
    )

    @field_validator("metrics_staleness_threshold")
    @classmethod
    def _duration(cls, v: Duration | None) -> Duration | None:
        if v is not None:
            parse_duration(v)
        return v


def _queued(e: EndpointState, capacity: int) -> int:
    """The requests waiting at an endpoint, as saturation sees them.

    Its scraped queue, plus the requests sent since that scrape beyond the batch slots it had
    free: `capacity` (the most requests it has been seen holding with an empty queue) minus
    those it ran at the scrape, and none while it was queueing. Counting every request sent
    since the scrape as waiting, as the load scorers do (`EndpointState.waiting`), capped
    admission at about `queueDepthThreshold` requests per endpoint per scrape interval (400
    req/s for 4 endpoints scraped every 50 ms) however idle the engines were. An endpoint
    never seen holding anything has no free slots here, so a cold pool fills in steps: each
    scrape that finds no queue shows a larger batch it absorbed.
    """
    m = e.metrics
    scraped = (m.waiting or 0) if m is not None else 0
    running = (m.running or 0) if m is not None else 0
    free = 0 if scraped else max(0, capacity - running)
    return scraped + max(0, len(e.unseen) - free)


class UtilizationDetector(SaturationDetector, Filter[UtilizationParams]):
    """Per endpoint `max(queued / queueDepthThreshold, kv / kvCacheUtilThreshold)`, pool = mean;
    `queued` is the scraped queue plus the requests sent since the scrape that found no free
    batch slot (`_queued`), `kv` includes their estimated blocks.
    As a profile filter it keeps endpoints below `threshold * (1 + headroom)` (all, if none)."""

    type_name = "utilization-detector"
    Params = UtilizationParams

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        p = self.params
        self._fixed_staleness = (
            parse_duration(p.metrics_staleness_threshold)
            if p.metrics_staleness_threshold is not None
            else None
        )
        self.staleness_source: Callable[[], float] = lambda: 1.0
        """The scheduler's staleness threshold (it stretches with the scrape interval)."""
        self._peak_running: dict[str, int] = {}
        self._absorbed: dict[str, int] = {}
        """Per endpoint, the most requests it was seen holding while its queue was empty."""

    @property
    def staleness_s(self) -> float:
        if self._fixed_staleness is not None:
            return self._fixed_staleness
        return self.staleness_source()

    def _score(self, e: EndpointState, now: float, stale_after: float) -> tuple[float, bool]:
        """The endpoint's score and whether it was estimated (stale or missing metrics)."""
        p = self.params
        m = e.metrics
        if m is not None and m.running and m.running > self._peak_running.get(e.key, 0):
            self._peak_running[e.key] = m.running
        fresh = m is not None and now - e.metrics_at <= stale_after
        if fresh or p.staleness_policy == "ignore":
            if m is not None and not m.waiting:
                # no queue at the scrape: it held what it ran and what this scheduler had sent
                # before the scrape and is still in flight (possibly finished, unreported)
                held = max(m.running or 0, e.inflight_requests - len(e.unseen))
                if held > self._absorbed.get(e.key, 0):
                    self._absorbed[e.key] = held
            kv = e.kv_usage if m is not None else 0.0
            queued = _queued(e, self._absorbed.get(e.key, 0))
            return max(queued / p.queue_depth_threshold, kv / p.kv_cache_util_threshold), False
        if p.staleness_policy == "saturated":
            return 1.0, True
        # never halt: the scheduler's own count of what it sent there
        capacity = self._peak_running.get(e.key, 0)
        waiting = max(0, e.inflight_requests - capacity)
        kv = m.kv_cache_usage or 0.0 if m is not None else 0.0
        return max(waiting / p.queue_depth_threshold, kv / p.kv_cache_util_threshold), True

    def pool_saturation(self, endpoints: Sequence[EndpointState], now: float) -> float:
        if not endpoints:
            self.stale_count = 0
            return 1.0
        total, stale = 0.0, 0
        stale_after = self.staleness_s
        for e in endpoints:
            score, estimated = self._score(e, now, stale_after)
            total += score
            stale += estimated
        self.stale_count = stale
        return total / len(endpoints)

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        limit = 1.0 + self.params.headroom
        now = time.monotonic()
        stale_after = self.staleness_s
        kept = [e for e in endpoints if self._score(e, now, stale_after)[0] < limit]
        return kept or endpoints

    def endpoints_changed(self, live: set[str]) -> None:
        for seen in (self._peak_running, self._absorbed):
            for key in list(seen):
                if key not in live:
                    del seen[key]


class ConcurrencyParams(PluginParams):
    mode: Literal["requests", "tokens", "hybrid"] = "requests"
    max_concurrency: int = Field(default=100, gt=0, alias="maxConcurrency")
    max_token_concurrency: int = Field(default=1_000_000, gt=0, alias="maxTokenConcurrency")
    headroom: float = Field(default=0.0, ge=0)


class ConcurrencyDetector(SaturationDetector, Filter[ConcurrencyParams]):
    """Saturation from the scheduler's own in-flight accounting (no scraped metrics at all):
    requests / maxConcurrency, tokens / maxTokenConcurrency, or the larger per endpoint."""

    type_name = "concurrency-detector"
    Params = ConcurrencyParams

    def _ratio(self, e: EndpointState) -> float:
        p = self.params
        req = e.inflight_requests / p.max_concurrency
        tok = e.inflight_tokens / p.max_token_concurrency
        return req if p.mode == "requests" else tok if p.mode == "tokens" else max(req, tok)

    def pool_saturation(self, endpoints: Sequence[EndpointState], now: float) -> float:
        if not endpoints:
            return 1.0
        p = self.params
        if p.mode == "requests":
            return sum(e.inflight_requests for e in endpoints) / (
                p.max_concurrency * len(endpoints)
            )
        if p.mode == "tokens":
            cap = p.max_token_concurrency * len(endpoints)
            return sum(e.inflight_tokens for e in endpoints) / cap
        return sum(self._ratio(e) for e in endpoints) / len(endpoints)

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        limit = 1.0 + self.params.headroom
        kept = [e for e in endpoints if self._ratio(e) < limit]
        return kept or endpoints


# --- usage limits, fairness, ordering ----------------------------------------------------------


class UsageLimitPolicy:
    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        raise NotImplementedError


class StaticUsageParams(PluginParams):
    threshold: float = Field(default=1.0, gt=0)


class StaticUsageLimitPolicy(UsageLimitPolicy, Plugin[StaticUsageParams]):
    """Every band's ceiling is `threshold` (1.0): dispatch while the pool is not saturated."""

    type_name = "static-usage-limit-policy"
    Params = StaticUsageParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.params.threshold] * len(priorities)


class HoldbackParams(PluginParams):
    min_ceiling: float = Field(alias="minCeiling", gt=0)
    max_ceiling: float = Field(default=1.0, gt=0, alias="maxCeiling")
    domain: Literal["rank", "value"] = "rank"


class PriorityHoldbackPolicy(UsageLimitPolicy, Plugin[HoldbackParams]):
    """Lower bands stop earlier: ceilings spread from maxCeiling (highest band) to minCeiling
    (lowest), by rank or by priority value, so headroom is held back for high priorities."""

    type_name = "priority-holdback-policy"
    Params = HoldbackParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        p = self.params
        n = len(priorities)
        if n <= 1:
            return [p.max_ceiling] * n
        if p.domain == "rank":
            return [p.max_ceiling - i * (p.max_ceiling - p.min_ceiling) / (n - 1) for i in range(n)]
        hi, lo = max(priorities), min(priorities)
        span = (hi - lo) or 1
        return [
            p.min_ceiling + (q - lo) / span * (p.max_ceiling - p.min_ceiling) for q in priorities
        ]


class SoftReflectiveCeilingPolicy(UsageLimitPolicy, Plugin[NoParams]):
    """Lower bands are thinned, not cut: band i of N (0 = highest) has the ceiling
    `1 - i*sat/(N-1)`; above it, while the pool is below saturation, the band is let through
    one dispatch decision in `round(sat/(1-sat))`, so its rate falls as `(1-sat)/sat` as the
    pool fills instead of dropping to zero at a fixed threshold. At saturation every band
    waits; the highest band's ceiling is always 1.0 (llm-d's Alpha policy, same name)."""

    type_name = "soft-reflective-ceiling-policy"

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        self.tick = 0
        """Dispatch decisions so far: the clock the thinned bands open on (shared by all)."""

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        self.tick += 1
        n = len(priorities)
        if n <= 1 or saturation >= 1.0:
            return [1.0] * n
        period = max(1, round(saturation / (1.0 - saturation)))
        thinned_open = self.tick % period == 0
        out = []
        for i in range(n):
            ceiling = 1.0 - i * saturation / (n - 1)
            out.append(1.0 if (i == 0 or saturation < ceiling or thinned_open) else ceiling)
        return out

    def state(self) -> dict[str, Any]:
        return {"tick": self.tick}


@dataclass(eq=False)
class Item:
    """One queued request."""

    request: LLMRequest
    flow: FlowKey
    size: int
    enqueued_at: float
    seq: int
    future: asyncio.Future[None]
    ttl_s: float
    slo_deadline: float = math.inf

    @property
    def deadline(self) -> float:
        return self.enqueued_at + self.ttl_s if self.ttl_s > 0 else math.inf


@dataclass(frozen=True, slots=True, order=True)
class FlowKey:
    fairness_id: str
    priority: int


class OrderingPolicy:
    """Which item of a flow goes first: the smallest `key`."""

    def key(self, item: Item) -> tuple[float, int]:
        raise NotImplementedError


class FCFSOrdering(OrderingPolicy, Plugin[NoParams]):
    """First come, first served."""

    type_name = "fcfs-ordering-policy"

    def key(self, item: Item) -> tuple[float, int]:
        return (item.enqueued_at, item.seq)


class EDFOrdering(OrderingPolicy, Plugin[NoParams]):
    """Earliest deadline (enqueue time + TTL) first."""

    type_name = "edf-ordering-policy"

    def key(self, item: Item) -> tuple[float, int]:
        return (item.deadline, item.seq)


class SLODeadlineOrdering(OrderingPolicy, Plugin[NoParams]):
    """Earliest TTFT deadline first: arrival + `x-llm-d-slo-ttft-ms` (requests without a valid
    SLO header go last, first come first served among them)."""

    type_name = "slo-deadline-ordering-policy"

    def key(self, item: Item) -> tuple[float, int]:
        return (item.slo_deadline, item.seq)


@dataclass(eq=False)
class Flow:
    key: FlowKey
    heap: list[tuple[tuple[float, int], Item]] = field(default_factory=list)
    bytes: int = 0
    service: float = 0.0
    """Attained service (tokens) for least-attained-service fairness, decayed."""
    service_at: float = 0.0


class FairnessPolicy:
    """Which flow of a band is served next."""

    def pick(self, band: Band, now: float) -> Flow | None:
        raise NotImplementedError


class GlobalStrictFairness(FairnessPolicy, Plugin[NoParams]):
    """No fairness: the band is one queue ordered by its ordering policy."""

    type_name = "global-strict-fairness-policy"

    def pick(self, band: Band, now: float) -> Flow | None:
        best: Flow | None = None
        for flow in band.flows.values():
            if flow.heap and (best is None or flow.heap[0][0] < best.heap[0][0]):
                best = flow
        return best


class RoundRobinFairness(FairnessPolicy, Plugin[NoParams]):
    """Flows take turns (a cursor over the band's flows, skipping empty ones)."""

    type_name = "round-robin-fairness-policy"

    def pick(self, band: Band, now: float) -> Flow | None:
        keys = sorted(k for k, f in band.flows.items() if f.heap)
        if not keys:
            return None
        after = [k for k in keys if k > band.cursor]
        key = after[0] if after else keys[0]
        band.cursor = key
        return band.flows[key]


class LASParams(PluginParams):
    strategy: Literal["las"] = "las"
    las_half_life_seconds: float = Field(default=60.0, gt=0, alias="lasHalfLifeSeconds")
    las_weight_service: float = Field(default=0.8, ge=0, alias="lasWeightService")
    las_weight_head_wait: float = Field(default=0.2, ge=0, alias="lasWeightHeadWait")


class ProgramAwareFairness(FairnessPolicy, Plugin[LASParams]):
    """Least attained service: the flow that has received the fewest tokens lately (input +
    2 x output, halving every `lasHalfLifeSeconds`) goes next, weighed against how long its
    head has waited."""

    type_name = "program-aware-fairness"
    Params = LASParams

    def pick(self, band: Band, now: float) -> Flow | None:
        p = self.params
        flows = [f for f in band.flows.values() if f.heap]
        if not flows:
            return None
        services = [_decayed(f, now, p.las_half_life_seconds) for f in flows]
        waits = [now - f.heap[0][1].enqueued_at for f in flows]
        top_s, top_w = max(services) or 1.0, max(waits) or 1.0
        best, best_score = flows[0], -math.inf
        for f, s, w in zip(flows, services, waits, strict=True):
            score = p.las_weight_service * (1 - s / top_s) + p.las_weight_head_wait * (w / top_w)
            if score > best_score:
                best, best_score = f, score
        return best


def _decayed(flow: Flow, now: float, half_life: float) -> float:
    if flow.service_at and flow.service:
        flow.service *= 0.5 ** ((now - flow.service_at) / half_life)
    flow.service_at = now
    return flow.service


@dataclass(eq=False)
class Band:
    """One priority's queues: its flows, their totals, and the policies that serve them."""

    priority: int
    max_bytes: int
    max_requests: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    flows: dict[FlowKey, Flow] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0
    cursor: FlowKey = field(default_factory=lambda: FlowKey("", 0))


# --- in-flight eviction ---------------------------------------------------------------------------


@dataclass(eq=False)
class Tracked:
    """A dispatched request that eviction may revoke (`track`), until it ends (`untrack`)."""

    request: LLMRequest
    priority: int
    dispatched_at: float
    seq: int
    revoked: asyncio.Future[str] = field(init=False)
    """Resolved with the dropped reason on revocation (made only once the filter admits it)."""
    revoked_at: float = 0.0


class EvictionFilter:
    def evictable(self, victim: Tracked, blocked_priority: int) -> bool:
        raise NotImplementedError


class SheddableEvictionFilter(EvictionFilter, Plugin[NoParams]):
    """Only sheddable requests (priority < 0) below the blocked band may be revoked."""

    type_name = "sheddable-eviction-filter"
    Params = NoParams

    def evictable(self, victim: Tracked, blocked_priority: int) -> bool:
        return victim.priority < 0 and victim.priority < blocked_priority


class EvictionOrder:
    def key(self, victim: Tracked) -> tuple[float, ...]:
        raise NotImplementedError


class PriorityThenTimeEvictionOrder(EvictionOrder, Plugin[NoParams]):
    """The lowest priority first, then the most recently dispatched (the least work lost)."""

    type_name = "priority-then-time-eviction-order-policy"
    Params = NoParams

    def key(self, victim: Tracked) -> tuple[float, ...]:
        return (victim.priority, -victim.dispatched_at, -victim.seq)


FLOW_PLUGINS = (
    SheddableEvictionFilter,
    PriorityThenTimeEvictionOrder,
    UtilizationDetector,
    ConcurrencyDetector,
    StaticUsageLimitPolicy,
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    GlobalStrictFairness,
    RoundRobinFairness,
    ProgramAwareFairness,
    FCFSOrdering,
    EDFOrdering,
    SLODeadlineOrdering,
)
