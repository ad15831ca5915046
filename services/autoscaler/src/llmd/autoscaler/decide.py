"""The decision, as pure functions: saturation analysis, cost-aware allocation, stabilization.

    observations of every replica of every variant of a model + demand queued at the gateway
      -> analyze(): saturated replicas, spare KV and queue capacity, the replicas the load needs
      -> allocate(): that total spread over the variants, cheapest capacity added first and
         most expensive removed first, within each variant's [minReplicas, maxReplicas]
      -> Stabilizer: HPA-style windows (scale up on the lowest, down on the highest
         recommendation seen in the window) and step limits

The saturation rule uses WVA's keys and defaults. A replica is saturated when its KV-cache usage
reaches `kvCacheThreshold` (0.8) or its waiting queue reaches `queueLengthThreshold` (5). Spare
capacity is averaged over the replicas that are not saturated: `kvCacheThreshold - usage` and
`queueLengthThreshold - waiting`; the model scales up when either falls under its trigger
(`kvSpareTrigger` 0.1, `queueSpareTrigger` 3), or when every replica is saturated, or when
requests wait at the gateway (flow control) or at the activator. The replicas the load needs
are the fewest that keep the spare at the triggers with the load spread evenly:
`ceil(sum(usage) / (kvCacheThreshold - kvSpareTrigger))` and the same for waiting requests, so
one decision can add several replicas (WVA adds one per 30 s cycle). Running requests count
too, once a replica's batch limit is known (its running count while requests wait): the load
needs `ceil(sum(running) / (limit * batch_target))` replicas, so a pool whose batches are full
but whose KV and queues look empty is not scaled down into a queue. Prefill is load as well,
once a replica's prefill capacity is known (the tokens per second the scheduler's latency model
implies): the prompt tokens the engines computed per second need
`ceil(rate / (capacity * prefill_target))` replicas. A prompt-heavy load shows up there before
queues form. Scaling down removes
replicas only while the remaining ones would keep that spare.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmd.autoscaler.variants import Variant


@dataclass(frozen=True, slots=True)
class SaturationSettings:
    kv_cache_threshold: float = 0.8
    queue_length_threshold: float = 5.0
    kv_spare_trigger: float = 0.1
    queue_spare_trigger: float = 3.0
    batch_target: float = 0.75
    """Running requests per replica, as a share of its batch limit, the load is sized for."""
    prefill_target: float = 0.7
    """Prefill tokens per second per replica, as a share of its prefill capacity, the load is
    sized for."""


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One ready replica at one scrape (None: the engine did not answer or publish it)."""

    name: str
    kv_usage: float | None
    waiting: int | None
    running: int | None
    prefill_tps: float | None = None
    """Prompt tokens it computed per second since the previous read (None: not known yet)."""

    @property
    def known(self) -> bool:
        return self.kv_usage is not None and self.waiting is not None


@dataclass(frozen=True, slots=True)
class VariantState:
    variant: Variant
    desired: int
    """Replicas asked of the cluster now."""
    ready: int
    loads: tuple[ReplicaLoad, ...] = ()
    capacity_tokens: int | None = None
    """KV capacity of one replica (from the engines' cache_config_info), when known."""
    batch_limit: int | None = None
    """Most requests one replica runs at once (learned: its running count while requests
    wait), when known."""
    prefill_capacity_tps: float | None = None
    """Prompt tokens one replica computes per second (the scheduler's latency model), when
    known."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the load of one model needs, and why."""

    replicas: int
    """Replicas the model needs in total (0 only for scale-to-zero)."""
    reason: str
    saturated: int = 0
    observed: int = 0
    spare_kv: float | None = None
    spare_queue: float | None = None
    queued: float = 0.0
    load: float = 0.0
    """The load in replicas, before rounding (what a trend is fitted to)."""
    prefill_tps: float | None = None
    """Prompt tokens computed per second over the pool, when the engines report it."""

    def as_dict(self) -> dict[str, object]:
        return {
            "replicas": self.replicas,
            "reason": self.reason,
            "saturated": self.saturated,
            "observed": self.observed,
            "spare_kv": None if self.spare_kv is None else round(self.spare_kv, 4),
            "spare_queue": None if self.spare_queue is None else round(self.spare_queue, 3),
            "queued": self.queued,
            "load": round(self.load, 3),
            "prefill_tps": None if self.prefill_tps is None else round(self.prefill_tps, 1),
        }


def analyze(
    states: Sequence[VariantState],
    s: SaturationSettings,
    *,
    queued: float = 0.0,
    idle_for_s: float = 0.0,
    retention_s: float | None = None,
) -> Analysis:
    """The replicas one model needs now. `queued`: requests held at the gateway or activator
    for this model; `idle_for_s`: how long the model has seen no request; `retention_s`: the
    idle time after which it goes to zero (None: never)."""
    current = sum(st.desired for st in states)
    ready = sum(st.ready for st in states)
    loads = [ld for st in states for ld in st.loads if ld.known]
    if current == 0:
        if queued > 0:
            return Analysis(1, f"scale from zero: {queued:g} request(s) waiting", queued=queued)
        return Analysis(0, "at zero, no demand")
    if retention_s is not None and queued == 0 and idle_for_s >= retention_s:
        return Analysis(0, f"idle for {idle_for_s:.0f}s >= retention {retention_s:.0f}s")
    if not loads:
        if queued > 0 and ready > 0:
            return Analysis(current + 1, "no engine metrics; requests queued", queued=queued)
        return Analysis(current, "no engine metrics yet: hold", queued=queued)
    kv_budget = max(1e-6, s.kv_cache_threshold - s.kv_spare_trigger)
    q_budget = max(1e-6, s.queue_length_threshold - s.queue_spare_trigger)
    sat = [
        ld
        for ld in loads
        if (ld.kv_usage or 0.0) >= s.kv_cache_threshold
        or (ld.waiting or 0) >= s.queue_length_threshold
    ]
    free = [ld for ld in loads if ld not in sat]
    spare_kv = (
        sum(s.kv_cache_threshold - (ld.kv_usage or 0.0) for ld in free) / len(free)
        if free
        else None
    )
    spare_q = (
        sum(s.queue_length_threshold - (ld.waiting or 0) for ld in free) / len(free)
        if free
        else None
    )
    total_kv = sum(ld.kv_usage or 0.0 for ld in loads)
    total_wait = sum(ld.waiting or 0 for ld in loads) + queued
    # loads seen on `observed` replicas stand for all `ready` ones (scrapes can miss a few)
    scale = ready / len(loads) if ready > len(loads) else 1.0
    need_run = 0.0
    limits = [st.batch_limit for st in states if st.batch_limit]
    if limits:  # busy batches are load too, not only KV and queues
        total_run = sum(ld.running or 0 for ld in loads)
        need_run = total_run * scale / (min(limits) * max(0.05, s.batch_target))
    rates = [ld.prefill_tps for ld in loads if ld.prefill_tps is not None]
    prefill = sum(rates) * (ready / len(rates) if ready > len(rates) else 1.0) if rates else None
    caps = [st.prefill_capacity_tps for st in states if st.prefill_capacity_tps]
    need_prefill = 0.0
    if prefill is not None and caps:
        need_prefill = prefill / (min(caps) * max(0.05, s.prefill_target))
    need = max(1, math.ceil(total_kv * scale / kv_budget - 1e-9),
               math.ceil(total_wait * scale / q_budget - 1e-9),
               math.ceil(need_run - 1e-9), math.ceil(need_prefill - 1e-9))  # fmt: skip

    load = max(total_kv * scale / kv_budget, total_wait * scale / q_budget, need_run, need_prefill)

    def result(replicas: int, reason: str) -> Analysis:
        return Analysis(
            replicas, reason, len(sat), len(loads), spare_kv, spare_q, queued, load, prefill
        )

    reasons = []
    if not free:
        reasons.append("every replica saturated")
    if spare_kv is not None and spare_kv < s.kv_spare_trigger:
        reasons.append(f"spare KV {spare_kv:.2f} < kvSpareTrigger {s.kv_spare_trigger:g}")
    if spare_q is not None and spare_q < s.queue_spare_trigger:
        reasons.append(f"spare queue {spare_q:.1f} < queueSpareTrigger {s.queue_spare_trigger:g}")
    if queued > 0:
        reasons.append(f"{queued:g} request(s) held at the gateway or activator")
    if math.ceil(need_run - 1e-9) > current:
        reasons.append(
            f"running batches need {need_run:.1f} replica(s) at {s.batch_target:.0%} of "
            f"their limit {min(limits)}"
        )
    if math.ceil(need_prefill - 1e-9) > current:
        reasons.append(
            f"prefill {prefill:.0f} tok/s needs {need_prefill:.1f} replica(s) at "
            f"{s.prefill_target:.0%} of {min(caps):.0f} tok/s each"
        )
    if reasons:
        return result(max(current + 1, need), "scale up: " + "; ".join(reasons))
    if ready < current:
        return result(current, f"{current - ready} replica(s) starting: hold")
    if need < current and not sat:
        return result(need, f"load fits {need} replica(s) with spare above triggers")
    return result(current, "within thresholds")


def _unit_cost(st: VariantState) -> float:
    """Cost per unit of capacity (per KV token when known, else per replica)."""
    if st.capacity_tokens:
        return st.variant.cost / st.capacity_tokens * 1e6
    return st.variant.cost


def allocate(states: Sequence[VariantState], total: int) -> dict[str, int]:
    """`total` replicas spread over the variants of one model: start from what each has
    (within its bounds), add to the cheapest capacity first, remove from the most expensive
    first. At `total == 0` every variant goes to its minReplicas."""
    want = {
        st.variant.key: min(max(st.desired, st.variant.min_replicas), st.variant.max_replicas)
        for st in states
    }
    if total == 0:
        return {st.variant.key: st.variant.min_replicas for st in states}
    cheap_first = sorted(states, key=lambda st: (_unit_cost(st), st.variant.name))
    have = sum(want.values())
    while have < total:
        grow = next(
            (st for st in cheap_first if want[st.variant.key] < st.variant.max_replicas), None
        )
        if grow is None:
            break
        want[grow.variant.key] += 1
        have += 1
    while have > total:
        shrink = next(
            (st for st in reversed(cheap_first) if want[st.variant.key] > st.variant.min_replicas),
            None,
        )
        if shrink is None:
            break
        want[shrink.variant.key] -= 1
        have -= 1
    if have == 0 and total > 0:  # never leave a model with demand at zero
        first = cheap_first[0]
        want[first.variant.key] = max(1, want[first.variant.key])
    return want


@dataclass
class Stabilizer:
    """HPA-style smoothing of one variant's recommendations.

    Scaling up follows the lowest recommendation of the last `up_window_s` (0: at once),
    scaling down the highest of the last `down_window_s`, so a brief dip never removes a
    replica that a moment later would be missed. Each decision moves at most `max_up` /
    `max_down` replicas, except to and from zero (scale-to-zero is a decision already
    delayed by its retention window; scale-from-zero must not wait)."""

    up_window_s: float = 0.0
    down_window_s: float = 30.0
    max_up: int = 4
    max_down: int = 1
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))

    def apply(self, now: float, current: int, recommended: int) -> int:
        self.history.append((now, recommended))
        horizon = now - max(self.up_window_s, self.down_window_s)
        while self.history and self.history[0][0] < horizon:
            self.history.popleft()
        if recommended > current:
            if current == 0:
                return recommended
            window = [r for t, r in self.history if t >= now - self.up_window_s]
            target = max(current, min(window, default=recommended))
            return min(target, current + self.max_up)
        if recommended < current:
            if recommended == 0:
                return 0
            window = [r for t, r in self.history if t >= now - self.down_window_s]
            target = min(current, max(window, default=recommended))
            return max(target, current - self.max_down)
        return current


@dataclass
class Trend:
    """The load's recent slope, to scale up before the load arrives rather than after.

    A linear fit over the last `window_s` of load readings (replicas); `ahead(lead_s)` is the
    load expected `lead_s` from now when it is rising (an engine takes that long to start),
    and the current load otherwise: a falling trend never scales down early."""

    window_s: float = 30.0
    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=1024))

    def add(self, now: float, load: float) -> None:
        self.points.append((now, load))
        while self.points and self.points[0][0] < now - self.window_s:
            self.points.popleft()

    def slope(self) -> float:
        if len(self.points) < 3:
            return 0.0
        n = len(self.points)
        mt = sum(t for t, _ in self.points) / n
        ml = sum(v for _, v in self.points) / n
        var = sum((t - mt) ** 2 for t, _ in self.points)
        if var <= 0:
            return 0.0
        return sum((t - mt) * (v - ml) for t, v in self.points) / var

    def ahead(self, lead_s: float) -> float:
        last = self.points[-1][1] if self.points else 0.0
        return last + max(0.0, self.slope()) * lead_s
