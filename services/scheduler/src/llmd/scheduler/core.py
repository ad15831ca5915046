"""The scheduling core, built one way for the service, its tests and every benchmark.

    EndpointPickerConfig -> plugins and profiles (config.build) -> Datastore (endpoint pool,
    scrapers) -> Director (one request's path) ; plugin metrics and pool listeners hooked up

`build_core` is the only place these are wired, so a benchmark measures what users run: the
same staleness threshold, the same endpoint-removal hooks, the same plugin metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from llmd.scheduler.config import BuiltConfig, EndpointPickerConfig, build, load_config_file
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.flowcontrol import FlowMetrics
from llmd.scheduler.framework import Lifecycle, PluginHandle, PluginRegistry
from llmd.scheduler.metrics import SchedulerMetrics
from llmd.scheduler.plugins import plugin_registry


@dataclass
class SchedulerCore:
    """Datastore, plugins and Director of one scheduler, and their background work."""

    registry: CollectorRegistry
    datastore: Datastore
    built: BuiltConfig
    director: Director
    metrics: SchedulerMetrics

    async def start(self) -> None:
        """Start the scrapers and every plugin with background work."""
        await self.datastore.start()
        for plugin in self.built.plugins.values():
            if isinstance(plugin, Lifecycle):
                await plugin.start()
        if self.director.flow is not None:
            self.director.flow.start()

    async def stop(self) -> None:
        if self.director.flow is not None:
            await self.director.flow.stop()  # queued requests get 503 rejected-shutting-down
        for plugin in self.built.plugins.values():
            if isinstance(plugin, Lifecycle):
                await plugin.stop()
        await self.datastore.stop()


def build_core(
    epp: EndpointPickerConfig | str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    plugins: PluginRegistry | None = None,
    refresh_interval_s: float = 0.05,
    max_scrapes_per_s: float | None = None,
    filter_scrapes: bool = True,
    pool_name: str = "llmd",
    allow_experimental: bool = False,
    clock: Callable[[], float] = time.monotonic,
    tracer: trace.Tracer | None = None,
    objectives: Mapping[str, int] | None = None,
    activator: str = "",
) -> SchedulerCore:
    """The core for an EndpointPickerConfig (a model, YAML text, or None for the default).

    ConfigError lists every problem in the config."""
    if not isinstance(epp, EndpointPickerConfig):
        epp, _ = load_config_file(None, epp)
    registry = registry if registry is not None else CollectorRegistry()
    datastore = Datastore(
        registry,
        refresh_interval_s=refresh_interval_s,
        max_scrapes_per_s=max_scrapes_per_s,
        filter_scrapes=filter_scrapes,
        pool_name=pool_name,
        clock=clock,
    )
    built = build(
        epp,
        plugins if plugins is not None else plugin_registry(),
        PluginHandle(endpoints=datastore.all, clock=datastore.clock),
        allow_experimental=allow_experimental,
    )
    datastore.use_datalayer(built.datalayer)
    datastore.staleness_s = built.settings.staleness_s
    datastore.models_interval_s = built.settings.models_interval_s
    for plugin in built.plugins.values():
        plugin.register_metrics(registry)
        datastore.on_change(plugin.endpoints_changed)
    metrics = SchedulerMetrics(registry)
    director = Director(
        built,
        datastore,
        metrics,
        tracer=tracer,
        objectives=objectives,
        flow_metrics=FlowMetrics(registry, pool_name) if built.flow is not None else None,
        activator=activator,
    )
    return SchedulerCore(registry, datastore, built, director, metrics)
