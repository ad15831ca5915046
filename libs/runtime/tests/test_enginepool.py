"""The engine-pool scraper: the pure staleness rule, and real scrapes of engines on loopback
(one healthy, one answering 500, one gone), bounded targets and listener calls, and the name
filter against real prometheus_client exposition (served as vLLM serves it, and not)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry

from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.enginepool import EnginePoolScraper, filtered_path, fresh_or_all, is_fresh
from llmd.runtime.lifecycle import http_server

METRICS = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
"""


@dataclass
class Item:
    metrics_at: float


def test_staleness_is_one_rule_and_never_fails_closed() -> None:
    assert is_fresh(9.5, now=10.0, threshold_s=1.0)
    assert not is_fresh(8.0, now=10.0, threshold_s=1.0)
    assert not is_fresh(0.0, now=0.5, threshold_s=1.0)  # never scraped
    fresh, stale = Item(9.9), Item(5.0)
    assert fresh_or_all([fresh, stale], 10.0, 1.0) == [fresh]
    assert fresh_or_all([stale], 10.0, 1.0) == [stale]  # none fresh: all stay candidates


class Recorder:
    def __init__(self) -> None:
        self.snapshots: dict[str, EngineSnapshot] = {}
        self.model_sets: dict[str, frozenset[str]] = {}
        self.errors: list[tuple[str, str]] = []

    def metrics(self, key: str, started_at: float, snapshot: EngineSnapshot, now: float) -> None:
        assert started_at <= now
        self.snapshots[key] = snapshot

    def models(self, key: str, models: frozenset[str]) -> None:
        self.model_sets[key] = models

    def failed(self, key: str, source: str, error: str) -> None:
        self.errors.append((key, source))


def engine_app(healthy: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/metrics")
    async def metrics() -> Response:
        if healthy:
            return Response(METRICS, media_type="text/plain")
        return Response("boom", status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"data": [{"id": "m"}, {"id": "lora-a"}]}

    return app


async def _scrape(ports: list[int]) -> None:
    good, bad, _gone = ports
    servers = [http_server(engine_app(h), "127.0.0.1", p) for h, p in ((True, good), (False, bad))]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.01)
    rec = Recorder()
    registry = CollectorRegistry()
    scraper = EnginePoolScraper(
        interval_s=0.05, timeout_s=0.5, max_engines=3, registry=registry, listener=rec
    )
    keys = [f"127.0.0.1:{p}" for p in ports]
    scraper.set_targets([*keys, "127.0.0.1:1"])  # one past the bound: refused, counted
    assert list(scraper.samples) == keys
    await scraper.start()
    try:
        for _ in range(100):
            if keys[0] in rec.snapshots and {k for k, _ in rec.errors} >= set(keys[1:]):
                break
            await asyncio.sleep(0.05)
        snap = rec.snapshots[keys[0]]
        assert (snap.waiting, snap.running, snap.kv_cache_usage) == (3, 5, 0.25)
        assert rec.model_sets[keys[0]] == {"m", "lora-a"}
        assert keys[1] not in rec.snapshots
        assert scraper.samples[keys[1]].last_error == "ScrapeError: HTTP 500"
        assert scraper.samples[keys[2]].consecutive_failures >= 1
        assert [s.key for s in scraper.fresh(threshold_s=1.0)] == [keys[0]]
        assert registry.get_sample_value("llmd_engine_scrape_targets_refused_total") == 1
        scraper.set_targets(keys[:1])
        assert list(scraper.samples) == keys[:1]
    finally:
        await scraper.stop()
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks)


@pytest.mark.integration
def test_scraper_reads_good_engines_and_counts_bad_ones() -> None:
    from llmd.vllm_cpu.server import free_port

    asyncio.run(_scrape([free_port(), free_port(), free_port()]))


async def _hostile_metrics(port: int) -> None:
    app = FastAPI()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response('vllm:num_requests_waiting{model_name="m"} +Inf\n', media_type="text/plain")

    server = http_server(app, "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    rec = Recorder()
    scraper = EnginePoolScraper(interval_s=0.05, models_interval_s=0, listener=rec)
    key = f"127.0.0.1:{port}"
    scraper.set_targets([key])
    await scraper.start()
    try:
        for _ in range(100):
            if scraper.samples[key].consecutive_failures >= 3:
                break
            await asyncio.sleep(0.05)
        # the scraper keeps trying (its task did not die) and says why
        assert scraper.samples[key].consecutive_failures >= 3
        assert "not a count" in (scraper.samples[key].last_error or "")
        assert key not in rec.snapshots
    finally:
        await scraper.stop()
        server.should_exit = True
        await task


@pytest.mark.integration
def test_an_infinite_queue_is_an_error_and_the_scraper_keeps_going() -> None:
    from llmd.vllm_cpu.server import free_port

    asyncio.run(_hostile_metrics(free_port()))


def test_a_large_pool_stretches_the_interval_to_the_scrape_budget() -> None:
    registry = CollectorRegistry()
    scraper = EnginePoolScraper(interval_s=0.05, max_scrapes_per_s=200, registry=registry)
    scraper.set_targets([f"10.0.0.{i}:8000" for i in range(4)])
    assert scraper.effective_interval_s == 0.05  # a small pool keeps the configured interval
    scraper.set_targets([f"10.0.{i // 250}.{i % 250}:8000" for i in range(64)])
    assert scraper.effective_interval_s == pytest.approx(0.32)  # 64 engines, 200 scrapes/s
    assert registry.get_sample_value("llmd_engine_scrape_interval_seconds") == pytest.approx(0.32)
    unbounded = EnginePoolScraper(interval_s=0.05)
    unbounded.set_targets([f"10.0.0.{i}:8000" for i in range(64)])
    assert unbounded.effective_interval_s == 0.05


# --- name-filtered scrapes ---------------------------------------------------------------------

WANTED = frozenset({"vllm:num_requests_waiting", "vllm:num_requests_running"})


def vllm_like_app(mode: str, paths: list[str]) -> FastAPI:
    """An engine serving a real prometheus_client registry. `vllm`: as vLLM mounts it (a plain
    /metrics route that ignores the query, and prometheus_client's ASGI app on /metrics/...);
    `plain`: /metrics only (/metrics/ is 404); `ignores`: /metrics/ serves the whole page."""
    from prometheus_client import Gauge, Histogram, generate_latest, make_asgi_app
    from starlette.requests import Request
    from starlette.routing import Mount

    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "w", registry=registry).set(3)
    Gauge("vllm:num_requests_running", "r", registry=registry).set(5)
    Histogram("vllm:e2e_request_latency_seconds", "e2e", registry=registry).observe(0.2)
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Any:
        paths.append(request.url.path + ("?" + request.url.query if request.url.query else ""))
        return await call_next(request)

    @app.get("/metrics")
    async def whole() -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    if mode == "vllm":
        mount = Mount("/metrics", make_asgi_app(registry=registry))
        mount.path_regex = re.compile("^/metrics(?P<path>.*)$")
        app.routes.append(mount)
    elif mode == "ignores":
        app.add_api_route("/metrics/", whole, methods=["GET"])
    return app


async def _filtered(mode: str, port: int) -> tuple[list[str], CollectorRegistry, EngineSnapshot]:
    paths: list[str] = []
    server = http_server(vllm_like_app(mode, paths), "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    rec, registry = Recorder(), CollectorRegistry()
    scraper = EnginePoolScraper(
        interval_s=0.02, models_interval_s=0, registry=registry, listener=rec
    )
    scraper.wanted_names = lambda key: WANTED
    key = f"127.0.0.1:{port}"
    scraper.set_targets([key])
    await scraper.start()
    try:
        for _ in range(200):
            if len(paths) >= 6:
                break
            await asyncio.sleep(0.02)
    finally:
        await scraper.stop()
        server.should_exit = True
        await task
    return paths, registry, rec.snapshots[key]


@pytest.mark.integration
def test_an_engine_that_honours_the_name_filter_is_asked_for_the_wanted_metrics_only() -> None:
    from llmd.vllm_cpu.server import free_port

    paths, registry, snap = asyncio.run(_filtered("vllm", free_port()))
    filtered = filtered_path("/metrics", WANTED)
    assert filtered.startswith("/metrics/?name%5B%5D=vllm%3Anum_requests_running&")
    # one check (the whole page, then the filtered one), then filtered scrapes only
    assert paths[:2] == ["/metrics", filtered]
    assert set(paths[2:]) == {filtered}
    assert (snap.waiting, snap.running) == (3, 5)
    assert registry.get_sample_value("llmd_engine_scrape_filtered_targets") == 1
    assert (
        registry.get_sample_value("llmd_engine_scrape_filter_checks_total", {"outcome": "filtered"})
        == 1
    )


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["plain", "ignores"])
def test_an_engine_without_the_name_filter_is_scraped_whole(mode: str) -> None:
    from llmd.vllm_cpu.server import free_port

    paths, registry, snap = asyncio.run(_filtered(mode, free_port()))
    assert paths[:2] == ["/metrics", filtered_path("/metrics", WANTED)]
    assert set(paths[2:]) == {"/metrics"}  # checked once, then whole pages
    assert (snap.waiting, snap.running) == (3, 5)
    assert registry.get_sample_value("llmd_engine_scrape_filtered_targets") == 0
    assert (
        registry.get_sample_value(
            "llmd_engine_scrape_filter_checks_total", {"outcome": "whole_page"}
        )
        == 1
    )
