"""The data layer: the endpoint pool (from discovery) and the collectors that scrape each endpoint.

One collector task per endpoint scrapes `/metrics` every `refresh_interval_s` (llm-d: 50 ms)
and `/v1/models` every `models_interval_s`. A failed scrape keeps the previous values, counts
the error, and never blocks other endpoints.

Staleness, one rule everywhere: an endpoint is *fresh* if its last good scrape is at most
`staleness_s` old. Candidates are the fresh endpoints; when none is fresh (start-up, a metrics
outage) every endpoint is a candidate and scorers use the last known values, so the pool never
halts. Stale endpoints are counted in `llm_d_epp_stale_endpoints`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from llmd.protocol.errors import DecodeError
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.runtime.discovery import Endpoint, EndpointSet
from llmd.scheduler.framework import EndpointState

log = logging.getLogger(__name__)


class _Models(msgspec.Struct):
    data: list[dict[str, Any]] = []


_models_decoder = msgspec.json.Decoder(_Models)


class Datastore:
    """The endpoint pool and its collectors."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        refresh_interval_s: float = 0.05,
        staleness_s: float = 1.0,
        models_interval_s: float = 2.0,
        scrape_timeout_s: float = 1.0,
        pool_name: str = "llmd",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_interval_s = max(0.01, refresh_interval_s)
        self.staleness_s = staleness_s
        self.models_interval_s = models_interval_s
        self.scrape_timeout_s = scrape_timeout_s
        self.clock = clock
        self.endpoints: dict[str, EndpointState] = {}
        self.synced = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._listeners: list[Callable[[set[str]], None]] = []
        self.pool_name = pool_name
        self._poll_errors = Counter(
            "llm_d_epp_datalayer_poll_errors",
            "Failed scrapes of an endpoint (the previous values stay in force)",
            ["source_type"],
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
        for metric, fn in (
            ("average_kv_cache_utilization", lambda e: e.kv_usage),
            ("average_queue_size", lambda e: float(e.waiting)),
            ("average_running_requests", lambda e: float(e.running)),
        ):
            Gauge(
                f"llm_d_epp_{metric}",
                f"Pool {metric.removeprefix('average_').replace('_', ' ')}, mean over fresh "
                "endpoints",
                ["name"],
                registry=registry,
            ).labels(pool_name).set_function(self._mean(fn))

    def _mean(self, fn: Callable[[EndpointState], float]) -> Callable[[], float]:
        def value() -> float:
            now = self.clock()
            fresh = [fn(e) for e in self.endpoints.values() if e.fresh(now, self.staleness_s)]
            return sum(fresh) / len(fresh) if fresh else 0.0

        return value

    def on_change(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(live endpoint keys)` whenever the pool changes."""
        self._listeners.append(listener)

    def stale_count(self) -> int:
        now = self.clock()
        return sum(1 for e in self.endpoints.values() if not e.fresh(now, self.staleness_s))

    def candidates(self) -> list[EndpointState]:
        """Fresh endpoints, or all of them when none is fresh (never fail closed)."""
        now = self.clock()
        eps = list(self.endpoints.values())
        fresh = [e for e in eps if e.fresh(now, self.staleness_s)]
        return fresh or eps

    def all(self) -> list[EndpointState]:
        return list(self.endpoints.values())

    def set_endpoints(self, endpoints: EndpointSet) -> None:
        """Replace the pool: new endpoints get a collector, removed ones lose theirs."""
        wanted: dict[str, Endpoint] = {e.host_port: e for e in endpoints if e.ready}
        for key in list(self.endpoints):
            if key not in wanted:
                log.info("endpoint %s left the pool", key)
                del self.endpoints[key]
                with contextlib.suppress(KeyError):
                    self._queue_gauge.remove(key, key)
                task = self._tasks.pop(key, None)
                if task is not None:
                    task.cancel()
        for key, ep in wanted.items():
            state = self.endpoints.get(key)
            if state is None:
                log.info("endpoint %s (%s) joined the pool", key, ep.name)
                self.endpoints[key] = EndpointState(ep)
                if self._session is not None:
                    self._start(key)
            elif state.endpoint != ep:
                state.endpoint = ep  # labels changed; keep metrics and accounting
        self.synced.set()
        live = set(self.endpoints)
        for listener in self._listeners:
            listener(live)

    def _start(self, key: str) -> None:
        self._tasks[key] = asyncio.create_task(self._collect(key), name=f"collect-{key}")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.scrape_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=2, keepalive_timeout=30),
        )
        for key in self.endpoints:
            if key not in self._tasks:
                self._start(key)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _collect(self, key: str) -> None:
        next_models = 0.0
        while True:
            state = self.endpoints.get(key)
            if state is None:
                return
            started = self.clock()
            await self.scrape_metrics(state)
            if self.models_interval_s > 0 and started >= next_models:
                next_models = started + self.models_interval_s
                await self.scrape_models(state)
            self._queue_gauge.labels(key, key).set(state.waiting)
            elapsed = self.clock() - started
            await asyncio.sleep(max(0.0, self.refresh_interval_s - elapsed))

    async def scrape_metrics(self, state: EndpointState) -> None:
        assert self._session is not None
        started = self.clock()
        url = f"http://{state.key}/metrics"
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                text = await resp.text()
            snapshot = parse_engine_snapshot(text)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, DecodeError, ValueError) as exc:
            self._scrape_failed(state, "metrics", f"{type(exc).__name__}: {exc}")
            return
        state.note_scrape(started, snapshot, self.clock())

    async def scrape_models(self, state: EndpointState) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{state.key}/v1/models") as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                body = await resp.read()
            models = _models_decoder.decode(body)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, msgspec.DecodeError) as exc:
            self._scrape_failed(state, "models", f"{type(exc).__name__}: {exc}")
            return
        state.loaded_models = frozenset(
            str(m["id"]) for m in models.data if isinstance(m, dict) and "id" in m
        )

    def _scrape_failed(self, state: EndpointState, source: str, error: str) -> None:
        self._poll_errors.labels(source).inc()
        state.consecutive_failures += 1
        if state.last_error != error:
            log.warning("scrape of %s %s failed: %s", state.key, source, error)
        state.last_error = error
