"""Composition root: builds the scheduler from its options and runs its servers.

discovery (static file | Kubernetes) -> Datastore (collectors) -> Director (plugins)
gRPC :9002  ExternalProcessor + Health      (Envoy talks here; TLS with --secure-serving)
gRPC :9003  Health only                     (probes)
HTTP --extauthz-port  Envoy ext_authz checks (off by default; see extauthz.py)
HTTP :9090  /metrics /healthz /readyz
HTTP debug  /debug/decisions /debug/explain /debug/plugins/state /debug/hot-prompts: off
            unless --debug-port, on 127.0.0.1 unless --debug-host, behind --debug-token when
            one is set
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from typing import Any, Literal

import grpc
import msgspec
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from fastapi import Depends, FastAPI, Request, Response
from grpc_health.v1 import health_pb2_grpc
from opentelemetry import trace
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from pydantic import Field, model_validator

from llmd.runtime.cluster import ClusterError
from llmd.runtime.config import ConfigError, ConfigIssue, Seconds
from llmd.runtime.discovery import discovery_source, kube_api_client
from llmd.runtime.lifecycle import (
    BodyTooLargeError,
    Health,
    QuietHttpServer,
    grpc_listen,
    health_router,
    read_body,
    require_token,
    serve_http,
)
from llmd.runtime.service import ServiceConfig
from llmd.runtime.tasks import cancel_tasks
from llmd.runtime.tls import TLSServing
from llmd.scheduler.config import load_config_file
from llmd.scheduler.core import SchedulerCore, build_core
from llmd.scheduler.extauthz import CheckServer
from llmd.scheduler.extproc import ExternalProcessor, HealthService
from llmd.scheduler.feedback import AccessLogService, FeedbackBook
from llmd.scheduler.framework import SchedulingError
from llmd.scheduler.hotprompts import HotPrompts
from llmd.scheduler.metrics import LegacyNames
from llmd.scheduler.objectives import OBJECTIVES_REFRESH_S, KubeObjectives, load_objectives

log = logging.getLogger(__name__)

ACTIVATOR_RESOLVE_S = 30.0

MAX_EXPLAIN_BYTES = 1024 * 1024


class SchedulerConfig(ServiceConfig, TLSServing):
    """Everything `llmd-scheduler` takes (flags follow llm-d's EPP where they overlap)."""

    config_file: str | None = Field(
        default=None, description="EndpointPickerConfig YAML (default: llm-d's optimized baseline)"
    )
    config_text: str | None = Field(default=None, description="EndpointPickerConfig YAML inline")
    endpoints_file: str | None = Field(
        default=None,
        description="static discovery file (llm-d file-discovery format), re-read on change",
    )
    endpoint_selector: str | None = Field(
        default=None, description="Kubernetes label selector of the model-server pods"
    )
    endpoint_target_port: int = Field(default=8000, gt=0, lt=65536, description="model-server port")
    pool_namespace: str = Field(default="default", description="namespace of the pods")
    pool_name: str = Field(default="llmd", description="pool name in metric labels")
    grpc_port: int = Field(default=9002, ge=0, lt=65536, description="ext_proc gRPC port")
    extauthz_port: int = Field(
        default=0,
        ge=0,
        lt=65536,
        description="HTTP port answering Envoy's ext_authz filter (http_service, path prefix "
        "/llmd/check, health /llmd/health): a cheaper gateway path than ext_proc for pools "
        "without model rewrites; 0 = off",
    )
    grpc_health_port: int = Field(
        default=9003,
        ge=0,
        lt=65536,
        description="gRPC health port, plaintext for kubelet probes (0 = off)",
    )
    metrics_port: int = Field(
        default=9090,
        ge=0,
        lt=65536,
        description="HTTP port: /metrics, /healthz, /readyz, /debug/* (0 = off)",
    )
    refresh_metrics_interval: Seconds = Field(
        default=0.05, gt=0, description="how often each endpoint's /metrics is scraped"
    )
    max_scrapes_per_second: float = Field(
        default=200.0,
        gt=0,
        description="all endpoints together are scraped at most this often (the interval "
        "stretches for large pools: 64 endpoints at 200/s are scraped every 320 ms)",
    )
    metrics_name_filter: bool = Field(
        default=True,
        description="scrape each engine for only the metrics the scheduler reads "
        "(/metrics/?name[]=..., prometheus_client's filter, as vLLM serves it), once a whole "
        "page has shown that the engine honours it (checked again every 5 min)",
    )
    allow_experimental_plugins: bool = Field(default=False, description="allow Alpha plugins")
    activator_endpoint: str = Field(
        default="",
        description="host:port of llmd-activator (an address, or a DNS name such as its "
        "Kubernetes Service, resolved every 30 s): while the pool has no endpoint, requests go "
        "there (it holds them and scales the pool up) instead of waiting in flow control",
    )
    legacy_metric_names: bool = Field(
        default=True,
        description="also export the llm_d_router_epp_* names of llm-d-router's earlier "
        "releases (its Grafana dashboard uses them), as llm-d does",
    )
    inference_objectives_file: str | None = Field(
        default=None,
        description="YAML of llm-d InferenceObjective documents: the priority a request's "
        "x-llm-d-inference-objective header selects (unknown or none: 0)",
    )
    inference_objectives_source: Literal["file", "kubernetes"] = Field(
        default="file",
        description="file: inference_objectives_file (or none); kubernetes: the "
        "InferenceObjective resources of pool_namespace naming this pool, re-listed every 10 s",
    )
    debug_port: int = Field(
        default=0,
        ge=0,
        lt=65536,
        description="HTTP port of /debug/* (routing decisions, dry runs, plugin state); 0 = off",
    )
    debug_host: str = Field(
        default="127.0.0.1", description="address the debug port listens on (loopback only)"
    )
    debug_token: str | None = Field(
        default=None, description="when set, /debug/* requires 'Authorization: Bearer <token>'"
    )
    hot_prompts: int = Field(
        default=64,
        ge=0,
        le=4096,
        description="chat heads (leading system/developer messages) learned from routed "
        "requests and served at /debug/hot-prompts for warm starts; 0 = off",
    )
    hot_prompts_half_life: Seconds = Field(
        default=600.0, gt=0, description="how fast a hot prompt's count fades when unused"
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> SchedulerConfig:
        if self.config_file is not None and self.config_text is not None:
            raise ValueError("give config_file or config_text, not both")
        if self.endpoints_file is not None and self.endpoint_selector is not None:
            raise ValueError("give endpoints_file or endpoint_selector, not both")
        if self.inference_objectives_source == "kubernetes" and self.inference_objectives_file:
            raise ValueError(
                "inference_objectives_file is for inference_objectives_source=file; with "
                "kubernetes the objectives come from the API server"
            )
        if self.activator_endpoint and activator_address(self.activator_endpoint) is None:
            raise ValueError(
                f"activator_endpoint {self.activator_endpoint!r} must be HOST:PORT, the host an "
                "IP address or a DNS name (a Kubernetes Service)"
            )
        return self


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def activator_address(endpoint: str) -> tuple[str, int, bool] | None:
    """(host, port, host is an IP address) of a HOST:PORT, or None when it is not one."""
    host, sep, port_text = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return None
    if not sep or not 0 < port < 65536:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return (host, port, False) if _HOSTNAME.match(host) else None
    return host, port, True


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SchedulerApp:
    """The scheduler service: wires the pieces and owns their lifecycle."""

    def __init__(self, config: SchedulerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        epp, self.config_origin = load_config_file(config.config_file, config.config_text)
        provider = trace.get_tracer_provider()
        traced = not isinstance(provider, trace.ProxyTracerProvider)
        objectives = (
            load_objectives(config.inference_objectives_file)
            if config.inference_objectives_file
            else None
        )
        self.core: SchedulerCore = build_core(
            epp,
            objectives=objectives,
            registry=registry,
            refresh_interval_s=config.refresh_metrics_interval,
            max_scrapes_per_s=config.max_scrapes_per_second,
            filter_scrapes=config.metrics_name_filter,
            pool_name=config.pool_name,
            allow_experimental=config.allow_experimental_plugins,
            tracer=provider.get_tracer("llmd.scheduler") if traced else None,
            activator=self._activator_ip(),
        )
        self.registry = self.core.registry
        self.objectives_count = Gauge(
            "llmd_inference_objectives",
            "InferenceObjectives in force (their priorities order flow control's bands)",
            registry=self.registry,
        )
        self.objectives_errors = Counter(
            "llmd_inference_objectives_errors_total",
            "Failed reads of the InferenceObjective resources (the last good set stays)",
            registry=self.registry,
        )
        self.objectives_count.set(len(objectives or {}))
        self.activator_resolve_failures = Counter(
            "llmd_activator_resolve_failures_total",
            "Times the activator's DNS name (--activator-endpoint) did not resolve",
            registry=self.registry,
        )
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        if config.legacy_metric_names:
            self.registry.register(LegacyNames(self.registry))
        self.datastore = self.core.datastore
        self.built = self.core.built
        self.director = self.core.director
        if config.hot_prompts:
            hot = self.director.hot = HotPrompts(
                max_entries=config.hot_prompts, half_life_s=config.hot_prompts_half_life
            )
            Gauge(
                "llmd_scheduler_hot_prompts",
                "Chat heads tracked as the pool's hot prompts (for warm starts)",
                registry=self.registry,
            ).set_function(lambda: len(hot))
            Gauge(
                "llmd_scheduler_hot_prompts_chars",
                "Characters held by the tracked hot prompts (bounded at 4 Mi)",
                registry=self.registry,
            ).set_function(lambda: hot.chars)
        self.health = Health(self.registry)
        self.health.set("endpoints-synced", False, "discovery has not reported yet")
        self.grpc_health = HealthService(lambda: self.datastore.synced.is_set())
        self.feedback = FeedbackBook(self.director)
        self.extproc = ExternalProcessor(
            self.director, self.built.settings.max_body_bytes, self.feedback
        )
        self.access_log = AccessLogService(self.feedback)
        self.checks = CheckServer(
            self.director,
            self.feedback,
            lambda: self.datastore.synced.is_set(),
            self.built.settings.max_body_bytes,
        )
        self.feedback.check_connections = lambda: self.checks.connections
        if config.extauthz_port:
            checks = self.checks
            Gauge(
                "llmd_scheduler_extauthz_connections",
                "Open connections from Envoy's ext_authz filter (one per check in flight)",
                registry=self.registry,
            ).set_function(lambda: checks.connections)
            Gauge(
                "llmd_scheduler_extauthz_open_requests",
                "Requests routed through ext_authz still in flight, waiting for their "
                "access-log entry",
                registry=self.registry,
            ).set_function(lambda: self.feedback.open)
        self._servers: list[grpc.aio.Server] = []
        self._http: list[QuietHttpServer] = []
        self._http_tasks: list[asyncio.Task[None]] = []
        self.tls = config.tls_files()
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False

    def _activator_ip(self) -> str:
        """The activator's IP:port when configured by address; a name is resolved at start
        (Envoy's original-destination cluster takes an address, not a name)."""
        parsed = activator_address(self.config.activator_endpoint)
        if parsed is None or not parsed[2]:
            return ""
        return _join(parsed[0], parsed[1])

    async def _follow_objectives(self, source: KubeObjectives) -> None:
        """Re-list the InferenceObjectives; a failed read keeps the last good set."""
        reported: set[str] = set()
        while True:
            try:
                objectives, problems = await source.list()
            except ClusterError as exc:
                self.objectives_errors.inc()
                log.warning("InferenceObjectives not read (keeping %d): %s",
                            len(self.director.objectives), exc)  # fmt: skip
            else:
                for p in set(problems) - reported:
                    log.warning("InferenceObjective skipped: %s", p)
                reported = set(problems)
                if objectives != self.director.objectives:
                    listing = ", ".join(f"{k}={v}" for k, v in sorted(objectives.items()))
                    log.info("%d InferenceObjective(s) in force: %s", len(objectives), listing)
                    self.director.objectives = objectives
                self.objectives_count.set(len(objectives))
            await asyncio.sleep(OBJECTIVES_REFRESH_S)

    async def _resolve_activator(self, host: str, port: int) -> None:
        """Follow the activator's DNS name (a Service's ClusterIP rarely changes, but it may):
        resolve now, then every ACTIVATOR_RESOLVE_S. While it does not resolve, requests that
        find the pool empty wait in flow control as they would without an activator."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, as Services
                address = _join(str(infos[0][4][0]), port)
            except (OSError, IndexError) as exc:
                self.activator_resolve_failures.inc()
                log.warning("activator %s:%d does not resolve: %s", host, port, exc)
                address = ""
            if address and address != self.director.activator:
                log.info("activator %s:%d is %s", host, port, address)
            if address or not self.director.activator:
                self.director.activator = address
            await asyncio.sleep(ACTIVATOR_RESOLVE_S)

    def describe(self) -> str:
        lines = []
        for name, prof in self.built.profiles.items():
            scorers = ", ".join(f"{s.name}x{w:g}" for s, w in prof.scorers) or "-"
            filters = ", ".join(f.name for f in prof.filters) or "-"
            lines.append(
                f"profile {name}: filters [{filters}] scorers [{scorers}] picker {prof.picker.name}"
            )
        lines.append(f"scheduler config: {self.config_origin}")
        return "\n".join(lines)

    # --- HTTP ------------------------------------------------------------------------------

    def http_app(self) -> FastAPI:
        """Health, readiness and metrics: what probes and Prometheus need, nothing else."""
        app = FastAPI(title="llmd-scheduler", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))
        return app

    def debug_app(self) -> FastAPI:
        """The operator's view: recent decisions, dry runs, plugin and endpoint state."""
        app = FastAPI(
            title="llmd-scheduler debug",
            docs_url=None,
            redoc_url=None,
            dependencies=[Depends(require_token(self.config.debug_token))],
        )

        @app.get("/debug/decisions")
        async def decisions(
            since: int = 0, request_id: str | None = None, limit: int = 100
        ) -> Response:
            return _json(self.director.explain(since, request_id, max(1, min(limit, 512))))

        @app.post("/debug/explain")
        async def explain(request: Request) -> Response:
            """Score a request without sending it: {"path", "body": {...}, "headers": {...}}."""
            try:
                doc = msgspec.json.decode(await read_body(request, MAX_EXPLAIN_BYTES))
                path = str(doc.get("path", "/v1/completions"))
                body = msgspec.json.encode(doc["body"])
                headers = {str(k).lower(): str(v) for k, v in (doc.get("headers") or {}).items()}
            except BodyTooLargeError as exc:
                return _json({"error": str(exc)}, 413)
            except (msgspec.DecodeError, KeyError, AttributeError, TypeError, RecursionError):
                return _json(
                    {"error": 'expected {"path": str, "body": object, "headers": object}'}, 400
                )
            try:
                return _json(await self.director.dry_run_async(path, body, headers))
            except SchedulingError as exc:
                return _json({"error": exc.message}, exc.status)

        @app.get("/debug/hot-prompts")
        async def hot_prompts(top: int = 8, min_requests: int = 2, model: str = "") -> Response:
            """The hottest chat heads, in llmd-activator's warm-prompt shape (model, messages)."""
            hot = self.director.hot
            if hot is None:
                return _json({"error": "hot prompts are off (--hot-prompts 0)"}, 404)
            return _json(
                {
                    "prompts": hot.top(max(0, min(top, 256)), max(1, min_requests), model),
                    "tracked": len(hot),
                    "chars": hot.chars,
                    "evicted": hot.evicted,
                }
            )

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
                    "flow_control": self.director.flow.state() if self.director.flow else None,
                }
            )

        return app

    # --- lifecycle -------------------------------------------------------------------------

    def _discovery(self) -> Any:
        c = self.config
        source = discovery_source(
            endpoints_file=c.endpoints_file,
            selector=c.endpoint_selector,
            namespace=c.pool_namespace,
            target_port=c.endpoint_target_port,
            registry=self.registry,
        )
        if source is None:
            raise ConfigError(
                [ConfigIssue("endpoints_file", "give endpoints_file or endpoint_selector")],
                "llmd-scheduler configuration",
            )
        return source

    async def _follow(self, source: Any) -> None:
        async for endpoints in source.watch():
            self.datastore.set_endpoints(endpoints)
            self.health.set("endpoints-synced", True)

    async def start(self) -> None:
        o = self.config
        source = self._discovery()
        self._started = True
        await self.core.start()
        self._tasks.append(asyncio.create_task(self._follow(source), name="discovery"))
        if o.inference_objectives_source == "kubernetes":
            from kubernetes import client

            objectives = KubeObjectives(
                client.CustomObjectsApi(kube_api_client()), o.pool_namespace, o.pool_name
            )
            self._tasks.append(
                asyncio.create_task(self._follow_objectives(objectives), name="objectives")
            )
        parsed = activator_address(o.activator_endpoint)
        if parsed is not None and not parsed[2]:
            self._tasks.append(
                asyncio.create_task(
                    self._resolve_activator(parsed[0], parsed[1]), name="activator-dns"
                )
            )
        credentials = self.tls.credentials() if self.tls is not None else None
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        main = grpc.aio.server(options=options)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.extproc, main)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log, main)
        health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, main)
        self.feedback.start()
        grpc_listen(main, f"{o.host}:{o.grpc_port}", credentials)
        await main.start()
        self._servers.append(main)
        if o.extauthz_port:
            await self.checks.start(o.host, o.extauthz_port)
            flow = self.director.flow
            if flow is not None and flow.eviction:
                log.warning(
                    "flowControl.enableEviction is on, but requests routed through the "
                    "ext_authz port (:%d) cannot be evicted once dispatched (no stream to end); "
                    "only ext_proc requests can",
                    o.extauthz_port,
                )
        if o.grpc_health_port and o.grpc_health_port != o.grpc_port:
            # plaintext: it answers only grpc.health.v1, and kubelet's gRPC probes speak no TLS
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, hs)
            grpc_listen(hs, f"{o.host}:{o.grpc_health_port}")
            await hs.start()
            self._servers.append(hs)
        if o.metrics_port:
            server, task = serve_http(self.http_app(), o.host, o.metrics_port)
            self._http.append(server)
            self._http_tasks.append(task)
        if o.debug_port:
            server, task = serve_http(self.debug_app(), o.debug_host, o.debug_port, "debug")
            self._http.append(server)
            self._http_tasks.append(task)
        log.info(
            "llmd-scheduler serving ext_proc on :%d (%s; ext_authz %s, health :%d, metrics :%d, "
            "debug %s) with %s",
            o.grpc_port,
            "TLS" if credentials is not None else "plaintext",
            f":{o.extauthz_port}" if o.extauthz_port else "off",
            o.grpc_health_port,
            o.metrics_port,
            f"{o.debug_host}:{o.debug_port}" if o.debug_port else "off",
            self.config_origin,
        )

    async def stop(self) -> None:
        """Stop being ready, let in-flight streams finish (up to the drain timeout), stop."""
        if not self._started:
            return
        self._started = False
        self.grpc_health.draining = True
        self.checks.draining = True
        self.health.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        while self.director.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.director.inflight:
            log.warning("drain timeout: %d requests still in flight", self.director.inflight)
        settle = min(deadline, time.monotonic() + 1.0)  # the access log's last entries
        while self.feedback.waiting and time.monotonic() < settle:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.checks.stop()
        for server in self._servers:
            await server.stop(grace=1.0)
        await self.feedback.stop()
        for http in self._http:
            http.should_exit = True
        if self._http_tasks:  # let them close their sockets: a restart can bind again at once
            await asyncio.wait(self._http_tasks, timeout=3)
        await cancel_tasks(*self._tasks)
        try:
            await self.core.stop()
        except Exception:
            log.exception("stopping the scheduler core failed")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def build(config: SchedulerConfig) -> SchedulerApp:
    """The composition root: the scheduler service for a config (ConfigError when invalid)."""
    return SchedulerApp(config)
