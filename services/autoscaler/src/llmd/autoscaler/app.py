"""`llmd-autoscaler` as a service: config, composition root, HTTP surface.

HTTP (one port): `/metrics` (`wva_desired_replicas` and the loop's own metrics), `/healthz`,
`/readyz` (ready once a pass has completed), `/debug/decisions` (the last decisions with their
inputs, newest last; `?variant=NAME` filters).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator, Field

from llmd.autoscaler.controller import Autoscaler
from llmd.autoscaler.decide import SaturationSettings
from llmd.autoscaler.kube import KubeVariants
from llmd.autoscaler.prometheus import PrometheusSource
from llmd.autoscaler.prometheus import parse_url as parse_prometheus_url
from llmd.autoscaler.variants import Variant, load_variants
from llmd.runtime.cluster import (
    Cluster,
    ClusterError,
    HttpCluster,
    KubernetesCluster,
    KubernetesPool,
)
from llmd.runtime.config import ConfigError, ConfigIssue, Seconds, StrictModel
from llmd.runtime.discovery import kube_api_client
from llmd.runtime.lifecycle import Health, health_router, serve_http
from llmd.runtime.service import ServiceConfig
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: metrics URLs are plain http://HOST:PORT/PATH")
    return url


def _check_urls(urls: list[str]) -> list[str]:
    for url in urls:
        _check_url(url)
    return urls


class Saturation(StrictModel):
    """WVA's saturation-scaling keys (camelCase names are accepted in a config file)."""

    kv_cache_threshold: float = Field(
        default=0.8, gt=0, le=1, alias="kvCacheThreshold",
        description="a replica at this KV-cache usage is saturated",
    )  # fmt: skip
    queue_length_threshold: float = Field(
        default=5, gt=0, alias="queueLengthThreshold",
        description="a replica with this many waiting requests is saturated",
    )  # fmt: skip
    kv_spare_trigger: float = Field(
        default=0.1, ge=0, lt=1, alias="kvSpareTrigger",
        description="scale up when the mean spare KV of unsaturated replicas falls below this",
    )  # fmt: skip
    queue_spare_trigger: float = Field(
        default=3, ge=0, alias="queueSpareTrigger",
        description="scale up when the mean spare queue of unsaturated replicas falls below this",
    )  # fmt: skip

    batch_target: float = Field(
        default=0.75, gt=0, le=1, alias="batchTarget",
        description="size the load so replicas run this share of their batch limit (llmd)",
    )  # fmt: skip
    prefill_target: float = Field(
        default=0.7, gt=0, le=1, alias="prefillTarget",
        description="size the load so replicas compute this share of their prefill capacity "
        "(llmd; needs latency_model_urls)",
    )  # fmt: skip

    def settings(self) -> SaturationSettings:
        return SaturationSettings(
            self.kv_cache_threshold,
            self.queue_length_threshold,
            self.kv_spare_trigger,
            self.queue_spare_trigger,
            self.batch_target,
            self.prefill_target,
        )


class AutoscalerConfig(ServiceConfig):
    """Everything `llmd-autoscaler` takes."""

    variants_file: str = Field(
        default="", description="YAML file of VariantAutoscaling objects (variants_source=file)"
    )
    variants_source: Literal["file", "kubernetes"] = Field(
        default="file",
        description="file: variants_file; kubernetes: the VariantAutoscaling objects in the "
        "cluster (re-read every variants_refresh; status written back)",
    )
    variants_namespace: str = Field(
        default="", description="variants_source=kubernetes: one namespace (default: all)"
    )
    variants_refresh: Seconds = Field(
        default=30.0, gt=0, description="variants_source=kubernetes: how often to re-list them"
    )
    cluster: Literal["local", "kubernetes"] = Field(
        default="local",
        description="local: the process pool of `llmd-dev up` (its control API); kubernetes: "
        "Deployments' scale subresource and pods through the official client",
    )
    control_url: str = Field(
        default="http://127.0.0.1:8003", description="cluster=local: the control API"
    )
    engine_port: int = Field(
        default=8000, gt=0, lt=65536, description="cluster=kubernetes: the engines' HTTP port"
    )
    drain_timeout: Seconds = Field(
        default=120.0,
        ge=0,
        description="cluster=kubernetes, actuation=scale: before a scale-down the pods to remove "
        "are taken out of discovery and the scale is patched once they are idle, or after this "
        "long (0: patch at once)",
    )
    actuation: Literal["auto", "metric", "scale"] = Field(
        default="auto",
        description="metric: only export wva_desired_replicas (an HPA/KEDA scales); scale: also "
        "set the replicas; auto: scale locally, metric in Kubernetes",
    )
    interval: Seconds = Field(default=5.0, gt=0, description="time between two passes")
    saturation: Saturation = Field(default_factory=Saturation)
    scale_to_zero: bool = Field(
        default=False,
        description="let variants with minReplicas 0 go to zero when idle (WVA_SCALE_TO_ZERO)",
    )
    retention_period: Seconds = Field(
        default=600.0, gt=0, description="idle time before scale-to-zero (WVA's retentionPeriod)"
    )
    scale_up_stabilization: Seconds = Field(
        default=0.0, ge=0, description="scale up on the lowest recommendation of this window"
    )
    scale_down_stabilization: Seconds = Field(
        default=30.0, ge=0, description="scale down on the highest recommendation of this window"
    )
    max_scale_up_step: int = Field(default=4, ge=1, description="replicas added per decision")
    max_scale_down_step: int = Field(default=1, ge=1, description="replicas removed per decision")
    predictive: bool = Field(
        default=True,
        description="scale up for the load expected once a new replica is ready, when it rises",
    )
    trend_window: Seconds = Field(
        default=30.0, gt=0, description="predictive: the window the load trend is fitted over"
    )
    startup_estimate: Seconds = Field(
        default=30.0,
        gt=0,
        description="predictive: replica start-up time until one has been measured",
    )
    demand_urls: Annotated[list[str], AfterValidator(_check_urls)] = Field(
        default_factory=list,
        description="/metrics URLs of schedulers and activators whose queued requests count as "
        "demand (llm_d_epp_flow_control_queue_size, llmd_activator_queue_size)",
    )
    latency_model_urls: dict[str, Annotated[str, AfterValidator(_check_url)]] = Field(
        default_factory=dict,
        description="per model, the /metrics URL of the scheduler whose latency model gives one "
        "replica's prefill capacity (llmd_latency_model_prefill_tokens_per_second); with it, "
        "the prompt tokens the engines compute per second are load too",
    )
    metrics_source: Literal["engines", "prometheus"] = Field(
        default="engines",
        description="engines: read each replica's /metrics (seconds fresh); prometheus: the "
        "same vLLM series from prometheus_url (lags by its scrape interval)",
    )
    prometheus_url: str = Field(
        default="",
        description="metrics_source=prometheus: http://HOST:PORT[/PREFIX] of Prometheus's API",
    )
    controller_instance: str = Field(
        default="", description="value of the controller_instance label (WVA's)"
    )
    http_port: int = Field(
        default=8081, ge=0, lt=65536, description="HTTP port: /metrics, health, /debug/decisions"
    )


def _check_prometheus(config: AutoscalerConfig) -> None:
    if config.metrics_source == "prometheus":
        try:
            parse_prometheus_url(config.prometheus_url)
        except ValueError as exc:
            raise ConfigError(
                [ConfigIssue("prometheus_url", f"metrics_source=prometheus needs {exc}")]
            ) from None


def kube_pools(variants: list[Variant], port: int) -> dict[str, KubernetesPool]:
    """Deployments named by the variants' scaleTargetRef, pods by their selectors."""
    return {v.target: KubernetesPool(v.target, v.namespace, v.selector, port) for v in variants}


class AutoscalerApp:
    def __init__(
        self,
        config: AutoscalerConfig,
        variants: list[Variant],
        cluster: Cluster,
        kube_variants: KubeVariants | None = None,
    ) -> None:
        self.config = config
        self.kube_variants = kube_variants
        self.variants = variants
        self.cluster = cluster
        self.registry = CollectorRegistry()
        self.health = Health(self.registry)
        self.health.set("first-pass", False, "no pass completed yet")
        actuation = config.actuation
        if actuation == "auto":
            actuation = "scale" if config.cluster == "local" else "metric"
        self.autoscaler = Autoscaler(
            variants,
            cluster,
            settings=config.saturation.settings(),
            registry=self.registry,
            interval_s=config.interval,
            actuation=actuation,
            scale_to_zero=config.scale_to_zero,
            retention_s=config.retention_period,
            up_window_s=config.scale_up_stabilization,
            down_window_s=config.scale_down_stabilization,
            max_up=config.max_scale_up_step,
            max_down=config.max_scale_down_step,
            demand_urls=config.demand_urls,
            latency_model_urls=config.latency_model_urls,
            controller_instance=config.controller_instance,
            predictive=config.predictive,
            trend_window_s=config.trend_window,
            startup_estimate_s=config.startup_estimate,
            prometheus=(
                PrometheusSource(config.prometheus_url)
                if config.metrics_source == "prometheus"
                else None
            ),
        )
        if kube_variants is not None:
            self.autoscaler.status_writer = kube_variants.write_status
        self._servers: list[Any] = []
        self._watch: asyncio.Task[None] | None = None
        self._follow: asyncio.Task[None] | None = None
        self._problems: tuple[str, ...] = ()

    async def refresh_variants(self) -> None:
        """Re-list the VariantAutoscaling objects and follow them (variants_source=kubernetes)."""
        if self.kube_variants is None:
            return
        try:
            variants, problems = await self.kube_variants.list()
        except ClusterError as exc:
            self.autoscaler.metrics.errors.labels("variants").inc()
            log.warning("cannot list VariantAutoscaling objects: %s", exc)
            return
        if tuple(problems) != self._problems:
            for p in problems:
                log.error("VariantAutoscaling skipped: %s", p)
            self._problems = tuple(problems)
        if [v.key for v in variants] != [v.key for v in self.variants] or variants != self.variants:
            log.info("following %d VariantAutoscaling object(s)", len(variants))
        self.variants = variants
        if isinstance(self.cluster, KubernetesCluster):
            self.cluster.set_pools(kube_pools(variants, self.config.engine_port))
        self.autoscaler.set_variants(variants)

    async def _follow_variants(self) -> None:
        while True:
            await asyncio.sleep(self.config.variants_refresh)
            await self.refresh_variants()

    def describe(self) -> str:
        lines = [
            f"llmd-autoscaler: {len(self.variants)} variant(s), cluster {self.config.cluster}, "
            f"actuation {self.autoscaler.actuation}, every {self.config.interval:g}s"
        ]
        for v in self.variants:
            lines.append(
                f"  {v.key}: model {v.model_id}, pool {v.target}, cost {v.cost:g}, "
                f"replicas [{v.min_replicas}, {v.max_replicas}]"
            )
        return "\n".join(lines)

    def http_app(self) -> FastAPI:
        app = FastAPI(title="llmd-autoscaler", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))

        @app.get("/debug/decisions")
        async def decisions(request: Request) -> Response:
            name = request.query_params.get("variant")
            out = [d.as_dict() for d in self.autoscaler.decisions if name in (None, d.variant)]
            return Response(msgspec.json.encode(out), media_type="application/json")

        return app

    async def _ready_when_passed(self) -> None:
        await self.autoscaler.passed.wait()
        self.health.set("first-pass", True)

    async def start(self) -> None:
        self._servers.append(serve_http(self.http_app(), self.config.host, self.config.http_port))
        if self.kube_variants is not None:
            await self.refresh_variants()
            self._follow = asyncio.create_task(self._follow_variants(), name="variants")
        self.autoscaler.start()
        self._watch = asyncio.create_task(self._ready_when_passed())
        log.info("%s", self.describe())

    async def stop(self) -> None:
        await cancel_tasks(self._watch, self._follow)
        await self.autoscaler.stop()
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:
            await asyncio.wait([t for _, t in self._servers], timeout=3)
        close = getattr(self.cluster, "aclose", None)
        if close is not None:
            await close()


def build(config: AutoscalerConfig) -> AutoscalerApp:
    """The composition root (ConfigError for a config that cannot run)."""
    _check_prometheus(config)
    if config.variants_source == "kubernetes":
        if config.cluster != "kubernetes":
            raise ConfigError(
                [ConfigIssue("variants_source", "kubernetes needs cluster: kubernetes")]
            )
        from kubernetes import client

        api = kube_api_client()
        cluster = KubernetesCluster(
            client.CoreV1Api(api),
            client.AppsV1Api(api),
            {},
            drain_timeout_s=config.drain_timeout,
        )
        source = KubeVariants(client.CustomObjectsApi(api), config.variants_namespace)
        return AutoscalerApp(config, [], cluster, source)
    if not config.variants_file:
        raise ConfigError(
            [ConfigIssue("variants_file", "required: a YAML file of VariantAutoscaling objects")]
        )
    variants = load_variants(config.variants_file)
    local: Cluster
    if config.cluster == "kubernetes":
        from kubernetes import client

        api = kube_api_client()
        pools = kube_pools(variants, config.engine_port)
        local = KubernetesCluster(
            client.CoreV1Api(api),
            client.AppsV1Api(api),
            pools,
            drain_timeout_s=config.drain_timeout,
        )
    else:
        local = HttpCluster(config.control_url)
    return AutoscalerApp(config, variants, local)
