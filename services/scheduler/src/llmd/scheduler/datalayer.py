"""The data layer: the endpoint pool (from discovery), scraped by `llmd.runtime`'s engine-pool
scraper.

The scraper (`llmd.runtime.enginepool`) scrapes each endpoint's `/metrics` every
`refresh_interval_s` (llm-d: 50 ms) and `/v1/models` every `models_interval_s`; this module turns
its samples into each `EndpointState` (with the scheduler's own pick-time accounting) and
exports llm-d's `llm_d_epp_*` pool metrics. A failed scrape keeps the previous values, counts the
error, and never blocks other endpoints.

Staleness is the scraper's one rule (`is_fresh`, `fresh_or_all`): candidates are the fresh
endpoints; when none is fresh (start-up, a metrics outage) every endpoint is a candidate and
scorers use the last known values, so the pool never halts. Stale endpoints are counted in
`llm_d_epp_stale_endpoints`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry

from llmd.protocol.metrics import EngineSnapshot, dialect_sample_names, parse_dialect_snapshot
from llmd.runtime.discovery import Endpoint, EndpointSet
from llmd.runtime.enginepool import EnginePoolScraper, fresh_or_all
from llmd.runtime.fastmetrics import Counter, Gauge
from llmd.scheduler.engines import DataLayerSettings
from llmd.scheduler.framework import EndpointState

log = logging.getLogger(__name__)

COUNTERS_INTERVAL_S = 1.0
"""How often each endpoint's page is also read for its counters (EngineSnapshot's
prefill/token/offload counters: the storage tier's measured weight)."""


class Datastore:
    """The endpoint pool and its collectors."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        refresh_interval_s: float = 0.05,
        max_scrapes_per_s: float | None = None,
        filter_scrapes: bool = True,
        staleness_s: float = 1.0,
        models_interval_s: float = 2.0,
        scrape_timeout_s: float = 1.0,
        pool_name: str = "llmd",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.staleness_s = staleness_s
        self.clock = clock
        self.endpoints: dict[str, EndpointState] = {}
        self.synced = asyncio.Event()
        self.scraper = EnginePoolScraper(
            interval_s=refresh_interval_s,
            max_scrapes_per_s=max_scrapes_per_s,
            models_interval_s=models_interval_s,
            timeout_s=scrape_timeout_s,
            registry=registry,
            listener=self,
            clock=clock,
        )
        if filter_scrapes:
            self.scraper.wanted_names = self._wanted_names
        self._listeners: list[Callable[[set[str]], None]] = []
        self.pool_name = pool_name
        self._poll_errors = Counter(
            "llm_d_epp_datalayer_poll_errors",
            "Failed scrapes of an endpoint (the previous values stay in force)",
            ["source_type"],
            registry=registry,
        )
        self._failures = Counter(
            "llmd_endpoint_failures",
            "Failures that held an endpoint out of the candidates, by source (scrape, response)",
            ["source"],
            registry=registry,
        )
        self._queue_gauge = Gauge(
            "llm_d_epp_per_endpoint_queue_size",
            "Waiting requests per endpoint (scraped, plus requests sent since the scrape)",
            ["name", "model_server_endpoint"],
            registry=registry,
        )
        Gauge(
            "llm_d_epp_ready_endpoints",
            "Endpoints in the pool",
            ["name"],
            registry=registry,
        ).labels(pool_name).set_function(lambda: len(self.endpoints))
        Gauge(
            "llm_d_epp_stale_endpoints",
            "Endpoints whose metrics are older than the staleness threshold",
            ["name"],
            registry=registry,
        ).labels(pool_name).set_function(self.stale_count)
        self._pages_unchanged = Counter(
            "llmd_scheduler_metrics_pages_unchanged",
            "Scraped /metrics pages identical to the endpoint's previous one, whose snapshot was "
            "reused instead of parsed again (an idle engine's usual scrape)",
            registry=registry,
        )
        self._extract_errors = Counter(
            "llm_d_epp_datalayer_extract_errors",
            "Scraped pages that could not be read (malformed, or an engine type without a "
            "metric mapping)",
            ["source_type", "extractor_type"],
            registry=registry,
        )
        for metric, fn in (
            ("kv_cache_utilization", lambda e: e.kv_usage),
            ("queue_size", lambda e: float(e.waiting)),
            ("running_requests", lambda e: float(e.running)),
        ):
            what = metric.replace("_", " ")
            for stat, agg in (("average", _mean), ("std_dev", _std_dev)):
                Gauge(
                    f"llm_d_epp_{stat}_{metric}",
                    f"Pool {what}, {stat.replace('_', ' ')} over endpoints with fresh metrics",
                    ["name"],
                    registry=registry,
                ).labels(pool_name).set_function(self._over_fresh(fn, agg))
        self.datalayer = DataLayerSettings()

    def use_datalayer(self, settings: DataLayerSettings) -> None:
        """Read each endpoint's metrics in its engine's names (the `llm-d.ai/engine-type`
        label, else the configured default engine), from the configured path."""
        self.datalayer = settings
        self.scraper.metrics_path = settings.metrics_path
        self.scraper.parser = self._parse

    def _wanted_names(self, key: str) -> frozenset[str] | None:
        """The samples `_parse` reads from `key`'s page (None until the endpoint is known)."""
        state = self.endpoints.get(key)
        if state is None:
            return None
        try:
            return dialect_sample_names(self.datalayer.dialect_for(state.endpoint.labels))
        except ValueError:  # an engine kind without a mapping: its parse reports that
            return None

    def _parse(self, key: str, text: str) -> EngineSnapshot:
        state = self.endpoints.get(key)
        if state is None:
            return parse_dialect_snapshot(text, self.datalayer.dialect_for({}), counters=False)
        # the slow counters (the storage tier's cost) once a second, not on every scrape
        now = self.clock()
        counters = now - state.counters_at >= COUNTERS_INTERVAL_S
        if counters:
            state.counters_at = now
        page = state.page
        if page is not None and page[0] == text and (page[2] or not counters):
            self._pages_unchanged.inc()
            return page[1]  # the same page: the same snapshot (an idle engine's usual scrape)
        dialect = self.datalayer.dialect_for(state.endpoint.labels)
        snapshot = parse_dialect_snapshot(text, dialect, counters=counters)
        state.page = (text, snapshot, counters)
        return snapshot

    def _over_fresh(
        self,
        fn: Callable[[EndpointState], float],
        agg: Callable[[list[float]], float],
    ) -> Callable[[], float]:
        def value() -> float:
            now = self.clock()
            fresh = [fn(e) for e in self.endpoints.values() if e.fresh(now, self.stale_after_s)]
            return agg(fresh) if fresh else 0.0

        return value

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(live endpoint keys)` whenever the pool changes."""
        self._listeners.append(listener)

    @property
    def models_interval_s(self) -> float:
        return self.scraper.models_interval_s

    @models_interval_s.setter
    def models_interval_s(self, value: float) -> None:
        self.scraper.models_interval_s = value

    @property
    def stale_after_s(self) -> float:
        """Metrics older than this are stale: the configured threshold, or three scrape
        intervals when a large pool stretches the interval past it."""
        return max(self.staleness_s, 3 * self.scraper.effective_interval_s)

    def stale_count(self) -> int:
        now = self.clock()
        stale_after = self.stale_after_s
        return sum(1 for e in self.endpoints.values() if not e.fresh(now, stale_after))

    def candidates(self) -> list[EndpointState]:
        """Usable endpoints (fresh, not held out after a failure); else the fresh ones; else
        all of them: the pool never fails closed."""
        now = self.clock()
        stale_after = self.stale_after_s
        eps = list(self.endpoints.values())
        usable = [e for e in eps if e.usable(now, stale_after)]
        return usable or fresh_or_all(eps, now, stale_after)

    def candidate_tiers(self) -> list[list[EndpointState]]:
        """Ever wider candidate sets, each a strict superset of the one before: the usable
        endpoints, the fresh ones, then all of them (empty sets left out). The first is
        `candidates()`; a profile whose filters leave nothing of it tries the next (a decode
        profile whose only decode endpoint is stale while a prefill one is usable)."""
        now = self.clock()
        eps = list(self.endpoints.values())
        stale_after = self.stale_after_s
        fresh = [e for e in eps if e.fresh(now, stale_after)]
        usable = [e for e in fresh if e.failed_until <= now]
        return widening((usable, fresh, eps))

    def endpoint_failed(self, state: EndpointState, source: str) -> None:
        """Hold `state` out after a failed scrape or a 5xx answer (`source` says which)."""
        if state.failed_until <= self.clock():
            log.warning("endpoint %s held out after a failed %s", state.key, source)
        state.note_failure(self.clock())
        self._failures.labels(source).inc()

    def all(self) -> list[EndpointState]:
        return list(self.endpoints.values())

    def set_endpoints(self, endpoints: EndpointSet) -> None:
        """Replace the pool: new endpoints are scraped, removed ones no longer."""
        wanted: dict[str, Endpoint] = {e.host_port: e for e in endpoints if e.ready}
        for key in list(self.endpoints):
            if key not in wanted:
                log.info("endpoint %s left the pool", key)
                del self.endpoints[key]
                with contextlib.suppress(KeyError):
                    self._queue_gauge.remove(key, key)
        for key, ep in wanted.items():
            state = self.endpoints.get(key)
            if state is None:
                log.info("endpoint %s (%s) joined the pool", key, ep.name)
                self.endpoints[key] = EndpointState(ep)
            elif state.endpoint != ep:
                state.endpoint = ep  # labels changed; keep metrics and accounting
        self.scraper.set_targets(self.endpoints)
        self.synced.set()
        live = set(self.endpoints)
        for listener in self._listeners:
            listener(live)

    async def start(self) -> None:
        await self.scraper.start()

    async def stop(self) -> None:
        await self.scraper.stop()

    # --- the scraper's listener --------------------------------------------------------------

    def metrics(self, key: str, started_at: float, snapshot: EngineSnapshot, now: float) -> None:
        state = self.endpoints.get(key)
        if state is not None:
            state.note_scrape(started_at, snapshot, now)
            if state.failure_streak and state.failed_until <= now:
                state.note_success()
            self._queue_gauge.labels(key, key).set(state.waiting)

    def models(self, key: str, models: frozenset[str]) -> None:
        state = self.endpoints.get(key)
        if state is not None:
            state.loaded_models = models

    def failed(self, key: str, source: str, error: str) -> None:
        if error.startswith(("DecodeError", "ValueError")):
            self._extract_errors.labels(source, "core-metrics-extractor").inc()
        else:
            self._poll_errors.labels(source).inc()
        state = self.endpoints.get(key)
        if state is not None:
            state.consecutive_failures += 1
            state.last_error = error
            if source == "metrics":
                self.endpoint_failed(state, "scrape")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std_dev(values: list[float]) -> float:
    """Population standard deviation (llm-d's pool gauges)."""
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def widening(tiers: Iterable[list[EndpointState]]) -> list[list[EndpointState]]:
    """`tiers` (each a superset of the one before) without the empty ones and without one
    no larger than the tier kept before it."""
    out: list[list[EndpointState]] = []
    for tier in tiers:
        if tier and (not out or len(tier) > len(out[-1])):
            out.append(tier)
    return out
