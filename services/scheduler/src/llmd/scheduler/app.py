"""Composition root: builds the scheduler from its options and runs its servers.

discovery (static file | Kubernetes) -> Datastore (collectors) -> Director (plugins)
gRPC :9002  ExternalProcessor + Health      (Envoy talks here)
gRPC :9003  Health only                     (probes)
HTTP :9090  /metrics /healthz /readyz /debug/decisions /debug/explain /debug/plugins/state
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from fastapi import FastAPI, Request, Response
from grpc_health.v1 import health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from llmd.runtime.discovery import discovery_source
from llmd.runtime.lifecycle import Health, QuietHttpServer, health_router, http_server
from llmd.scheduler.config import BuiltConfig, build, load_config_file
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.extproc import ExternalProcessor, HealthService
from llmd.scheduler.framework import Lifecycle, PluginHandle, SchedulingError
from llmd.scheduler.metrics import SchedulerMetrics
from llmd.scheduler.plugins import builtin_registry
from llmd.scheduler.plugins.precise import PreciseProducer
from llmd.scheduler.plugins.producers import ApproxPrefixCacheProducer

log = logging.getLogger(__name__)


@dataclass
class SchedulerOptions:
    """Everything `llmd-scheduler` takes on its command line."""

    config_file: str | None = None
    config_text: str | None = None
    endpoints_file: str | None = None
    endpoint_selector: str | None = None
    endpoint_target_port: int = 8000
    namespace: str = "default"
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    refresh_metrics_interval_s: float = 0.05
    drain_timeout_s: float = 30.0
    allow_experimental_plugins: bool = False
    pool_name: str = "llmd"


class SchedulerApp:
    """The scheduler service: wires the pieces and owns their lifecycle."""

    def __init__(
        self, options: SchedulerOptions, registry: CollectorRegistry | None = None
    ) -> None:
        self.options = options
        self.registry = registry or CollectorRegistry()
        cfg, self.config_origin = load_config_file(options.config_file, options.config_text)
        self.datastore = Datastore(
            self.registry,
            refresh_interval_s=options.refresh_metrics_interval_s,
            staleness_s=1.0,
            pool_name=options.pool_name,
        )
        handle = PluginHandle(endpoints=self.datastore.all)
        self.built: BuiltConfig = build(
            cfg, builtin_registry(), handle, allow_experimental=options.allow_experimental_plugins
        )
        self.datastore.staleness_s = float(self.built.settings["staleness_s"])
        self.datastore.models_interval_s = float(self.built.settings["models_interval_s"])
        self.metrics = SchedulerMetrics(self.registry)
        provider = trace.get_tracer_provider()
        traced = not isinstance(provider, trace.ProxyTracerProvider)
        self.director = Director(
            self.built,
            self.datastore,
            self.metrics,
            tracer=provider.get_tracer("llmd.scheduler") if traced else None,
        )
        for plugin in self.built.plugins.values():
            if isinstance(plugin, ApproxPrefixCacheProducer):
                plugin.register_metrics(self.registry)
                self.datastore.on_change(plugin.forget)
            if isinstance(plugin, PreciseProducer):
                self.registry.register(plugin.metrics.registry)  # kvcache_* families
        self.health = Health(self.registry)
        self.health.set("endpoints-synced", False, "discovery has not reported yet")
        self.grpc_health = HealthService(lambda: self.datastore.synced.is_set())
        self.extproc = ExternalProcessor(self.director, int(self.built.settings["max_body_bytes"]))
        self._servers: list[grpc.aio.Server] = []
        self._http: QuietHttpServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # --- HTTP ------------------------------------------------------------------------------

    def http_app(self) -> FastAPI:
        app = FastAPI(title="llmd-scheduler", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))

        @app.get("/debug/decisions")
        async def decisions(
            since: int = 0, request_id: str | None = None, limit: int = 100
        ) -> Response:
            return _json(self.director.explain(since, request_id, max(1, min(limit, 512))))

        @app.post("/debug/explain")
        async def explain(request: Request) -> Response:
            """Score a request without sending it: {"path", "body": {...}, "headers": {...}}."""
            try:
                doc = msgspec.json.decode(await request.body())
                path = str(doc.get("path", "/v1/completions"))
                body = msgspec.json.encode(doc["body"])
                headers = {str(k).lower(): str(v) for k, v in (doc.get("headers") or {}).items()}
            except (msgspec.DecodeError, KeyError, AttributeError, TypeError):
                return _json(
                    {"error": 'expected {"path": str, "body": object, "headers": object}'}, 400
                )
            try:
                return _json(await self.director.dry_run_async(path, body, headers))
            except SchedulingError as exc:
                return _json({"error": exc.message}, exc.status)

        @app.get("/debug/plugins/state")
        async def plugin_state() -> Response:
            now = self.datastore.clock()
            return _json(
                {
                    "config": self.config_origin,
                    "plugins": {
                        n: {"type": p.type_name, **p.state()} for n, p in self.built.plugins.items()
                    },
                    "profiles": {
                        n: {
                            "filters": [f.name for f in p.filters],
                            "scorers": {s.name: w for s, w in p.scorers},
                            "picker": p.picker.name,
                        }
                        for n, p in self.built.profiles.items()
                    },
                    "endpoints": [e.snapshot(now) for e in self.datastore.all()],
                    "inflight": self.director.inflight,
                }
            )

        return app

    # --- lifecycle -------------------------------------------------------------------------

    def _discovery(self) -> Any:
        o = self.options
        source = discovery_source(
            endpoints_file=o.endpoints_file,
            selector=o.endpoint_selector,
            namespace=o.namespace,
            target_port=o.endpoint_target_port,
            registry=self.registry,
        )
        if source is None:
            raise ValueError("give --endpoints-file or --endpoint-selector")
        return source

    async def _follow(self, source: Any) -> None:
        async for endpoints in source.watch():
            self.datastore.set_endpoints(endpoints)
            self.health.set("endpoints-synced", True)

    async def start(self) -> None:
        o = self.options
        source = self._discovery()
        await self.datastore.start()
        self._tasks.append(asyncio.create_task(self._follow(source), name="discovery"))
        for plugin in self.built.plugins.values():
            if isinstance(plugin, Lifecycle):
                await plugin.start()
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        main = grpc.aio.server(options=options)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.extproc, main)
        health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, main)
        if main.add_insecure_port(f"{o.host}:{o.grpc_port}") == 0:
            raise OSError(f"cannot listen on gRPC port {o.grpc_port}")
        await main.start()
        self._servers.append(main)
        if o.grpc_health_port and o.grpc_health_port != o.grpc_port:
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, hs)
            if hs.add_insecure_port(f"{o.host}:{o.grpc_health_port}") == 0:
                raise OSError(f"cannot listen on gRPC health port {o.grpc_health_port}")
            await hs.start()
            self._servers.append(hs)
        if o.metrics_port:
            self._http = http_server(self.http_app(), o.host, o.metrics_port)
            self._tasks.append(asyncio.create_task(self._http.serve(), name="http"))
        log.info(
            "llmd-scheduler serving ext_proc on :%d (health :%d, metrics :%d) with %s",
            o.grpc_port,
            o.grpc_health_port,
            o.metrics_port,
            self.config_origin,
        )

    async def drain(self) -> None:
        """Stop being ready, let in-flight streams finish (up to the drain timeout), stop."""
        self.grpc_health.draining = True
        self.health.draining = True
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.director.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.director.inflight:
            log.warning("drain timeout: %d requests still in flight", self.director.inflight)
        for server in self._servers:
            await server.stop(grace=1.0)
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for plugin in self.built.plugins.values():
            if isinstance(plugin, Lifecycle):
                with contextlib.suppress(Exception):
                    await plugin.stop()
        await self.datastore.stop()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        await stop.wait()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")
