"""The flow controller: bands, flows and their queues, the dispatch cycle, TTLs, client
departures, eviction of in-flight sheddable requests, and the `llm_d_epp_flow_control_*`
metrics."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from llmd.protocol import headers as hdr
from llmd.runtime.config import parse_duration
from llmd.runtime.fastmetrics import Counter, Gauge, Histogram
from llmd.runtime.tasks import cancel_tasks
from llmd.scheduler.flowcontrol.policies import (
    Band,
    EvictionFilter,
    EvictionOrder,
    FairnessPolicy,
    Flow,
    FlowKey,
    Item,
    OrderingPolicy,
    PriorityThenTimeEvictionOrder,
    SaturationDetector,
    SheddableEvictionFilter,
    Tracked,
    UsageLimitPolicy,
)
from llmd.scheduler.flowcontrol.spec import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_BAND_MAX_REQUESTS,
    DEFAULT_TTL_S,
    BandTemplate,
    FlowControlSpec,
    parse_quantity,
)
from llmd.scheduler.framework import (
    EndpointState,
    LLMRequest,
    NoParams,
    PluginHandle,
    SchedulingError,
)

log = logging.getLogger(__name__)

MAX_REVOCATIONS_PER_DECISION = 2
REVOCATION_TIMEOUT_S = 10.0

# --- the controller ----------------------------------------------------------------------------


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
        await cancel_tasks(self._task)
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
