"""Flow control: priority bands, fairness between tenants, bounded queues, saturation-gated
dispatch, and shedding, with llm-d's names, parameters, outcomes and metrics.

A request's flow is `(fairness id, priority)`: the fairness id from llm-d's fairness header,
the priority from its InferenceObjective (`objectives.py`; none = 0, negative = sheddable).
Each priority has a band; bands are served strictly highest first, flows within a band by the
band's fairness policy, items within a flow by its ordering policy.

    admit(request)
      -> nothing queued and the pool below the band's ceiling: dispatched at once (the common,
         unloaded case costs one saturation reading)
      -> else queued (global and band capacity in requests and bytes; over it: 429
         rejected-saturated) until the dispatcher lets it go, its TTL ends (429
         rejected-ttl-expired, or 503 rejected-no-endpoints while the pool is empty), or the
         client goes away (its entry is removed: nothing leaks)

The dispatcher runs whenever a request is queued or finishes, and every `tick` while anything
waits. One cycle reads the pool's saturation from the detector, asks the usage-limit policy for
each band's ceiling, and lets one request of the highest open band go; a band at or above its
ceiling blocks every lower band (llm-d's head-of-line rule, which protects high priorities).

**Stale metrics never halt the pool** (llm-d's most reported flow-control failure: its
utilization detector scores an endpoint with stale metrics as saturated, so a scrape outage
stops all dispatch). Here an endpoint whose metrics are stale or missing is judged by the
scheduler's own in-flight accounting instead: its queue is estimated as the requests in flight
beyond the largest batch it was ever seen running. `llm_d_epp_flow_control_stale_endpoints`
counts those endpoints and the change is logged. `stalenessPolicy: saturated` restores llm-d's
behaviour; `ignore` uses the last values.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator

from llmd.protocol import headers as hdr
from llmd.runtime.config import StrictModel, parse_duration
from llmd.runtime.fastmetrics import Counter, Gauge, Histogram
from llmd.scheduler.framework import (
    EndpointState,
    Filter,
    LLMRequest,
    NoParams,
    Plugin,
    PluginHandle,
    PluginParams,
    SchedulingError,
)

log = logging.getLogger(__name__)

Duration = str | float

# --- quantities ------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?\s*$")
_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: str | int | float) -> int:
    """`500`, `10k`, `1G`, `10Gi` (Kubernetes quantities) as an integer; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return int(value)
    m = _QUANTITY.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a quantity (e.g. 500, 10k, 1Gi)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


Quantity = str | int


class _Quantities(StrictModel):
    max_bytes: Quantity | None = Field(default=None, alias="maxBytes")
    max_requests: Quantity | None = Field(default=None, alias="maxRequests")

    @field_validator("max_bytes", "max_requests")
    @classmethod
    def _q(cls, v: Quantity | None) -> Quantity | None:
        if v is not None:
            parse_quantity(v)
        return v


class BandTemplate(_Quantities):
    fairness_policy_ref: str | None = Field(default=None, alias="fairnessPolicyRef")
    ordering_policy_ref: str | None = Field(default=None, alias="orderingPolicyRef")


class BandSpec(BandTemplate):
    priority: int = Field(ge=-(2**31), lt=2**31)


class PluginRef(StrictModel):
    plugin_ref: str = Field(alias="pluginRef", min_length=1)


class FlowControlSpec(_Quantities):
    """`flowControl:` of an EndpointPickerConfig (llm-d's keys)."""

    default_request_ttl: Duration = Field(default="60s", alias="defaultRequestTTL")
    no_endpoint_request_ttl: Duration | None = Field(default=None, alias="noEndpointRequestTTL")
    default_priority_band: BandTemplate | None = Field(default=None, alias="defaultPriorityBand")
    default_negative_priority_band: BandTemplate | None = Field(
        default=None, alias="defaultNegativePriorityBand"
    )
    priority_bands: list[BandSpec] = Field(default_factory=list, alias="priorityBands")
    usage_limit_policy_plugin_ref: str | None = Field(
        default=None, alias="usageLimitPolicyPluginRef"
    )
    saturation_detector: PluginRef | None = Field(default=None, alias="saturationDetector")
    enable_eviction: bool = Field(default=False, alias="enableEviction")

    @field_validator("default_request_ttl", "no_endpoint_request_ttl")
    @classmethod
    def _duration(cls, v: Duration | None) -> Duration | None:
        if v is not None:
            parse_duration(v)
        return v


DEFAULT_BAND_MAX_BYTES = 1 << 30
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_TTL_S = 60.0


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


class UtilizationDetector(SaturationDetector, Filter[UtilizationParams]):
    """Per endpoint `max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold)`, pool = mean.
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
            kv = e.kv_usage if m is not None else 0.0
            return max(e.waiting / p.queue_depth_threshold, kv / p.kv_cache_util_threshold), False
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
        for key in list(self._peak_running):
            if key not in live:
                del self._peak_running[key]


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


MAX_REVOCATIONS_PER_DECISION = 2
REVOCATION_TIMEOUT_S = 10.0


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


# --- the controller ----------------------------------------------------------------------------


@dataclass(eq=False)
class Band:
    priority: int
    max_bytes: int
    max_requests: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    flows: dict[FlowKey, Flow] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0
    cursor: FlowKey = field(default_factory=lambda: FlowKey("", 0))


OUTCOMES = (
    "Dispatched",
    "RejectedCapacity",
    "RejectedNoEndpoints",
    "EvictedTTL",
    "EvictedContextCancelled",
    "RejectedOther",
)


class FlowMetrics:
    """llm-d's `llm_d_epp_flow_control_*` families."""

    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        pre = "llm_d_epp_flow_control_"
        fp = ["fairness_id", "priority"]
        model = ["model_name", "target_model_name"]
        self.pool = pool
        self.queue_duration = Histogram(
            f"{pre}request_queue_duration_seconds",
            "Time from enqueue to the final outcome",
            [*fp, "outcome", "inference_pool", *model],
            buckets=(
                0.0001,
                0.0005,
                0.001,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
                30.0,
                60.0,
            ),
            registry=registry,
        )
        self.enqueue_duration = Histogram(
            f"{pre}request_enqueue_duration_seconds",
            "Time to enqueue (or dispatch at once) a request",
            [*fp, "outcome"],
            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=registry,
        )
        self.cycle_duration = Histogram(
            f"{pre}dispatch_cycle_duration_seconds",
            "Time of one dispatch cycle",
            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=registry,
        )
        self.queue_size = Gauge(
            f"{pre}queue_size",
            "Requests held in the queue",
            [*fp, "inference_pool", *model],
            registry=registry,
        )
        self.queue_bytes = Gauge(
            f"{pre}queue_bytes",
            "Bytes of the requests held in the queue",
            [*fp, "inference_pool", *model],
            registry=registry,
        )
        self.band_size = Gauge(
            "llmd_flow_control_band_queue_size",
            "Requests held per priority band (what the autoscaler and activator read)",
            ["priority", "inference_pool"],
            registry=registry,
        )
        self.saturation = Gauge(
            f"{pre}pool_saturation",
            "Pool saturation at the last dispatch decision (1.0 = saturated)",
            ["inference_pool"],
            registry=registry,
        )
        self.stale = Gauge(
            f"{pre}stale_endpoints",
            "Endpoints judged by in-flight accounting because their metrics are stale or missing",
            ["detector"],
            registry=registry,
        )
        self.requests = Counter(
            f"{pre}requests",
            "Requests by flow-control outcome",
            ["outcome", "priority", "inference_pool"],
            registry=registry,
        )
        self.revocations_issued = Counter(
            f"{pre}revocations_issued",
            "In-flight sheddable requests revoked to free capacity for a blocked higher band",
            ["priority", "inference_pool"],
            registry=registry,
        )
        self.revocations = Counter(
            f"{pre}revocations",
            "Revocations by outcome: confirmed (the request ended), timed-out (still running "
            f"{REVOCATION_TIMEOUT_S:g} s later)",
            ["outcome", "inference_pool"],
            registry=registry,
        )
        self.pending_reclaim = Gauge(
            f"{pre}pending_reclaim",
            "Revocations issued and not yet confirmed",
            ["inference_pool"],
            registry=registry,
        )
        self.revocation_confirmation = Histogram(
            f"{pre}revocation_confirmation_seconds",
            "Time from a revocation to the end of the revoked request",
            ["inference_pool"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self._saturation = self.saturation.labels(pool)
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}

    def outcome(self, labels: tuple[str, str, str, str], outcome: str) -> tuple[Any, Any, Any]:
        """(requests counter, queue-duration and enqueue-duration histograms) for a request
        with these budgeted (model, target, fairness id, priority) labels: resolved once."""
        key = (*labels, outcome)
        got = self._children.get(key)
        if got is None:
            model, target, fid, prio = labels
            got = (
                self.requests.labels(outcome, prio, self.pool),
                self.queue_duration.labels(fid, prio, outcome, self.pool, model, target),
                self.enqueue_duration.labels(fid, prio, outcome),
            )
            if len(self._children) < 20_000:  # label sets are budgeted; this only bounds memory
                self._children[key] = got
        return got


MAX_FLOWS = 10_000
"""Distinct flows kept (fairness ids come from clients); idle flows are dropped first."""


class FlowController:
    """Queues and dispatches requests by band, flow and order (see the module docstring)."""

    def __init__(
        self,
        spec: FlowControlSpec,
        *,
        detector: SaturationDetector,
        usage: UsageLimitPolicy,
        fairness: dict[str, FairnessPolicy],
        ordering: dict[str, OrderingPolicy],
        candidates: Callable[[], list[EndpointState]],
        pool_size: Callable[[], int],
        metrics: FlowMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.002,
        labels: Callable[[LLMRequest], tuple[str, str, str, str]] | None = None,
        eviction_filter: EvictionFilter | None = None,
        eviction_order: EvictionOrder | None = None,
        eviction_grace_s: Callable[[], float] = lambda: 0.5,
    ) -> None:
        self.spec = spec
        self.labels = labels or _raw_labels
        """(model, target, fairness id, priority) of a request for the metrics: the scheduler
        passes its label budget (clients choose fairness ids and model names)."""
        self.detector = detector
        self.usage = usage
        self.fairness = fairness
        self.ordering = ordering
        self.candidates = candidates
        self.pool_size = pool_size
        self.metrics = metrics
        self.clock = clock
        self.tick_s = tick_s
        self.max_bytes = parse_quantity(spec.max_bytes) if spec.max_bytes else 0
        self.max_requests = parse_quantity(spec.max_requests) if spec.max_requests else 0
        self.ttl_s = parse_duration(spec.default_request_ttl)
        self.no_endpoint_ttl_s = (
            parse_duration(spec.no_endpoint_request_ttl)
            if spec.no_endpoint_request_ttl is not None
            else (self.ttl_s or DEFAULT_TTL_S)
        )
        self.bands: dict[int, Band] = {}
        self._order: list[int] = []
        self.queued = 0
        self.queued_bytes = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._was_stale = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.eviction = spec.enable_eviction
        self.eviction_filter = eviction_filter or SheddableEvictionFilter(
            SheddableEvictionFilter.type_name, NoParams(), PluginHandle(list)
        )
        self.eviction_order = eviction_order or PriorityThenTimeEvictionOrder(
            PriorityThenTimeEvictionOrder.type_name, NoParams(), PluginHandle(list)
        )
        self.eviction_grace_s = eviction_grace_s
        """After revoking, no more revocations until the detector can see the freed capacity:
        10 ms for the concurrency detector (in-flight accounting), a scrape interval plus the
        staleness threshold plus 250 ms for the utilization detector (llm-d's derivation)."""
        self.tracked: dict[int, Tracked] = {}
        """Dispatched requests eviction may revoke, by id(request); bounded by the requests in
        flight (each leaves at `untrack`, which the Director's release always calls)."""
        self.revocations = 0
        self._pending: dict[int, Tracked] = {}
        self._reclaim_after = 0.0
        for b in spec.priority_bands:
            self._band(b.priority, b)

    # --- bands -----------------------------------------------------------------------------

    def _band(self, priority: int, spec: BandTemplate | None = None) -> Band:
        band = self.bands.get(priority)
        if band is not None:
            return band
        if spec is None:
            spec = (
                self.spec.default_negative_priority_band
                if priority < 0
                else self.spec.default_priority_band
            )
        max_bytes = parse_quantity(spec.max_bytes) if spec and spec.max_bytes else 0
        max_requests = parse_quantity(spec.max_requests) if spec and spec.max_requests else 0
        fref = (spec.fairness_policy_ref if spec else None) or "global-strict-fairness-policy"
        oref = (spec.ordering_policy_ref if spec else None) or "fcfs-ordering-policy"
        band = Band(
            priority,
            max_bytes or DEFAULT_BAND_MAX_BYTES,
            max_requests or DEFAULT_BAND_MAX_REQUESTS,
            self.fairness[fref],
            self.ordering[oref],
        )
        self.bands[priority] = band
        self._order = sorted(self.bands, reverse=True)
        return band

    # --- admission ---------------------------------------------------------------------------

    def _open(self, priority: int, now: float) -> bool:
        """Whether a request of `priority` may go now: nothing waits at or above its band and
        the pool is below that band's ceiling."""
        if self.pool_size() == 0:
            return False
        for p in self._order:
            if p < priority:
                break
            if self.bands[p].requests:
                return False
        saturation = self._saturation(now)
        if priority not in self.bands:
            self._band(priority)
        ceiling = self.usage.ceilings(saturation, self._order)[self._order.index(priority)]
        return saturation < ceiling

    def _saturation(self, now: float) -> float:
        s = self.detector.pool_saturation(self.candidates(), now)
        stale = self.detector.stale_count
        if self.metrics is not None:
            self.metrics._saturation.set(s)
        if stale != self._was_stale:
            if self.metrics is not None:
                self.metrics.stale.labels(self.detector.type_name).set(stale)
            if stale:
                log.warning(
                    "flow control: %d endpoint(s) have stale or missing metrics; judging them "
                    "by the scheduler's in-flight accounting",
                    stale,
                )
            else:
                log.info("flow control: every endpoint's metrics are fresh again")
            self._was_stale = stale
        return s

    async def admit(self, request: LLMRequest) -> None:
        """Return when the request may be scheduled; SchedulingError when it may not."""
        t0 = self.clock()
        key = FlowKey(request.fairness_id, request.priority)
        if self._open(key.priority, t0):
            self._done(request, key, "Dispatched", 0.0, t0)
            return
        size = len(request.body)
        band = self._band(key.priority)
        if self._full(band, size):
            self._done(request, key, "RejectedCapacity", 0.0, t0)
            raise SchedulingError(429, "flow control queue is full", hdr.DROPPED_SATURATED)
        empty = self.pool_size() == 0
        item = Item(
            request,
            key,
            size,
            t0,
            next(self._seq),
            asyncio.get_running_loop().create_future(),
            self.no_endpoint_ttl_s if empty else self.ttl_s,
            _slo_deadline(request),
        )
        self._push(band, item)
        if self.metrics is not None:
            self.metrics.enqueue_duration.labels(
                key.fairness_id, str(key.priority), "Queued"
            ).observe(self.clock() - t0)
        self.wake()
        try:
            await item.future
        except asyncio.CancelledError:
            if self._remove(item):  # the client went away while it waited
                self._done(request, key, "EvictedContextCancelled", self.clock() - t0, None)
            raise

    def _full(self, band: Band, size: int) -> bool:
        if self.max_requests and self.queued + 1 > self.max_requests:
            return True
        if self.max_bytes and self.queued_bytes + size > self.max_bytes:
            return True
        return band.requests + 1 > band.max_requests or band.bytes + size > band.max_bytes

    def _push(self, band: Band, item: Item) -> None:
        flow = band.flows.get(item.flow)
        if flow is None:
            if sum(len(b.flows) for b in self.bands.values()) >= MAX_FLOWS:
                self._drop_idle_flows()
            flow = band.flows[item.flow] = Flow(item.flow)
        heapq.heappush(flow.heap, (band.ordering.key(item), item))
        flow.bytes += item.size
        band.requests += 1
        band.bytes += item.size
        self.queued += 1
        self.queued_bytes += item.size
        self._gauges(band, flow, item.request)

    def _take(self, band: Band, flow: Flow) -> Item:
        _, item = heapq.heappop(flow.heap)
        self._forget(band, flow, item)
        return item

    def _remove(self, item: Item) -> bool:
        band = self.bands.get(item.flow.priority)
        flow = band.flows.get(item.flow) if band is not None else None
        if band is None or flow is None:
            return False
        for i, (_, it) in enumerate(flow.heap):
            if it is item:
                flow.heap[i] = flow.heap[-1]
                flow.heap.pop()
                heapq.heapify(flow.heap)
                self._forget(band, flow, item)
                return True
        return False

    def _forget(self, band: Band, flow: Flow, item: Item) -> None:
        flow.bytes -= item.size
        band.requests -= 1
        band.bytes -= item.size
        self.queued -= 1
        self.queued_bytes -= item.size
        self._gauges(band, flow, item.request)

    def _drop_idle_flows(self) -> None:
        for band in self.bands.values():
            for k in [k for k, f in band.flows.items() if not f.heap]:
                del band.flows[k]

    def _gauges(self, band: Band, flow: Flow, req: LLMRequest) -> None:
        m = self.metrics
        if m is None:
            return
        model, target, fid, prio = self.labels(req)
        labels = (fid, prio, m.pool, model, target)
        m.queue_size.labels(*labels).set(len(flow.heap))
        m.queue_bytes.labels(*labels).set(flow.bytes)
        m.band_size.labels(str(band.priority), m.pool).set(band.requests)

    def _done(
        self,
        req: LLMRequest,
        key: FlowKey,
        outcome: str,
        waited_s: float,
        enqueue_t0: float | None,
    ) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        m = self.metrics
        if m is None:
            return
        requests, queue_duration, enqueue_duration = m.outcome(self.labels(req), outcome)
        requests.inc()
        queue_duration.observe(waited_s)
        if enqueue_t0 is not None:
            enqueue_duration.observe(self.clock() - enqueue_t0)

    # --- dispatching ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Run a dispatch cycle soon (a request was queued, or one finished)."""
        if self.queued:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="flow-control-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for band in self.bands.values():
            for flow in band.flows.values():
                while flow.heap:
                    item = self._take(band, flow)
                    if not item.future.done():
                        item.future.set_exception(
                            SchedulingError(
                                503, "the scheduler is shutting down", hdr.DROPPED_SHUTTING_DOWN
                            )
                        )
                    self._done(item.request, item.flow, "RejectedOther", 0.0, None)

    async def _run(self) -> None:
        next_sweep = 0.0
        while True:
            if not self.queued:
                self._wake.clear()
                await self._wake.wait()
            now = self.clock()
            if now >= next_sweep:
                self._expire(now)
                next_sweep = now + 0.05
            t = time.perf_counter()
            dispatched = self.cycle(now)
            if self.metrics is not None:
                self.metrics.cycle_duration.observe(time.perf_counter() - t)
            if dispatched:
                await asyncio.sleep(0)  # let the request be scheduled (and counted) first
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_s)

    def cycle(self, now: float) -> bool:
        """One dispatch decision; True when a request was let go."""
        if not self.queued or self.pool_size() == 0:
            return False
        saturation = self._saturation(now)
        ceilings = self.usage.ceilings(saturation, self._order)
        for priority, ceiling in zip(self._order, ceilings, strict=True):
            band = self.bands[priority]
            if not band.requests:
                continue
            if saturation >= ceiling:
                if self.eviction:
                    self._reclaim(priority, now)
                return False  # head-of-line: lower bands wait too
            flow = band.fairness.pick(band, now)
            if flow is None:
                continue
            item = self._take(band, flow)
            flow.service += item.request.prompt_tokens or item.size / 4
            if not item.future.done():
                item.future.set_result(None)
            self._done(item.request, item.flow, "Dispatched", now - item.enqueued_at, None)
            return True
        return False

    def _expire(self, now: float) -> None:
        empty = self.pool_size() == 0
        for band in self.bands.values():
            for flow in band.flows.values():
                expired = [
                    it
                    for _, it in flow.heap
                    if now - it.enqueued_at >= (self.no_endpoint_ttl_s if empty else it.ttl_s)
                    and (self.no_endpoint_ttl_s if empty else it.ttl_s) > 0
                ]
                for item in expired:
                    self._remove(item)
                    if empty:
                        err = SchedulingError(
                            503,
                            "no ready endpoints in the pool (none appeared in "
                            f"{self.no_endpoint_ttl_s:g} s)",
                            hdr.DROPPED_NO_ENDPOINTS,
                        )
                    else:
                        err = SchedulingError(
                            429,
                            "the request waited its whole flow-control TTL",
                            hdr.DROPPED_TTL_EXPIRED,
                        )
                    if not item.future.done():
                        item.future.set_exception(err)
                    self._done(item.request, item.flow, "EvictedTTL", now - item.enqueued_at, None)

    # --- in-flight eviction (flowControl.enableEviction) -------------------------------------

    def track(self, request: LLMRequest) -> asyncio.Future[str] | None:
        """Register a dispatched request that eviction could revoke; the future resolves (with
        the reason) if it is revoked. None when eviction is off or the request could never be
        a victim (the filter is asked with the highest possible blocked band)."""
        if not self.eviction:
            return None
        victim = Tracked(request, request.priority, self.clock(), next(self._seq))
        if not self.eviction_filter.evictable(victim, 2**62):
            return None
        victim.revoked = asyncio.get_running_loop().create_future()
        self.tracked[id(request)] = victim
        return victim.revoked

    def untrack(self, request: LLMRequest) -> None:
        """The request ended (released by the Director): a revocation of it is confirmed."""
        victim = self.tracked.pop(id(request), None)
        if victim is None:
            return
        if not victim.revoked.done():
            victim.revoked.cancel()
        elif self._pending.pop(id(request), None) is not None:
            waited = self.clock() - victim.revoked_at
            if self.metrics is not None:
                self.metrics.revocations.labels("confirmed", self.metrics.pool).inc()
                self.metrics.revocation_confirmation.labels(self.metrics.pool).observe(waited)
                self.metrics.pending_reclaim.labels(self.metrics.pool).set(len(self._pending))

    def _reclaim(self, blocked_priority: int, now: float) -> None:
        """A band with waiting requests is blocked by saturation: revoke up to two in-flight
        requests the filter allows, in the order policy's order, then wait for the grace before
        revoking more (the detector must first see the capacity they free)."""
        self._expire_pending(now)
        if self._pending or now < self._reclaim_after:
            return
        victims = [
            v
            for v in self.tracked.values()
            if not v.revoked.done() and self.eviction_filter.evictable(v, blocked_priority)
        ]
        if not victims:
            return
        victims.sort(key=self.eviction_order.key)
        for victim in victims[:MAX_REVOCATIONS_PER_DECISION]:
            victim.revoked_at = now
            victim.revoked.set_result(hdr.DROPPED_EVICTED)
            self._pending[id(victim.request)] = victim
            self.revocations += 1
            if self.metrics is not None:
                self.metrics.revocations_issued.labels(
                    self.labels(victim.request)[3], self.metrics.pool
                ).inc()
            log.info(
                "flow control: revoked in-flight request %s (priority %d) for band %d",
                victim.request.request_id,
                victim.priority,
                blocked_priority,
            )
        if self.metrics is not None:
            self.metrics.pending_reclaim.labels(self.metrics.pool).set(len(self._pending))
        self._reclaim_after = now + self.eviction_grace_s()

    def _expire_pending(self, now: float) -> None:
        late = [k for k, v in self._pending.items() if now - v.revoked_at >= REVOCATION_TIMEOUT_S]
        for k in late:
            del self._pending[k]
            log.warning("flow control: a revoked request was still running after %gs",
                        REVOCATION_TIMEOUT_S)  # fmt: skip
            if self.metrics is not None:
                self.metrics.revocations.labels("timed-out", self.metrics.pool).inc()
                self.metrics.pending_reclaim.labels(self.metrics.pool).set(len(self._pending))

    def credit(self, request: LLMRequest, output_tokens: int) -> None:
        """Service a finished request received (least-attained-service fairness)."""
        band = self.bands.get(request.priority)
        if band is None:
            return
        flow = band.flows.get(FlowKey(request.fairness_id, request.priority))
        if flow is not None:
            flow.service += 2 * output_tokens

    def state(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "bands": {
                p: {"requests": b.requests, "bytes": b.bytes, "flows": len(b.flows)}
                for p, b in self.bands.items()
            },
            "outcomes": dict(self.outcomes),
            "stale_endpoints": self.detector.stale_count,
            "eviction": {
                "enabled": self.eviction,
                "tracked": len(self.tracked),
                "revocations": self.revocations,
                "pending": len(self._pending),
            },
        }


def _slo_deadline(request: LLMRequest) -> float:
    ms = hdr.slo_ms(request.header(hdr.SLO_TTFT_MS, hdr.SLO_TTFT_MS_LEGACY))
    return math.inf if ms is None else request.received_at + ms / 1000


def _raw_labels(req: LLMRequest) -> tuple[str, str, str, str]:
    return (req.model or "", req.target_model or "", req.fairness_id, str(req.priority))
