"""`llmd-activator` as a service: config, composition root, HTTP surface.

One HTTP port: `/v1/...` is held and forwarded (`core.Activator`); `/healthz`, `/readyz` (ready
once the pool has been read), `/metrics` are the activator's own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from pydantic import Field

from llmd.activator.core import Activator, ActivatorSettings
from llmd.activator.warm import Warmer, load_warm_prompts
from llmd.runtime.cluster import Cluster, HttpCluster, KubernetesCluster, KubernetesPool
from llmd.runtime.config import ConfigError, ConfigIssue, Seconds
from llmd.runtime.discovery import kube_api_client
from llmd.runtime.lifecycle import (
    BodyTooLargeError,
    Health,
    health_router,
    read_body,
    serve_http,
)
from llmd.runtime.proxy import ProxyTimeouts, StreamingProxy, error_response
from llmd.runtime.service import ServiceConfig
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)


class ActivatorConfig(ServiceConfig):
    """Everything `llmd-activator` takes."""

    pool: str = Field(default="", description="the pool (Deployment) to activate (required)")
    cluster: Literal["local", "kubernetes"] = Field(
        default="local",
        description="local: the process pool of `llmd-dev up`; kubernetes: the Deployment's "
        "scale subresource and its pods through the official client",
    )
    control_url: str = Field(
        default="http://127.0.0.1:8003", description="cluster=local: the control API"
    )
    namespace: str = Field(default="default", description="cluster=kubernetes: the namespace")
    selector: str = Field(default="", description="cluster=kubernetes: the pods' label selector")
    engine_port: int = Field(default=8000, gt=0, lt=65536, description="engines' HTTP port")
    http_port: int = Field(default=8090, ge=0, lt=65536, description="HTTP port")
    upstream_url: str = Field(
        default="",
        description="forward to this URL (the gateway) once the pool is up; default: straight "
        "to a ready engine",
    )
    max_queued: int = Field(default=1000, gt=0, description="requests held at most")
    hold_timeout: Seconds = Field(
        default=60.0, gt=0, description="how long a request waits for a ready engine"
    )
    poll_interval: Seconds = Field(
        default=0.05, gt=0, description="pool readiness poll while requests are held"
    )
    scale_to_zero: bool = Field(
        default=False, description="scale the pool to zero after scale_down_delay idle"
    )
    scale_down_delay: Seconds = Field(
        default=120.0, gt=0, description="idle time (nothing held or in flight) before zero"
    )
    retry_after: int = Field(default=5, ge=0, description="Retry-After seconds on a 503")
    max_body_bytes: int = Field(default=32 << 20, gt=0, description="largest request body")
    read_timeout: Seconds = Field(
        default=600.0, gt=0, description="longest silence from an engine inside a response"
    )
    warm_prompts_file: str = Field(
        default="",
        description="warm start: a YAML list of the pool's hot prompts, sent with max_tokens 1 "
        "to every replica that joins the pool (loaded from the FS tier when it has them)",
    )
    warm_model: str = Field(
        default="", description="warm start: the model of prompts that do not name one"
    )
    warm_prompts_url: str = Field(
        default="",
        pattern=r"^(https?://\S+)?$",
        description="warm start: llmd-scheduler's /debug/hot-prompts URL; each joining replica "
        "also gets the hottest chat heads the scheduler routed lately",
    )
    warm_prompts_token: str | None = Field(
        default=None, description="warm start: the scheduler's --debug-token, if it has one"
    )
    warm_top: int = Field(
        default=8, gt=0, le=256, description="warm start: learned prompts sent per replica"
    )
    warm_concurrency: int = Field(
        default=2, gt=0, le=64, description="warm start: prompts in flight per replica"
    )
    warm_timeout: Seconds = Field(
        default=60.0, gt=0, description="warm start: longest wait for one warm-up request"
    )

    def settings(self) -> ActivatorSettings:
        return ActivatorSettings(
            pool=self.pool,
            max_queued=self.max_queued,
            hold_timeout_s=self.hold_timeout,
            poll_s=self.poll_interval,
            scale_to_zero=self.scale_to_zero,
            scale_down_delay_s=self.scale_down_delay,
            retry_after_s=self.retry_after,
            upstream_url=self.upstream_url,
        )


class ActivatorApp:
    def __init__(self, config: ActivatorConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster
        self.registry = CollectorRegistry()
        self.health = Health(self.registry)
        self.health.set("pool-synced", False, "the pool has not been read yet")
        self.warmer: Warmer | None = None
        if config.warm_prompts_file or config.warm_prompts_url:
            self.warmer = Warmer(
                config.pool,
                load_warm_prompts(config.warm_prompts_file, config.warm_model)
                if config.warm_prompts_file
                else [],
                registry=self.registry,
                concurrency=config.warm_concurrency,
                timeout_s=config.warm_timeout,
                learned_url=config.warm_prompts_url,
                learned_token=config.warm_prompts_token,
                learned_top=config.warm_top,
                model=config.warm_model,
            )
        self.activator = Activator(
            config.settings(),
            cluster,
            registry=self.registry,
            proxy=StreamingProxy(ProxyTimeouts(read_s=config.read_timeout)),
            warmer=self.warmer,
        )
        self._servers: list[Any] = []
        self._watch: asyncio.Task[None] | None = None

    def describe(self) -> str:
        c = self.config
        target = c.upstream_url or "a ready engine"
        zero = f"after {c.scale_down_delay:g}s idle" if c.scale_to_zero else "never"
        warm = ""
        if self.warmer is not None:
            warm = f"; warms new replicas with {len(self.warmer.prompts)} prompt(s)"
            if c.warm_prompts_url:
                warm += f" and up to {c.warm_top} learned from {c.warm_prompts_url}"
        return (
            f"llmd-activator: pool {c.pool} ({c.cluster}), forwarding to {target}; holds up to "
            f"{c.max_queued} requests for {c.hold_timeout:g}s; scale to zero {zero}{warm}"
        )

    def http_app(self) -> FastAPI:
        app = FastAPI(title="llmd-activator", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))

        @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
        async def forward(request: Request) -> Response:
            try:
                body = await read_body(request, self.config.max_body_bytes)
            except BodyTooLargeError as exc:
                return error_response(413, str(exc), "BadRequestError")
            return await self.activator.handle(request, body)

        return app

    async def _ready_when_synced(self) -> None:
        await self.activator.synced.wait()
        self.health.set("pool-synced", True)

    async def start(self) -> None:
        self._servers.append(serve_http(self.http_app(), self.config.host, self.config.http_port))
        self.activator.start()
        self._watch = asyncio.create_task(self._ready_when_synced())
        log.info("%s", self.describe())

    async def stop(self) -> None:
        await cancel_tasks(self._watch)
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:
            await asyncio.wait([t for _, t in self._servers], timeout=5)
        await self.activator.stop()
        close = getattr(self.cluster, "aclose", None)
        if close is not None:
            await close()


def build(config: ActivatorConfig) -> ActivatorApp:
    """The composition root (ConfigError for a config that cannot run)."""
    if not config.pool:
        raise ConfigError([ConfigIssue("pool", "required: the pool to activate")])
    cluster: Cluster
    if config.cluster == "kubernetes":
        if not config.selector:
            raise ConfigError([ConfigIssue("selector", "required with cluster=kubernetes")])
        from kubernetes import client

        api = kube_api_client()
        pool = KubernetesPool(config.pool, config.namespace, config.selector, config.engine_port)
        cluster = KubernetesCluster(
            client.CoreV1Api(api), client.AppsV1Api(api), {config.pool: pool}
        )
    else:
        cluster = HttpCluster(config.control_url)
    return ActivatorApp(config, cluster)
