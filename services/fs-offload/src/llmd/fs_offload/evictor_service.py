"""`llmd-fs-evictor`: one per shared KV volume; keeps it between its watermarks.

Runs `Evictor` passes every `interval`, exports what they did on `/metrics`, answers `/healthz`
and `/readyz` (ready once a pass has read the volume), and publishes a `BlockRemoved` (medium
`STORAGE`) for every chunk it removes on a vLLM-format KV-event stream, so indexes that took the
tier's `BlockStored` events stay true.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import zmq.asyncio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from llmd.fs_offload.evictor import Evictor, PassReport
from llmd.fs_offload.layout import event_hash
from llmd.kvcache.publisher import KVEventPublisher
from llmd.protocol.kv_events import MEDIUM_STORAGE, BlockRemoved, format_topic
from llmd.runtime.config import ConfigError, ConfigIssue, Seconds
from llmd.runtime.lifecycle import Health, health_router, serve_http
from llmd.runtime.service import ServiceConfig, ServiceSpec, service_main
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger("llmd.fs_evictor")

MAX_HASHES_PER_EVENT = 1024


class EvictorConfig(ServiceConfig):
    """Everything `llmd-fs-evictor` takes."""

    root: str = Field(
        default="", description="the shared KV directory (shared_storage_path; required)"
    )
    high_watermark: float = Field(
        default=0.85, gt=0, le=1, description="start removing at this usage"
    )
    low_watermark: float = Field(default=0.70, gt=0, lt=1, description="remove down to this usage")
    capacity_bytes: int = Field(
        default=0,
        ge=0,
        description="measure usage as the tier's own files against this quota instead of the "
        "filesystem's size (0: the filesystem)",
    )
    min_age: Seconds = Field(
        default=60.0, ge=0, description="never remove a file used this recently"
    )
    stale_temp_age: Seconds = Field(
        default=3600.0, gt=0, description="remove writers' temp files older than this"
    )
    interval: Seconds = Field(default=10.0, gt=0, description="time between passes")
    dry_run: bool = Field(default=False, description="report what would be removed; remove nothing")
    http_port: int = Field(default=8080, ge=0, lt=65536, description="metrics and health port")
    kv_events_endpoint: str = Field(
        default="", description="publish BlockRemoved here (e.g. tcp://*:5557; empty: off)"
    )
    kv_events_replay_endpoint: str = Field(
        default="", description="replay ROUTER endpoint (optional)"
    )
    kv_events_pod: str = Field(
        default="llmd-fs-evictor", description="the pod part of the event topic kv@<pod>@<model>"
    )
    model: str = Field(
        default="", description="the model part of the event topic (served model name)"
    )
    storage_domain: str = Field(
        default="",
        description="the volume's storage domain, sent as the events' ownership fs:<domain>",
    )


class EvictorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.usage = Gauge(
            "llmd_fs_evictor_usage_ratio",
            "Used fraction of the volume (or quota)",
            registry=registry,
        )
        self.files = Gauge(
            "llmd_fs_evictor_files", "Chunk files seen by the last full scan", registry=registry
        )
        self.passes = Counter(
            "llmd_fs_evictor_passes", "Passes by result", ["result"], registry=registry
        )
        self.removed = Counter(
            "llmd_fs_evictor_files_removed",
            "Files removed, by reason (lru, stale_temp)",
            ["reason"],
            registry=registry,
        )
        self.would_remove = Counter(
            "llmd_fs_evictor_dry_run_would_remove_files",
            "Files a dry-run pass would have removed",
            registry=registry,
        )
        self.bytes_removed = Counter(
            "llmd_fs_evictor_removed_bytes", "Bytes of chunk files removed", registry=registry
        )
        self.skipped = Counter(
            "llmd_fs_evictor_skipped_files",
            "Files kept although old enough, by reason (in_use, recent)",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "llmd_fs_evictor_errors",
            "Files that could not be removed, and failed passes",
            registry=registry,
        )
        self.events = Counter(
            "llmd_fs_evictor_events_published", "BlockRemoved events published", registry=registry
        )
        self.seconds = Histogram(
            "llmd_fs_evictor_pass_seconds",
            "Duration of a pass",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=registry,
        )


class EvictorApp:
    def __init__(self, config: EvictorConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.health = Health(self.registry)
        self.health.set("volume-read", False, "no pass has run yet")
        self.metrics = EvictorMetrics(self.registry)
        self.evictor = Evictor(
            config.root,
            high=config.high_watermark,
            low=config.low_watermark,
            min_age_s=config.min_age,
            stale_temp_age_s=config.stale_temp_age,
            dry_run=config.dry_run,
            capacity_bytes=config.capacity_bytes,
        )
        self._ctx: zmq.asyncio.Context | None = None
        self.publisher: KVEventPublisher | None = None
        self._servers: list[Any] = []
        self._loop: asyncio.Task[None] | None = None
        self.passes = 0
        self.last: PassReport | None = None

    def describe(self) -> str:
        c = self.config
        quota = f"a quota of {c.capacity_bytes} bytes" if c.capacity_bytes else "the filesystem"
        events = f"BlockRemoved on {c.kv_events_endpoint}" if c.kv_events_endpoint else "no events"
        mode = " (dry run)" if c.dry_run else ""
        return (
            f"llmd-fs-evictor{mode}: {c.root}, usage of {quota} kept between "
            f"{c.low_watermark:.0%} and {c.high_watermark:.0%} every {c.interval:g}s; {events}"
        )

    def http_app(self) -> FastAPI:
        app = FastAPI(title="llmd-fs-evictor", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))

        @app.get("/status")
        async def status() -> dict[str, Any]:
            last = self.last
            return {
                "passes": self.passes,
                "usage": last.usage_after if last else None,
                "last_removed": len(last.removed) if last else 0,
                "dry_run": self.config.dry_run,
            }

        return app

    async def start(self) -> None:
        if self.config.kv_events_endpoint:
            self._ctx = zmq.asyncio.Context()
            self.publisher = KVEventPublisher(
                self._ctx,
                endpoint=self.config.kv_events_endpoint,
                replay_endpoint=self.config.kv_events_replay_endpoint or None,
                topic=format_topic(self.config.kv_events_pod, self.config.model),
            )
            await self.publisher.start()
        self._servers.append(serve_http(self.http_app(), self.config.host, self.config.http_port))
        self._loop = asyncio.create_task(self._run(), name="evictor")
        log.info("%s", self.describe())

    async def _run(self) -> None:
        while True:
            await self.run_pass()
            await asyncio.sleep(self.config.interval)

    async def run_pass(self) -> PassReport | None:
        try:
            report = await asyncio.to_thread(self.evictor.run_once)
        except OSError as exc:
            self.metrics.errors.inc()
            self.metrics.passes.labels("error").inc()
            self.health.set("volume-read", False, f"{self.config.root}: {exc}")
            log.warning("eviction pass failed: %s", exc)
            return None
        self.health.set("volume-read", True)
        self.passes += 1
        self.last = report
        self.record(report)
        return report

    def record(self, report: PassReport) -> None:
        m = self.metrics
        m.usage.set(report.usage_after)
        m.seconds.observe(report.seconds)
        if report.files_seen:
            m.files.set(report.files_seen)
        m.skipped.labels("in_use").inc(report.skipped_in_use)
        m.skipped.labels("recent").inc(report.skipped_recent)
        m.errors.inc(report.errors)
        m.removed.labels("stale_temp").inc(0 if report.dry_run else report.stale_temps_removed)
        if report.dry_run:
            m.would_remove.inc(len(report.removed))
            m.passes.labels("dry_run" if report.removed else "idle").inc()
            if report.removed:
                log.info(
                    "dry run: would remove %d files (%d bytes), usage %.1f%% -> %.1f%%",
                    len(report.removed),
                    report.bytes_removed,
                    100 * report.usage_before,
                    100 * report.usage_after,
                )
            return
        m.passes.labels("evicted" if report.removed else "idle").inc()
        if not report.removed:
            return
        m.removed.labels("lru").inc(len(report.removed))
        m.bytes_removed.inc(report.bytes_removed)
        log.info(
            "removed %d files (%d bytes), usage %.1f%% -> %.1f%%; kept %d in use, %d recent",
            len(report.removed),
            report.bytes_removed,
            100 * report.usage_before,
            100 * report.usage_after,
            report.skipped_in_use,
            report.skipped_recent,
        )
        self.publish(report)

    def publish(self, report: PassReport) -> None:
        if self.publisher is None:
            return
        ownership = f"fs:{self.config.storage_domain}" if self.config.storage_domain else None
        by_group: dict[int, list[int | bytes]] = defaultdict(list)
        for r in report.removed:
            by_group[r.group].append(event_hash(r.block_hash))
        events = []
        for group, hashes in by_group.items():
            for i in range(0, len(hashes), MAX_HASHES_PER_EVENT):
                events.append(
                    BlockRemoved(
                        block_hashes=hashes[i : i + MAX_HASHES_PER_EVENT],
                        medium=MEDIUM_STORAGE,
                        group_idx=group,
                        ownership=ownership,
                    )
                )
        self.publisher.publish(events)
        self.metrics.events.inc(len(events))

    async def stop(self) -> None:
        await cancel_tasks(self._loop)
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:
            await asyncio.wait([t for _, t in self._servers], timeout=5)
        if self.publisher is not None:
            await self.publisher.close()
        if self._ctx is not None:
            self._ctx.term()


def build(config: EvictorConfig) -> EvictorApp:
    issues = []
    if not config.root:
        issues.append(ConfigIssue("root", "required: the shared KV directory"))
    elif not os.path.isdir(config.root):
        issues.append(ConfigIssue("root", f"{config.root} is not a directory"))
    if config.low_watermark >= config.high_watermark:
        issues.append(ConfigIssue("low_watermark", "must be below high_watermark"))
    if config.kv_events_endpoint and not config.model:
        issues.append(
            ConfigIssue("model", "required with kv_events_endpoint (the event topic's model)")
        )
    if issues:
        raise ConfigError(issues)
    return EvictorApp(config)


SPEC = ServiceSpec(
    name="llmd-fs-evictor",
    config=EvictorConfig,
    build=build,
    description=(
        "llmd's evictor for a shared KV volume written by llmd-fs-offload: removes the least "
        "recently used chunk files when usage passes the high watermark, down to the low one, "
        "never a file in use, and publishes BlockRemoved for each."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
