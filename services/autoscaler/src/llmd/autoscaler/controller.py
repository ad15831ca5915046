"""The control loop: observe every variant, decide per model, actuate, explain.

Every `interval_s` (5 s by default; WVA's loop runs every 30-60 s):

1. Observe. For each variant, the cluster's desired and ready replicas and its endpoints; each
   ready engine's `/metrics` is read directly (KV usage, waiting and running requests, the
   completed-request counter, KV capacity from `cache_config_info`). Demand held in front of
   the engines comes from the scheduler's flow-control queue
   (`llm_d_epp_flow_control_queue_size`, per model) and the activator's
   (`llmd_activator_queue_size`, per pool), read from the `demand_urls`.
2. Decide. `decide.analyze` per model, `decide.allocate` over its variants, one `Stabilizer`
   per variant.
3. Actuate. Always export `wva_desired_replicas` (WVA's name and labels: an HPA or KEDA
   ScaledObject written for WVA works unchanged); with `actuation: scale` also ask the cluster
   (Kubernetes scale subresource or the local process pool) for the replicas.
4. Explain. Every decision, with its inputs, goes to a bounded list served at
   `/debug/decisions`, and a changed one to the log.

A model is idle while no engine of it runs, waits for or completes a request and nothing is
queued for it. A pool that something else scaled up from zero (the activator) counts as
activity, so the autoscaler never undoes a scale-from-zero before its first request lands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmd.autoscaler.decide import (
    Analysis,
    ReplicaLoad,
    SaturationSettings,
    Stabilizer,
    Trend,
    VariantState,
    allocate,
    analyze,
)
from llmd.autoscaler.prometheus import EngineReading, PrometheusError, PrometheusSource
from llmd.autoscaler.variants import Variant, by_model
from llmd.protocol.errors import DecodeError
from llmd.protocol.metrics import REQUEST_SUCCESS, parse_engine_snapshot, parse_samples
from llmd.runtime.cluster import Cluster, ClusterError
from llmd.runtime.scrapeclient import ScrapeClient, ScrapeError
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

GATEWAY_QUEUE = "llm_d_epp_flow_control_queue_size"
PREFILL_CAPACITY = "llmd_latency_model_prefill_tokens_per_second"
PROMPT_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
ACTIVATOR_QUEUE = "llmd_activator_queue_size"
MAX_DECISIONS = 512
Actuation = Literal["metric", "scale"]


@dataclass
class Decision:
    """One variant's decision in one loop, with what it was based on."""

    at: float
    model: str
    variant: str
    current: int
    ready: int
    recommended: int
    applied: int
    analysis: Analysis
    actuated: bool = False
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "model": self.model,
            "variant": self.variant,
            "current": self.current,
            "ready": self.ready,
            "recommended": self.recommended,
            "desired": self.applied,
            "analysis": self.analysis.as_dict(),
            "actuated": self.actuated,
            "error": self.error,
        }


@dataclass
class _ModelTrack:
    last_activity: float
    last_total: int = -1
    completed: dict[str, float] = field(default_factory=dict)
    """Per engine key, the completed-request counter at the last scrape."""
    computed: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per engine key, (computed prompt tokens, when) at the last scrape."""


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry, controller_instance: str) -> None:
        self.instance = controller_instance
        labels = ["variant_name", "namespace", "accelerator_type", "controller_instance"]
        self.desired = Gauge(
            "wva_desired_replicas",
            "Replicas the autoscaler wants for the variant (HPA/KEDA read this; WVA's name)",
            labels,
            registry=registry,
        )
        self.current = Gauge(
            "wva_current_replicas", "Replicas the variant has asked of the cluster", labels,
            registry=registry,
        )  # fmt: skip
        self.ratio = Gauge(
            "wva_desired_ratio", "desired / current (desired when current is 0)", labels,
            registry=registry,
        )  # fmt: skip
        self.scaling = Counter(
            "wva_replica_scaling",
            "Scaling actions by direction (up, down) and reason (saturation, demand, idle)",
            ["variant_name", "namespace", "direction", "reason"],
            registry=registry,
        )
        self.loop_seconds = Histogram(
            "llmd_autoscaler_loop_duration_seconds",
            "Time of one observe-decide-actuate loop",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.errors = Counter(
            "llmd_autoscaler_errors",
            "Failures by stage (cluster, scrape, prometheus, demand, latency_model, actuate, "
            "status, variants)",
            ["stage"],
            registry=registry,
        )
        self.saturated = Gauge(
            "llmd_autoscaler_saturated_replicas",
            "Replicas of the model at or over a saturation threshold",
            ["model_name"],
            registry=registry,
        )
        self.queued = Gauge(
            "llmd_autoscaler_queued_requests",
            "Requests held at the gateway or activator for the model, at the last loop",
            ["model_name"],
            registry=registry,
        )
        self.prefill = Gauge(
            "llmd_autoscaler_prefill_tokens_per_second",
            "Prompt tokens per second at the last loop: demand (computed by the model's "
            "engines together) and capacity (one replica's, from the scheduler's latency model; "
            "0: not known)",
            ["model_name", "kind"],
            registry=registry,
        )

    def labels(self, v: Variant) -> tuple[str, str, str, str]:
        return (v.name, v.namespace, v.accelerator, self.instance)


def _direction_reason(analysis: Analysis, up: bool) -> str:
    text = analysis.reason
    if "idle" in text:
        return "idle"
    if "zero" in text or "held at" in text:
        return "demand"
    return "saturation" if up else "spare"


class Autoscaler:
    """Owns the loop; `step()` runs one pass (tests and the debug endpoint call it too)."""

    def __init__(
        self,
        variants: Sequence[Variant],
        cluster: Cluster,
        *,
        settings: SaturationSettings | None = None,
        registry: CollectorRegistry | None = None,
        interval_s: float = 5.0,
        actuation: Actuation = "scale",
        scale_to_zero: bool = False,
        retention_s: float = 600.0,
        up_window_s: float = 0.0,
        down_window_s: float = 30.0,
        max_up: int = 4,
        max_down: int = 1,
        demand_urls: Sequence[str] = (),
        latency_model_urls: dict[str, str] | None = None,
        scrape_timeout_s: float = 1.0,
        controller_instance: str = "",
        predictive: bool = True,
        trend_window_s: float = 30.0,
        startup_estimate_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        prometheus: PrometheusSource | None = None,
    ) -> None:
        self.cluster = cluster
        self.prometheus = prometheus
        """Where engine figures come from when not from the engines themselves."""
        self._readings: dict[str, EngineReading] = {}
        self.settings = settings or SaturationSettings()
        self.interval_s = interval_s
        self.actuation = actuation
        self.scale_to_zero = scale_to_zero
        self.retention_s = retention_s
        self.demand_urls = list(demand_urls)
        self.latency_model_urls = dict(latency_model_urls or {})
        self.scrape_timeout_s = scrape_timeout_s
        self.clock = clock
        self.metrics = AutoscalerMetrics(registry or CollectorRegistry(), controller_instance)
        self._windows = (up_window_s, down_window_s, max_up, max_down)
        self.stabilizers: dict[str, Stabilizer] = {}
        self.tracks: dict[str, _ModelTrack] = {}
        self.variants: list[Variant] = []
        self.models: dict[str, list[Variant]] = {}
        self.status_writer: Callable[[Variant, Decision], Awaitable[None]] | None = None
        """Writes a changed decision back to the variant's object (Kubernetes status)."""
        self._written: dict[str, tuple[int, int]] = {}
        self.predictive = predictive
        self.trend_window_s = trend_window_s
        self.trends: dict[str, Trend] = {}
        self.startup_s = startup_estimate_s
        """Seconds from asking for a replica to its being ready (learned, moving average)."""
        self._pending: dict[str, tuple[float, int]] = {}
        self.batch_limits: dict[str, int] = {}
        """Per variant, the most requests a replica was seen running while others waited."""
        self.set_variants(variants)
        self.decisions: deque[Decision] = deque(maxlen=MAX_DECISIONS)
        self._clients: dict[str, ScrapeClient] = {}
        self._used: set[str] = set()
        self._pass_texts: dict[str, str] = {}
        """/metrics of schedulers and activators read in this pass, by URL."""
        self._last: dict[str, tuple[int, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self.loops = 0
        self.passed = asyncio.Event()
        """Set once a pass has completed."""
        self.last_ok = 0.0

    def set_variants(self, variants: Sequence[Variant]) -> None:
        """Follow a changed set of variants (objects added, edited or deleted in the cluster);
        stabilizer history and activity clocks of variants that remain are kept."""
        now = self.clock()
        self.variants = list(variants)
        self.models = by_model(self.variants)
        keys = {v.key for v in self.variants}
        self.stabilizers = {
            k: self.stabilizers.get(k) or Stabilizer(*self._windows) for k in sorted(keys)
        }
        self.tracks = {m: self.tracks.get(m) or _ModelTrack(last_activity=now) for m in self.models}
        self.trends = {m: self.trends.get(m) or Trend(self.trend_window_s) for m in self.models}
        self._written = {k: w for k, w in self._written.items() if k in keys}
        self.batch_limits = {k: n for k, n in self.batch_limits.items() if k in keys}

    # --- observation -----------------------------------------------------------------------

    async def _get(self, host: str, port: int, path: str) -> str:
        key = f"{host}:{port}"
        self._used.add(key)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = ScrapeClient(host, port, self.scrape_timeout_s)
        return (await client.get(path)).decode("utf-8", "replace")

    async def _get_url(self, url: str) -> str:
        """A scheduler's or activator's /metrics, read once per pass (a scheduler can be both
        a demand and a latency-model source)."""
        text = self._pass_texts.get(url)
        if text is None:
            u = urlsplit(url)
            text = await self._get(u.hostname or "127.0.0.1", u.port or 80, u.path or "/metrics")
            self._pass_texts[url] = text
        return text

    async def _reading(self, ep: Any) -> EngineReading | None:
        """One engine's figures, from Prometheus or its own /metrics (None: not known)."""
        if self.prometheus is not None:
            self._used.add(ep.host_port)
            r = self._readings.get(ep.host_port)
            if r is None or r.kv_usage is None or r.waiting is None:
                self.metrics.errors.labels("prometheus").inc()
                log.debug("no fresh figures for %s in Prometheus", ep.host_port)
                return None
            return r
        try:
            text = await self._get(ep.address, ep.port, "/metrics")
            snap = parse_engine_snapshot(text)
            done = 0.0
            computed = None
            for s in parse_samples(text, (REQUEST_SUCCESS, PROMPT_BY_SOURCE)):
                if s.name == REQUEST_SUCCESS:
                    done += s.value
                elif s.labels.get("source") == "local_compute":
                    computed = (computed or 0.0) + s.value
        except (ScrapeError, DecodeError, ValueError) as exc:
            self.metrics.errors.labels("scrape").inc()
            log.debug("scrape of %s failed: %s", ep.host_port, exc)
            return None
        cap = (snap.num_gpu_blocks or 0) * (snap.block_size or 0) or None
        return EngineReading(snap.kv_cache_usage, snap.waiting, snap.running, done, cap, computed)

    async def _engine(self, track: _ModelTrack, ep: Any) -> tuple[ReplicaLoad, int | None, bool]:
        """(load, KV capacity in tokens, completed any request since the last read)."""
        r = await self._reading(ep)
        if r is None:
            return ReplicaLoad(ep.name, None, None, None), None, False
        before = track.completed.get(ep.host_port)
        if r.completed is not None:
            track.completed[ep.host_port] = r.completed
        # a changed counter (a reset, on a restart, too) means requests completed
        completed = before is not None and r.completed is not None and r.completed != before
        rate = None
        if r.computed_prompt_tokens is not None:
            now = self.clock()
            last = track.computed.get(ep.host_port)
            track.computed[ep.host_port] = (r.computed_prompt_tokens, now)
            if last is not None and now > last[1] and r.computed_prompt_tokens >= last[0]:
                rate = (r.computed_prompt_tokens - last[0]) / (now - last[1])
        load = ReplicaLoad(ep.name, r.kv_usage, r.waiting, r.running, rate)
        return load, r.kv_capacity_tokens, completed

    async def _variant(
        self, track: _ModelTrack, v: Variant, prefill_capacity: float | None = None
    ) -> tuple[VariantState, bool] | None:
        try:
            status = await self.cluster.status(v.target)
            eps = [e for e in await self.cluster.endpoints(v.target) if e.ready]
        except ClusterError as exc:
            self.metrics.errors.labels("cluster").inc()
            log.warning("variant %s: cannot read pool %s: %s", v.name, v.target, exc)
            return None
        results = await asyncio.gather(*(self._engine(track, e) for e in eps))
        loads = tuple(r[0] for r in results)
        caps = [r[1] for r in results if r[1]]
        active = any(r[2] for r in results) or any(
            (ld.running or 0) + (ld.waiting or 0) > 0 for ld in loads
        )
        for ld in loads:  # a replica with requests waiting runs as many as it can
            if ld.waiting and ld.running:
                self.batch_limits[v.key] = max(self.batch_limits.get(v.key, 0), ld.running)
        state = VariantState(
            v,
            status.desired,
            status.ready,
            loads,
            max(caps) if caps else None,
            self.batch_limits.get(v.key) or v.max_batch,
            prefill_capacity,
        )
        return state, active

    async def demand(self) -> tuple[dict[str, float], dict[str, float]]:
        """Requests held in front of the engines: (per model from the scheduler's flow-control
        queue, per pool from the activator's)."""
        per_model: dict[str, float] = {}
        per_pool: dict[str, float] = {}
        for url in self.demand_urls:
            try:
                text = await self._get_url(url)
                for s in parse_samples(text, (GATEWAY_QUEUE, ACTIVATOR_QUEUE)):
                    if s.name == GATEWAY_QUEUE:
                        model = s.labels.get("model_name", "")
                        per_model[model] = per_model.get(model, 0.0) + s.value
                    else:
                        pool = s.labels.get("pool", "")
                        per_pool[pool] = per_pool.get(pool, 0.0) + s.value
            except (ScrapeError, DecodeError, ValueError) as exc:
                self.metrics.errors.labels("demand").inc()
                log.debug("demand source %s failed: %s", url, exc)
        return per_model, per_pool

    async def prefill_capacity(self, model: str) -> float | None:
        """Prompt tokens per second one replica of `model` computes, from the latency model of
        the scheduler in front of it (None: no URL, unreadable, or the model not trained)."""
        url = self.latency_model_urls.get(model)
        if url is None:
            return None
        try:
            text = await self._get_url(url)
            values = [s.value for s in parse_samples(text, (PREFILL_CAPACITY,))]
        except (ScrapeError, DecodeError, ValueError) as exc:
            self.metrics.errors.labels("latency_model").inc()
            log.debug("latency model %s failed: %s", url, exc)
            return None
        good = [v for v in values if v > 0 and math.isfinite(v)]
        return min(good) if good else None

    # --- one pass --------------------------------------------------------------------------

    async def step(self) -> list[Decision]:
        started = self.clock()
        self._used = set()
        self._pass_texts = {}
        per_model, per_pool = await self.demand()
        if self.prometheus is not None:
            try:
                self._readings = await self.prometheus.read()
            except PrometheusError as exc:
                self.metrics.errors.labels("prometheus").inc()
                log.warning("Prometheus not read (every replica unknown this pass): %s", exc)
                self._readings = {}
        out: list[Decision] = []
        for model, variants in self.models.items():
            track = self.tracks[model]
            capacity = await self.prefill_capacity(model)
            observed = await asyncio.gather(*(self._variant(track, v, capacity) for v in variants))
            if any(o is None for o in observed):
                continue  # a pool we cannot read is never scaled blind
            states = [o[0] for o in observed if o is not None]
            now = self.clock()
            queued = per_model.get(model, 0.0)
            if len(self.models) == 1:  # queued without a model name: the only model's
                queued += per_model.get("", 0.0)
            queued += sum(per_pool.get(v.target, 0.0) for v in variants)
            total = sum(st.desired for st in states)
            if any(o[1] for o in observed if o is not None) or queued > 0:
                track.last_activity = now
            if track.last_total == 0 and total > 0:  # scaled from zero by someone else
                track.last_activity = now
            track.last_total = total
            retention = None
            if self.scale_to_zero and all(v.min_replicas == 0 for v in variants):
                retention = min(
                    v.retention_s if v.retention_s is not None else self.retention_s
                    for v in variants
                )
            analysis = analyze(
                states,
                self.settings,
                queued=queued,
                idle_for_s=now - track.last_activity,
                retention_s=retention,
            )
            analysis = self._ahead(model, states, analysis, now)
            self._learn_startup(states, now)
            self.metrics.saturated.labels(model).set(analysis.saturated)
            self.metrics.queued.labels(model).set(queued)
            self.metrics.prefill.labels(model, "demand").set(analysis.prefill_tps or 0.0)
            self.metrics.prefill.labels(model, "capacity").set(capacity or 0.0)
            wanted = allocate(states, analysis.replicas)
            for st in states:
                v = st.variant
                rec = wanted[v.key]
                applied = self.stabilizers[v.key].apply(now, st.desired, rec)
                d = Decision(now, model, v.name, st.desired, st.ready, rec, applied, analysis)
                await self._actuate(d, v)
                out.append(d)
                self.decisions.append(d)
        for key in set(self._clients) - self._used:  # engines gone: their connections too
            self._clients.pop(key).discard()
        for track in self.tracks.values():
            for gone in set(track.completed) - self._used:
                del track.completed[gone]
            for gone in set(track.computed) - self._used:
                del track.computed[gone]
        self.loops += 1
        self.passed.set()
        self.last_ok = self.clock()
        self.metrics.loop_seconds.observe(self.clock() - started)
        return out

    def _ahead(
        self, model: str, states: Sequence[VariantState], analysis: Analysis, now: float
    ) -> Analysis:
        """Scale up for the load expected when a replica asked for now is ready, if rising."""
        current = sum(st.desired for st in states)
        starting = sum(st.ready for st in states) < current
        if analysis.observed == 0 or current == 0:
            return analysis
        trend = self.trends[model]
        trend.add(now, analysis.load)
        if not self.predictive or starting or analysis.replicas == 0:
            return analysis
        ahead = trend.ahead(self.startup_s)
        want = math.ceil(ahead - 1e-9)
        if want <= max(analysis.replicas, current):
            return analysis
        why = (
            f"load rising {trend.slope():.3f} replicas/s: {ahead:.1f} expected in "
            f"{self.startup_s:.0f}s (engine start)"
        )
        reason = (
            f"{analysis.reason}; {why}"
            if analysis.reason.startswith("scale up")
            else f"scale up: {why}"
        )
        return dataclasses.replace(analysis, replicas=want, reason=reason)

    def _learn_startup(self, states: Sequence[VariantState], now: float) -> None:
        """Time from a scale-up request to its replicas being ready, as a moving average."""
        for st in states:
            pending = self._pending.get(st.variant.key)
            if pending is not None and st.ready >= pending[1]:
                took = now - pending[0]
                self.startup_s = 0.5 * self.startup_s + 0.5 * took
                del self._pending[st.variant.key]
            elif pending is not None and st.desired < pending[1]:
                del self._pending[st.variant.key]  # scaled down again before it was ready

    async def _actuate(self, d: Decision, v: Variant) -> None:
        await self._apply(d, v)
        if self.status_writer is not None and self._written.get(v.key) != (d.current, d.applied):
            try:
                await self.status_writer(v, d)
                self._written[v.key] = (d.current, d.applied)
            except ClusterError as exc:
                self.metrics.errors.labels("status").inc()
                log.warning("variant %s: status not written: %s", v.name, exc)

    async def _apply(self, d: Decision, v: Variant) -> None:
        labels = self.metrics.labels(v)
        self.metrics.desired.labels(*labels).set(d.applied)
        self.metrics.current.labels(*labels).set(d.current)
        self.metrics.ratio.labels(*labels).set(d.applied / d.current if d.current else d.applied)
        key = (d.applied, d.analysis.reason)
        if self._last.get(v.key) != key:  # the log says what changed, not every pass
            log.info(
                "variant %s (%s): %d -> %d (recommended %d; %s)",
                v.name, d.model, d.current, d.applied, d.recommended, d.analysis.reason,
            )  # fmt: skip
        self._last[v.key] = key
        if d.applied == d.current:
            return
        up = d.applied > d.current
        self.metrics.scaling.labels(
            v.name, v.namespace, "up" if up else "down", _direction_reason(d.analysis, up)
        ).inc()
        if self.actuation != "scale":
            return
        try:
            await self.cluster.scale(v.target, d.applied)
            d.actuated = True
            if up and d.current > 0 and v.key not in self._pending:
                self._pending[v.key] = (d.at, d.applied)
        except ClusterError as exc:
            self.metrics.errors.labels("actuate").inc()
            d.error = str(exc)
            log.error("variant %s: scaling %s to %d failed: %s", v.name, v.target, d.applied, exc)

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad pass never stops the loop
                log.exception("autoscaler pass failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="autoscaler")

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        if self.prometheus is not None:
            await self.prometheus.close()
