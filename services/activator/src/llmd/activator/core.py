"""Holding requests for a pool at zero, scaling it up, and letting them through once it is up.

    request -> pool has a ready engine?  yes -> forward (streaming)
                                         no  -> hold (bounded queue, per-request deadline)
                                                 + ask the cluster for 1 replica (once)
               watcher: cluster endpoints every `poll_s` while requests are held; engines that
               are starting are probed on `/health` directly, so a held request goes out the
               moment its engine answers, not when discovery next catches up
               -> ready: every held request is forwarded at once
               -> queue full or deadline: 503 with Retry-After, counted

In-flight requests are counted from forward to the end of their response stream, and the pool
is scaled to zero only after `scale_down_delay_s` with nothing held and nothing in flight (the
activator of llm-d's PR cuts streams that outlast its timer). A request forwarded to an engine
that refuses the connection (it went away between two polls) was never received, so it is held
again instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

from llmd.runtime.cluster import Cluster, ClusterError
from llmd.runtime.discovery import Endpoint
from llmd.runtime.proxy import ProxyResult, StreamingProxy, error_response
from llmd.runtime.tasks import cancel_tasks

from .warm import Warmer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivatorSettings:
    pool: str
    max_queued: int = 1000
    hold_timeout_s: float = 60.0
    poll_s: float = 0.05
    idle_poll_s: float = 0.25
    scale_to_zero: bool = False
    scale_down_delay_s: float = 120.0
    retry_after_s: int = 5
    upstream_url: str = ""
    """Forward to this URL (the gateway) instead of straight to a ready engine."""


class ActivatorMetrics:
    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.requests = Counter(
            "llmd_activator_requests",
            "Requests by outcome: forwarded (pool was up), activated (held, then forwarded), "
            "rejected (queue full), timeout (held past the deadline), abandoned (the client "
            "left while held), error (could not forward)",
            ["pool", "outcome"],
            registry=registry,
        )
        self.queue = Gauge(
            "llmd_activator_queue_size", "Requests held for the pool", ["pool"], registry=registry
        ).labels(pool)
        self.inflight = Gauge(
            "llmd_activator_inflight_requests",
            "Requests forwarded whose response has not ended",
            ["pool"],
            registry=registry,
        ).labels(pool)
        self.ready = Gauge(
            "llmd_activator_ready_endpoints",
            "Engines of the pool the activator can forward to",
            ["pool"],
            registry=registry,
        ).labels(pool)
        self.hold = Histogram(
            "llmd_activator_hold_duration_seconds",
            "Time a request was held before it was forwarded (or given up)",
            ["pool"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
            registry=registry,
        ).labels(pool)
        self.scale = Counter(
            "llmd_activator_scale_requests",
            "Scale requests made to the cluster by direction (up = from zero, down = to zero)",
            ["pool", "direction"],
            registry=registry,
        )
        self.errors = Counter(
            "llmd_activator_cluster_errors",
            "Failed reads or scale requests to the cluster",
            ["pool"],
            registry=registry,
        ).labels(pool)


class _StreamFlag(msgspec.Struct):
    stream: bool = False


_stream_flag = msgspec.json.Decoder(_StreamFlag)
"""Reads only `stream` from a request body (other fields are skipped, not built)."""


async def _disconnected(request: Request) -> None:
    """Returns once the client of `request` has gone away (its body is read already, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


class Activator:
    def __init__(
        self,
        settings: ActivatorSettings,
        cluster: Cluster,
        *,
        registry: CollectorRegistry | None = None,
        proxy: StreamingProxy | None = None,
        clock: Callable[[], float] = time.monotonic,
        warmer: Warmer | None = None,
    ) -> None:
        self.s = settings
        self.warmer = warmer
        self.cluster = cluster
        self.proxy = proxy or StreamingProxy()
        self.clock = clock
        self.metrics = ActivatorMetrics(registry or CollectorRegistry(), settings.pool)
        self.endpoints: list[Endpoint] = []
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._rr = count()
        self.held = 0
        self.inflight = 0
        self.last_active = clock()
        self.desired = -1
        self._probe: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        """Set once the pool has been read."""

    # --- the watcher -----------------------------------------------------------------------

    async def _healthy(self, ep: Endpoint) -> bool:
        if self._probe is None:
            self._probe = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5))
        try:
            async with self._probe.get(f"http://{ep.host_port}/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def refresh(self) -> None:
        """One look at the pool: ready engines, scale-from-zero, scale-to-zero."""
        try:
            eps = await self.cluster.endpoints(self.s.pool)
            status = await self.cluster.status(self.s.pool)
        except ClusterError as exc:
            self.metrics.errors.inc()
            log.warning("pool %s: %s", self.s.pool, exc)
            return
        self.synced.set()
        self.desired = status.desired
        ready = [e for e in eps if e.ready]
        starting = [e for e in eps if not e.ready]
        if starting:  # an engine that answers is used before the cluster calls it ready
            ok = await asyncio.gather(*(self._healthy(e) for e in starting))
            ready += [e for e, good in zip(starting, ok, strict=True) if good]
        self._set_ready(ready)
        if self.warmer is not None:
            self.warmer.observe(ready)
        now = self.clock()
        if self.held and not ready and status.desired == 0:
            await self._scale(1, "up")
        elif (
            self.s.scale_to_zero
            and status.desired > 0
            and not self.held
            and not self.inflight
            and now - self.last_active >= self.s.scale_down_delay_s
        ):
            log.info("pool %s idle for %.0fs: scaling to zero", self.s.pool, now - self.last_active)
            await self._scale(0, "down")

    async def _scale(self, replicas: int, direction: str) -> None:
        try:
            await self.cluster.scale(self.s.pool, replicas)
        except ClusterError as exc:
            self.metrics.errors.inc()
            log.error("pool %s: scaling to %d failed: %s", self.s.pool, replicas, exc)
            return
        self.desired = replicas
        self.metrics.scale.labels(self.s.pool, direction).inc()
        if direction == "up":
            log.info("pool %s at zero with %d request(s) held: asked for 1", self.s.pool, self.held)

    def _set_ready(self, ready: list[Endpoint]) -> None:
        self.endpoints = ready
        self.metrics.ready.set(len(ready))
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the watcher never dies
                log.exception("activator refresh failed")
            self._wake.clear()
            wait = self.s.poll_s if self.held else self.s.idle_poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"activator-{self.s.pool}")

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        if self._probe is not None:
            await self._probe.close()
        if self.warmer is not None:
            await self.warmer.aclose()
        await self.proxy.aclose()

    # --- requests --------------------------------------------------------------------------

    def _unavailable(self, outcome: str, message: str) -> Response:
        self.metrics.requests.labels(self.s.pool, outcome).inc()
        resp = error_response(503, message, "ServiceUnavailableError")
        resp.headers["retry-after"] = str(self.s.retry_after_s)
        return resp

    async def _hold(self, deadline: float, request: Request | None = None) -> str:
        """Wait for a ready engine until `deadline`: `ready`, `timeout`, or `gone` when the
        client disconnected meanwhile (its place in the queue is given up at once)."""
        self.held += 1
        self.metrics.queue.set(self.held)
        self._wake.set()
        ready = asyncio.ensure_future(self._ready.wait())
        waits: set[asyncio.Future[Any]] = {ready}
        if request is not None:
            waits.add(asyncio.ensure_future(_disconnected(request)))
        try:
            done, _ = await asyncio.wait(
                waits,
                timeout=max(0.0, deadline - self.clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if ready in done:
                return "ready"
            return "gone" if done else "timeout"
        finally:
            for w in waits:
                w.cancel()
            self.held -= 1
            self.metrics.queue.set(self.held)

    async def handle(self, request: Request, body: bytes) -> Response:
        """Forward `request` (its body already read), holding it while the pool is down."""
        arrived = self.clock()
        self.last_active = arrived
        deadline = arrived + self.s.hold_timeout_s
        was_held = False
        for _ in range(8):  # a refused connection re-holds; a few rounds at most
            if not self._ready.is_set():
                if self.held >= self.s.max_queued:
                    return self._unavailable(
                        "rejected", f"pool {self.s.pool} is starting and its queue is full"
                    )
                was_held = True
                held = await self._hold(deadline, request)
                self.metrics.hold.observe(self.clock() - arrived)
                if held == "gone":
                    self.metrics.requests.labels(self.s.pool, "abandoned").inc()
                    return error_response(499, "client disconnected", "ClientClosedRequest")
                if held == "timeout":
                    return self._unavailable(
                        "timeout",
                        f"pool {self.s.pool} has no ready engine after {self.s.hold_timeout_s:g}s",
                    )
            if not self.endpoints:
                self._ready.clear()
                continue
            ep = self.endpoints[next(self._rr) % len(self.endpoints)]
            resp, refused = await self._forward(request, body, ep)
            if not refused:
                outcome = "activated" if was_held else "forwarded"
                self.metrics.requests.labels(self.s.pool, outcome).inc()
                return resp
            self._set_ready([e for e in self.endpoints if e != ep])
            self._wake.set()
        self.metrics.requests.labels(self.s.pool, "error").inc()
        return error_response(502, f"pool {self.s.pool}: no engine accepted", "BadGatewayError")

    async def _forward(self, request: Request, body: bytes, ep: Endpoint) -> tuple[Response, bool]:
        base = self.s.upstream_url.rstrip("/") or f"http://{ep.host_port}"
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        stream = False
        with contextlib.suppress(msgspec.DecodeError):  # not JSON: the engine will say so
            stream = _stream_flag.decode(body).stream if body else False
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        refused = False

        def done(result: ProxyResult) -> None:
            nonlocal refused
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.last_active = self.clock()
            refused = result.status == 502 and "ClientConnectorError" in result.error

        resp = await self.proxy.forward(request, url, body=body, stream=stream, on_complete=done)
        return resp, refused
