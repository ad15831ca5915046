"""The Director: one request's path through the scheduler, independent of Envoy.

    parse -> model rewrite -> candidates (fresh endpoints, subset hint) -> data producers
          -> profile handler loop (filters -> weighted scorers -> picker) -> pre-request plugins
          -> pick-time accounting -> Decision
    response headers / first byte / completion -> response hooks, release of the accounting

Everything here is synchronous and allocation-light: one decision is a few hundred
microseconds of CPU and never awaits, so concurrent decisions are serialized on the event loop
and each one sees the accounting of the one before (the herding fix).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from llmd.protocol import headers as hdr
from llmd.protocol.openai import Usage
from llmd.scheduler.config import BuiltConfig, Profile
from llmd.scheduler.datalayer import Datastore, widening
from llmd.scheduler.flowcontrol import FlowController, FlowMetrics, UtilizationDetector
from llmd.scheduler.framework import (
    AsyncDataProducer,
    EndpointState,
    Filter,
    LLMRequest,
    LoadEstimator,
    PrefixMatch,
    ProfileResult,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
    clamp01,
    prefix_matches,
    uncached_tokens,
)
from llmd.scheduler.hotprompts import HotPrompts
from llmd.scheduler.metrics import SchedulerMetrics
from llmd.scheduler.parsing import (
    CHAT_SUFFIXES,
    ParseError,
    is_inference_path,
    parse_openai,
    rewrite_model,
)

log = logging.getLogger(__name__)

DECISION_BUFFER = 512


@dataclass(slots=True)
class Decision:
    """Where a request goes and what to add to it; carried until the response completes."""

    request: LLMRequest
    endpoints: list[EndpointState]
    set_headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    """A replacement body (model rewrite), or None to forward the original."""
    result: SchedulingResult | None = None
    tokens: int = 0
    status: int = 0
    first_byte_at: float = 0.0
    completed: bool = False
    released: bool = False
    """The in-flight accounting was given back (at the latest when `completed`)."""
    ended_at: float = 0.0
    """When the gateway ended the request's stream (0 while it runs)."""
    token: str = ""
    """Correlates the gateway's access-log entry with this decision (lean response path)."""
    accounted: bool = False
    pick_id: int = 0
    """The endpoint's unseen-pick entry (0 = none), dropped when the request completes."""

    route_to: str = ""
    """host:port of a destination outside the pool (the activator of a pool at zero)."""

    @property
    def destination(self) -> str:
        if self.route_to:
            return self.route_to
        if self.result is None or not self.result.port:
            return ",".join(e.key for e in self.endpoints)
        # data-parallel ranks of one pod share the sidecar's primary port: list it once
        return ",".join(dict.fromkeys(self.result.destination(e) for e in self.endpoints))

    @property
    def primary(self) -> str:
        """The endpoint Envoy sends the request to first."""
        if self.route_to:
            return self.route_to
        if self.result is None:
            return self.endpoints[0].key
        return self.result.destination(self.endpoints[0])


@dataclass(slots=True)
class _Explanation:
    """Raw material of a decision's explanation, rendered only when someone asks."""

    seq: int
    request_id: str
    model: str
    at: float
    candidates: list[str]
    profiles: dict[
        str,
        tuple[
            list[tuple[str, int]],
            list[tuple[str, float, list[float]]],
            list[str],
            list[float],
            list[str],
        ],
    ]
    prefix: dict[str, PrefixMatch] | None
    error: str | None = None
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per profile, what plugins added to its ProfileResult's explanation (the P/D decision)."""

    def render(self) -> dict[str, Any]:
        profiles: dict[str, Any] = {}
        for name, (filters, scorers, eps, totals, picked) in self.profiles.items():
            profiles[name] = {
                "filters": [{"plugin": f, "kept": n} for f, n in filters],
                "scores": {
                    s: {
                        "weight": w,
                        "per_endpoint": dict(zip(eps, (round(x, 4) for x in vals), strict=False)),
                    }
                    for s, w, vals in scorers
                },
                "totals": dict(zip(eps, (round(t, 4) for t in totals), strict=False)),
                "picked": picked,
                **self.notes.get(name, {}),
            }
        out: dict[str, Any] = {
            "seq": self.seq,
            "request_id": self.request_id,
            "model": self.model,
            "unix_time": round(self.at, 3),
            "candidates": self.candidates,
            "profiles": profiles,
        }
        if self.prefix:
            out["prefix_match_blocks"] = {
                k: f"{m.match_blocks}/{m.total_blocks}" for k, m in self.prefix.items()
            }
        if self.error:
            out["error"] = self.error
        return out


class Director:
    """Runs the configured plugins for each request and keeps the load accounting."""

    def __init__(
        self,
        built: BuiltConfig,
        datastore: Datastore,
        metrics: SchedulerMetrics,
        tracer: trace.Tracer | None = None,
        objectives: Mapping[str, int] | None = None,
        flow_metrics: FlowMetrics | None = None,
        activator: str = "",
    ) -> None:
        self.built = built
        self.activator = activator
        """host:port of llmd-activator: where requests go while the pool has no endpoint."""
        self.objectives: Mapping[str, int] = objectives or {}
        """InferenceObjective name -> priority (llm-d: an unknown objective is priority 0)."""
        self.datastore = datastore
        self.metrics = metrics
        self.pick_time_accounting = built.settings.pick_time_accounting
        self.emit_scores = built.settings.emit_endpoint_scores
        self.decisions: deque[_Explanation] = deque(maxlen=DECISION_BUFFER)
        self._seq = 0
        self._rng = random.Random()
        loads = [p for p in built.plugins.values() if isinstance(p, LoadEstimator)]
        self._load = loads[0] if loads else None
        self._async_producers = [p for p in built.producers if isinstance(p, AsyncDataProducer)]
        self._timers: dict[tuple[str, str], Any] = {}
        self.inflight = 0
        self.hot: HotPrompts | None = None
        """Learns the pool's hot chat heads from routed requests (None: off)."""
        self.detector = built.saturation_detector
        if isinstance(self.detector, UtilizationDetector):
            self.detector.staleness_source = lambda: datastore.stale_after_s
        self.flow: FlowController | None = None
        if built.flow is not None:
            parts = built.flow
            self.flow = FlowController(
                parts.spec,
                detector=parts.detector,
                usage=parts.usage,
                fairness=parts.fairness,
                ordering=parts.ordering,
                candidates=datastore.candidates,
                pool_size=lambda: len(datastore.endpoints),
                metrics=flow_metrics,
                clock=datastore.clock,
                labels=self._flow_labels,
                eviction_filter=parts.eviction_filter,
                eviction_order=parts.eviction_order,
                eviction_grace_s=self._eviction_grace,
            )
        self.tracer = tracer
        """Spans per stage (llm-d's names) only when tracing is configured: no cost otherwise."""

    # --- request side ----------------------------------------------------------------------

    def new_request(self, headers: dict[str, str], path: str) -> LLMRequest:
        rid = headers.get(hdr.REQUEST_ID) or str(uuid.uuid4())
        headers[hdr.REQUEST_ID] = rid
        req = LLMRequest(request_id=rid, path=path, headers=headers, body=b"")
        rewrite = req.header(hdr.MODEL_NAME_REWRITE, hdr.MODEL_NAME_REWRITE_LEGACY)
        if rewrite:
            req.target_model = rewrite
        req.fairness_id = req.header(hdr.FAIRNESS_ID, hdr.FAIRNESS_ID_LEGACY) or ""
        req.objective = req.header(hdr.INFERENCE_OBJECTIVE, hdr.INFERENCE_OBJECTIVE_LEGACY) or ""
        if req.objective:
            req.priority = self.objectives.get(req.objective, 0)
        return req

    def _eviction_grace(self) -> float:
        """How long after a revocation the detector needs to see the capacity it frees."""
        if isinstance(self.detector, UtilizationDetector):
            interval = self.datastore.scraper.effective_interval_s
            return interval + self.detector.staleness_s + 0.25
        return 0.01  # in-flight accounting: at once

    def evictable(self, req: LLMRequest) -> asyncio.Future[str] | None:
        """With in-flight eviction on, a future that resolves (with the dropped reason) if flow
        control revokes this dispatched request; None when it never can be."""
        return self.flow.track(req) if self.flow is not None else None

    def _flow_labels(self, req: LLMRequest) -> tuple[str, str, str, str]:
        model, target, fairness, priority = self._labels(req)
        return model, target, fairness, priority

    def _labels(self, req: LLMRequest) -> tuple[str, ...]:
        return self.metrics.request_labels(
            req.model or "", req.target_model or "", req.fairness_id, req.priority
        )

    async def admit(self, req: LLMRequest) -> None:
        """Flow control's gate, before scheduling: returns when the request may be scheduled,
        SchedulingError (429/503 with llm-d's dropped reason) when it may not. Without flow
        control only sheddable requests (priority < 0) are dropped, and only while the pool is
        saturated (llm-d's legacy admission)."""
        if not req.parsed and is_inference_path(req.path):
            with contextlib.suppress(ParseError):  # model labels for the flow-control metrics
                parse_openai(req, head=self.hot is not None)
        if self.activator and not self.datastore.candidates():
            return  # the pool is at zero: the activator holds the request, not the queue
        if self.flow is not None:
            await self.flow.admit(req)
            return
        if req.priority < 0 and self.detector is not None:
            now = self.datastore.clock()
            if self.detector.pool_saturation(self.datastore.candidates(), now) >= 1.0:
                raise SchedulingError(
                    429, "system saturated, sheddable request dropped", hdr.DROPPED_SATURATED
                )

    def _timer(self, point: str, plugin: Any) -> Any:
        key = (point, plugin.name)
        h = self._timers.get(key)
        if h is None:
            h = self._timers[key] = self.metrics.plugin_duration.labels(
                point, plugin.type_name, plugin.name
            )
        return h

    def schedule(self, req: LLMRequest, subset: list[str] | None = None) -> Decision:
        """Pick endpoints for a request whose body is complete; SchedulingError when it cannot."""
        t0 = time.perf_counter()
        try:
            with self._span("gateway.request_orchestration", {"gen_ai.request.id": req.request_id}):
                return self._schedule(req, subset)
        finally:
            self.metrics.scheduler_e2e.observe(time.perf_counter() - t0)

    def _span(self, name: str, attributes: dict[str, Any] | None = None) -> Any:
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    async def prefetch(self, req: LLMRequest, subset: list[str] | None = None) -> None:
        """Let producers that need I/O fetch their data before `schedule` (no-op without any)."""
        if not self._async_producers:
            return
        if not req.parsed and is_inference_path(req.path) and "openai-parser" in self.built.parsers:
            try:
                parse_openai(req, head=self.hot is not None)
            except ParseError:
                return  # schedule() reports it
        if not req.parsed:
            return
        candidates = self._candidates(subset)
        for producer in self._async_producers:
            try:
                await producer.prefetch(req, candidates)
            except Exception:
                log.exception("data producer %s failed to prefetch", producer.name)

    def _candidates(self, subset: list[str] | None) -> list[EndpointState]:
        return _within(self.datastore.candidates(), _hosts(subset))

    def _wider_candidates(self, subset: list[str] | None, than: int) -> list[list[EndpointState]]:
        """The datastore's ever wider candidate sets within the gateway's `subset`, those
        larger than `than` endpoints (built only when a profile's filters drained its
        candidates: the usual request needs the first set alone)."""
        hosts = _hosts(subset)
        tiers = widening(_within(tier, hosts) for tier in self.datastore.candidate_tiers())
        return [tier for tier in tiers if len(tier) > than]

    def _schedule(self, req: LLMRequest, subset: list[str] | None) -> Decision:
        body_out: bytes | None = None
        if is_inference_path(req.path) and "openai-parser" in self.built.parsers:
            if not req.parsed:
                try:
                    parse_openai(req, head=self.hot is not None)
                except ParseError as exc:
                    raise SchedulingError(400, str(exc)) from None
            if req.target_model != req.model:
                body_out = rewrite_model(req.body, req.target_model)
        elif "passthrough-parser" not in self.built.parsers:
            raise SchedulingError(400, f"no parser handles the path {req.path!r}")
        labels = self._labels(req)
        self.metrics.request_total.labels(*labels).inc()
        self.metrics.request_size.labels(*labels).observe(len(req.body))

        candidates = self._candidates(subset)
        if not candidates and self.activator and not self.datastore.candidates():
            self.metrics.activator_routed.inc()
            return Decision(req, [], body=body_out, route_to=self.activator)
        if not candidates:
            raise SchedulingError(503, "no ready endpoints in the pool", hdr.DROPPED_NO_ENDPOINTS)

        for producer in self.built.producers:
            t = time.perf_counter()
            try:
                producer.produce(req, candidates)
            except Exception:  # a producer failure degrades scoring, never the request
                log.exception("data producer %s failed", producer.name)
            self._timer("DataProducer", producer).observe(time.perf_counter() - t)
        for admitter in self.built.admitters:
            reason = admitter.admit(req, candidates)
            if reason is not None:
                raise SchedulingError(429, reason, hdr.DROPPED_SATURATED)

        explain = _Explanation(
            self._next_seq(),
            req.request_id,
            req.target_model,
            time.time(),
            [e.name for e in candidates],
            {},
            None,
        )
        results: dict[str, ProfileResult | None] = {}
        handler = self.built.handler
        names = list(self.built.profiles)
        errors: list[SchedulingError] = []
        try:
            while True:
                chosen = handler.pick_profiles(req, names, results)
                if not chosen:
                    break
                for name in chosen:
                    try:
                        results[name] = self._run_profile(
                            self.built.profiles[name],
                            req,
                            candidates,
                            explain,
                            widen=True,
                            subset=subset,
                        )
                    except SchedulingError as exc:
                        results[name] = None
                        errors.append(exc)
            if errors and all(r is None for r in results.values()):
                raise errors[0]
            result = handler.process_results(req, results)
        except SchedulingError as exc:
            explain.error = f"{exc.status}: {exc.message}"
            self.decisions.append(explain)
            self.metrics.scheduler_attempts.labels("failure", labels[1], "", "", "").inc()
            raise
        explain.prefix = prefix_matches(req)
        self.decisions.append(explain)

        decision = Decision(req, list(result.targets), body=body_out, result=result)
        for plugin in self.built.pre_request:
            t = time.perf_counter()
            try:
                added = plugin.pre_request(req, result)
            except Exception:
                log.exception("pre-request plugin %s failed", plugin.name)
                raise SchedulingError(500, f"pre-request plugin {plugin.name} failed") from None
            if added:
                decision.set_headers.update(added)
            self._timer("PreRequest", plugin).observe(time.perf_counter() - t)
        primary = decision.endpoints[0]
        self._account(decision, primary)
        if self.hot is not None and req.head:
            self.hot.observe(req.target_model, req.head)
        ep = primary.endpoint
        self.metrics.scheduler_attempts.labels(
            "success", labels[1], ep.name, ep.namespace, str(ep.port)
        ).inc()
        return decision

    def _run_profile(
        self,
        profile: Profile,
        req: LLMRequest,
        candidates: list[EndpointState],
        explain: _Explanation,
        *,
        widen: bool = False,
        subset: list[str] | None = None,
    ) -> ProfileResult:
        """`widen`: when the filters leave none of `candidates`, try the wider candidate sets
        (within the gateway's `subset`) before failing."""
        with self._span(
            "run_scheduler_profile",
            {
                "llm_d.epp.scheduling.profile.name": profile.name,
                "gen_ai.request.model": req.target_model,
            },
        ):
            return self._run_profile_inner(profile, req, candidates, explain, widen, subset)

    def _run_profile_inner(
        self,
        profile: Profile,
        req: LLMRequest,
        candidates: list[EndpointState],
        explain: _Explanation,
        widen: bool,
        subset: list[str] | None,
    ) -> ProfileResult:
        filter_log: list[tuple[str, int]] = []
        widened = ""
        with self._span("filter_endpoints", {"candidates": len(candidates)}):
            try:
                eps = self._filter(profile, req, candidates, filter_log, explain)
            except SchedulingError as exc:
                if not widen or exc.status != 503:  # a load filter's 429 is never widened
                    raise
                wider = self._wider_candidates(subset, len(candidates))
                eps = self._filter_wider(profile, req, wider, exc, filter_log, explain)
                widened = (
                    f"{exc.message} among the usable candidates; picked among {len(eps)} "
                    "stale or held-out endpoint(s)"
                )
        totals = [0.0] * len(eps)
        score_log: list[tuple[str, float, list[float]]] = []
        with self._span("llm_d.epp.scoring", {"candidates": len(eps)}):
            self._score(profile, req, eps, totals, score_log)
        scored = [ScoredEndpoint(e, s) for e, s in zip(eps, totals, strict=True)]
        t = time.perf_counter()
        with self._span("pick_endpoints") as span:
            picked = profile.picker.pick(req, scored)
            if span is not None and self.tracer is not None:
                span.set_attribute("picked", [e.key for e in picked])
        self._timer("Picker", profile.picker).observe(time.perf_counter() - t)
        explain.profiles[profile.name] = (
            filter_log,
            score_log,
            [e.name for e in eps],
            totals,
            [e.name for e in picked],
        )
        result = ProfileResult(picked, scored)
        if widened:
            result.explain["widened"] = widened
        explain.notes[profile.name] = result.explain  # filled in later by the profile handler
        return result

    def _filter_wider(
        self,
        profile: Profile,
        req: LLMRequest,
        wider: list[list[EndpointState]],
        drained: SchedulingError,
        filter_log: list[tuple[str, int]],
        explain: _Explanation,
    ) -> list[EndpointState]:
        """The profile's filters left no candidate: run them on the next wider candidate set
        (stale or held-out endpoints too), so that one role's endpoint being usable does not
        hide another role's stale one. Only a 503 drain comes here (the caller's check): a
        load filter's 429 is not widened, as held-out endpoints are no escape from overload."""
        for tier in wider:
            for producer in self.built.producers:  # the wider endpoints need their data too
                try:
                    producer.produce(req, tier)
                except Exception:
                    log.exception("data producer %s failed", producer.name)
            filter_log.clear()
            try:
                eps = self._filter(profile, req, tier, filter_log, explain)
            except SchedulingError as exc:
                if exc.status != 503:
                    raise
                continue
            self.metrics.profile_widened.labels(profile.name).inc()
            log.debug(
                "profile %s: no usable endpoint passed its filters; picked among %d of %d "
                "stale or held-out candidates",
                profile.name,
                len(eps),
                len(tier),
            )
            return eps
        raise drained

    def _filter(
        self,
        profile: Profile,
        req: LLMRequest,
        eps: list[EndpointState],
        filter_log: list[tuple[str, int]],
        explain: _Explanation,
    ) -> list[EndpointState]:
        for f in profile.filters:
            t = time.perf_counter()
            eps = f.filter(req, eps)
            self._timer("Filter", f).observe(time.perf_counter() - t)
            filter_log.append((f.name, len(eps)))
            if not eps:
                explain.profiles[profile.name] = (filter_log, [], [], [], [])
                raise _drained(f, profile.name)
        return eps

    def _score(
        self,
        profile: Profile,
        req: LLMRequest,
        eps: list[EndpointState],
        totals: list[float],
        score_log: list[tuple[str, float, list[float]]],
    ) -> None:
        for scorer, weight in profile.scorers:
            t = time.perf_counter()
            raw = scorer.score(req, eps)
            self._timer("Scorer", scorer).observe(time.perf_counter() - t)
            if len(raw) != len(eps):
                log.error(
                    "scorer %s returned %d scores for %d endpoints", scorer.name, len(raw), len(eps)
                )
                continue
            clamped = [clamp01(s) for s in raw]
            for i, s in enumerate(clamped):
                totals[i] += s * weight
            score_log.append((scorer.name, weight, clamped))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _account(self, decision: Decision, endpoint: EndpointState) -> None:
        req = decision.request
        cached = req.prompt_tokens - uncached_tokens(req, prefix_matches(req), endpoint.key)
        tokens = (
            self._load.tokens(req, cached) if self._load else max(0, req.prompt_tokens - cached)
        )
        decision.tokens = tokens
        endpoint.inflight_requests += 1
        endpoint.inflight_tokens += tokens
        if self.pick_time_accounting:
            decision.pick_id = endpoint.note_pick(tokens, self.datastore.clock())
        decision.accounted = True
        self.inflight += 1
        self._inflight_gauges(endpoint)
        self.metrics.request_running.labels(*self._labels(req)).inc()

    def _served(self, decision: Decision, served: str) -> EndpointState | None:
        """The endpoint behind `served`: one of the decision's fallbacks when the gateway
        reached it on a data-parallel primary port, else the pool member with that key."""
        result = decision.result
        if result is not None and result.port:
            for e in decision.endpoints:
                if result.destination(e) == served:
                    return e
        return self.datastore.endpoints.get(served)

    def rejected(self, req: LLMRequest, exc: SchedulingError) -> None:
        """Count a request answered by the scheduler itself (never forwarded)."""
        self.metrics.request_error_total.labels(*self._labels(req), str(exc.status)).inc()

    def pick_any(self, req: LLMRequest) -> Decision:
        """A bodiless request (GET): a random endpoint, as llm-d does."""
        candidates = self.datastore.candidates()
        if not candidates and self.activator:
            self.metrics.activator_routed.inc()
            return Decision(req, [], route_to=self.activator)
        if not candidates:
            raise SchedulingError(503, "no ready endpoints in the pool", hdr.DROPPED_NO_ENDPOINTS)
        return Decision(req, [self._rng.choice(candidates)])

    # --- response side ---------------------------------------------------------------------

    def response_headers(self, decision: Decision, status: int) -> None:
        decision.status = status
        endpoint = decision.endpoints[0] if decision.endpoints else None
        if endpoint is not None:
            if status >= 500:  # a dead, refusing or overloaded engine: route around it
                self.datastore.endpoint_failed(endpoint, "response")
            elif endpoint.failure_streak:
                endpoint.note_success()
        for hook in self.built.response_hooks:
            hook.response_headers(decision.request, status, endpoint)

    def first_byte(self, decision: Decision, ttft_s: float | None = None) -> None:
        """The response's first body byte reached the gateway now, or `ttft_s` after the
        request arrived (as the gateway measured it, reported later)."""
        if decision.first_byte_at:
            return
        received = decision.request.received_at
        decision.first_byte_at = time.monotonic() if ttft_s is None else received + ttft_s
        req = decision.request
        if req.parsed:
            self.metrics.request_ttft.labels(*self._labels(req), str(req.stream).lower()).observe(
                decision.first_byte_at - req.received_at
            )
        endpoint = decision.endpoints[0] if decision.endpoints else None
        for hook in self.built.response_hooks:
            hook.first_token(req, endpoint)

    def release(self, decision: Decision) -> None:
        """Give back the request's in-flight accounting, once: its response has ended at the
        gateway. Usage and timings may still follow (`complete`)."""
        if decision.released:
            return
        decision.released = True
        decision.ended_at = decision.ended_at or time.monotonic()
        endpoint = decision.endpoints[0] if decision.endpoints else None
        if decision.accounted and endpoint is not None:
            req = decision.request
            endpoint.inflight_requests = max(0, endpoint.inflight_requests - 1)
            endpoint.inflight_tokens = max(0, endpoint.inflight_tokens - decision.tokens)
            if decision.pick_id:
                endpoint.note_done(decision.pick_id)
            self._inflight_gauges(endpoint)
            self.metrics.request_running.labels(*self._labels(req)).dec()
            self.inflight -= 1
        if self.flow is not None:
            self.flow.untrack(decision.request)
            self.flow.wake()  # capacity freed: queued requests may go

    def _inflight_gauges(self, endpoint: EndpointState) -> None:
        ep = endpoint.endpoint
        producer = self._load.name if self._load is not None else "inflight-load-producer"
        self.metrics.inflight_requests.labels(ep.name, ep.namespace, producer).set(
            endpoint.inflight_requests
        )
        self.metrics.inflight_tokens.labels(ep.name, ep.namespace, producer).set(
            endpoint.inflight_tokens
        )

    def complete(
        self,
        decision: Decision,
        cause: str,
        usage: Usage | None = None,
        *,
        response_bytes: int | None = None,
        served: str | None = None,
        stream_events: int | None = None,
    ) -> None:
        """Release the request's accounting (if not yet) and record its outcome, exactly once,
        whatever ended it. `served` is the endpoint the gateway reports it actually used
        (`x-gateway-destination-endpoint-served`, or the access log's upstream host): when
        Envoy retried to a fallback, the outcome belongs to that endpoint. `stream_events`: the
        data events of a streamed response, which give its output tokens when it carried no
        usage."""
        if decision.completed:
            return
        self.release(decision)
        decision.completed = True
        req = decision.request
        endpoint = decision.endpoints[0] if decision.endpoints else None
        if served and endpoint is not None and served != decision.primary:
            self.metrics.served_elsewhere.inc()
            endpoint = self._served(decision, served)
        labels = self._labels(req)
        e2e = decision.ended_at - req.received_at
        if req.parsed:
            self.metrics.request_duration.labels(*labels).observe(e2e)
        if response_bytes is not None:
            self.metrics.response_size.labels(*labels).observe(response_bytes)
        if cause not in ("natural", "unobserved") or decision.status >= 400:
            code = str(decision.status) if decision.status >= 400 else cause
            self.metrics.request_error_total.labels(*labels, code).inc()
        # output tokens: the usage chunk's, or a stream's data events when the client did not
        # ask for usage (a chat stream opens with a role-only event); None: unknown
        output: int | None = None
        if usage is not None:
            output = usage.completion_tokens
        elif stream_events is not None and req.stream:
            output = max(0, stream_events - (1 if req.path.endswith(CHAT_SUFFIXES) else 0))
        if output is not None and self.flow is not None:
            self.flow.credit(req, output)
        if cause == "natural" and decision.first_byte_at and decision.status < 400:
            # the time to first token is known either way; output unknown: 0, no TPOT sample
            req.timing = (
                decision.first_byte_at - req.received_at,
                decision.ended_at - req.received_at,
                output or 0,
            )
        if usage is not None:
            req.usage = usage
            self._usage(labels, usage)
            out = usage.completion_tokens
            if cause == "natural" and out > 0 and req.parsed:
                self.metrics.request_ntpot.labels(*labels).observe(e2e / out)
                if req.stream and out > 1 and decision.first_byte_at:
                    tpot = (decision.ended_at - decision.first_byte_at) / (out - 1)
                    self.metrics.request_tpot.labels(*labels).observe(max(0.0, tpot))
        for hook in self.built.response_hooks:
            try:
                hook.response_complete(req, endpoint, cause)
            except Exception:
                log.exception("response hook %s failed", hook.name)

    def _usage(self, labels: tuple[str, ...], usage: Usage) -> None:
        self.metrics.input_tokens.labels(*labels).observe(usage.prompt_tokens)
        self.metrics.output_tokens.labels(*labels).observe(usage.completion_tokens)
        details = usage.prompt_tokens_details
        if details is not None and details.cached_tokens is not None:
            self.metrics.cached_tokens.labels(*labels).observe(details.cached_tokens)

    # --- debugging -------------------------------------------------------------------------

    def explain(
        self, since: int = 0, request_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        out = []
        for e in self.decisions:
            if e.seq <= since or (request_id is not None and e.request_id != request_id):
                continue
            out.append(e.render())
        return out[-limit:]

    def dry_run(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        req: LLMRequest | None = None,
    ) -> dict[str, Any]:
        """Score a request without sending it or changing any state, and explain the result."""
        if req is None:
            req = self.new_request(dict(headers or {}), path)
            req.body = body
        if not is_inference_path(path):
            raise SchedulingError(400, f"{path!r} is not an inference path")
        if not req.parsed:
            try:
                parse_openai(req, head=self.hot is not None)
            except ParseError as exc:
                raise SchedulingError(400, str(exc)) from None
        candidates = self.datastore.candidates()
        if not candidates:
            raise SchedulingError(503, "no ready endpoints in the pool", hdr.DROPPED_NO_ENDPOINTS)
        for producer in self.built.producers:
            producer.produce(req, candidates)
        explain = _Explanation(
            0, req.request_id, req.target_model, time.time(), [e.name for e in candidates], {}, None
        )
        for profile in self.built.profiles.values():
            try:
                self._run_profile(profile, req, candidates, explain)
            except SchedulingError as exc:
                explain.error = f"{exc.status}: {exc.message}"
        explain.prefix = prefix_matches(req)
        return explain.render()

    async def dry_run_async(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """`dry_run`, after the producers that need I/O have fetched their data."""
        req = self.new_request(dict(headers or {}), path)
        req.body = body
        await self.prefetch(req)
        return self.dry_run(path, body, headers, req)

    def endpoint_scores(self, decision: Decision) -> dict[str, float] | None:
        if not self.emit_scores or decision.result is None:
            return None
        primary = decision.result.profiles[decision.result.primary]
        return {s.endpoint.key: s.score for s in primary.scored}


def _drained(f: Filter[Any], profile: str) -> SchedulingError:
    if f.saturation:
        return SchedulingError(
            429,
            f"every endpoint is over the limits of {f.name} (profile {profile})",
            hdr.DROPPED_SATURATED,
        )
    return SchedulingError(
        503, f"no endpoint passes filter {f.name} (profile {profile})", hdr.DROPPED_NO_ENDPOINTS
    )


def _hosts(subset: list[str] | None) -> set[str] | None:
    """The addresses of the gateway's subset hint (`host:port` items), None without one."""
    return None if subset is None else {s.rsplit(":", 1)[0] for s in subset}


def _within(eps: list[EndpointState], hosts: set[str] | None) -> list[EndpointState]:
    return eps if hosts is None else [e for e in eps if e.endpoint.address in hosts]
