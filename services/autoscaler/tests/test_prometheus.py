"""The autoscaler reading engine load from a real Prometheus (Debian's package, installed when
missing) instead of the engines: the same figures as a direct scrape, the same decision under
load, and a Prometheus that goes away leaves every replica unknown (the pool is held, never
scaled blind) with the failure counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmd.autoscaler.controller import Autoscaler
from llmd.autoscaler.prometheus import PrometheusSource
from llmd.autoscaler.variants import parse_variant
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.dev.prometheus import PrometheusProcess
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

VARIANT = {
    "apiVersion": "llmd.ai/v1alpha1",
    "kind": "VariantAutoscaling",
    "metadata": {"name": "sim", "namespace": "local"},
    "spec": {"scaleTargetRef": {"name": "sim"}, "modelID": "tiny", "minReplicas": 1,
             "maxReplicas": 4},
}  # fmt: skip


@dataclass
class Env:
    cluster: LocalCluster
    prometheus: PrometheusProcess
    urls: list[str]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    launcher = SimLauncher(profile="h100-8b", extra_args=("--max-num-seqs", "2"))
    cluster = LocalCluster({"sim": launcher}, tmp_path / "endpoints.yaml", tmp_path)
    await cluster.scale("sim", 2)
    await cluster.wait_ready("sim", 60)
    endpoints = [e.host_port for e in await cluster.endpoints("sim")]
    prom = PrometheusProcess(endpoints, free_port(), tmp_path / "prometheus", interval_s=0.5)
    await asyncio.to_thread(prom.start)
    try:
        for _ in range(100):
            if await asyncio.to_thread(prom.targets_up) == 2:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(prom.targets_up) == 2
        yield Env(cluster, prom, [f"http://{e}" for e in endpoints])
    finally:
        prom.stop()
        await cluster.close()


async def test_prometheus_reports_what_the_engines_report(env: Env) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        for url in env.urls:  # a few completed requests on each engine
            for _ in range(3):
                body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
                assert (await c.post(f"{url}/v1/completions", json=body)).status_code == 200
        await asyncio.sleep(1.5)  # three of Prometheus's scrapes
        direct = {
            url.removeprefix("http://"): parse_engine_snapshot((await c.get(f"{url}/metrics")).text)
            for url in env.urls
        }
    source = PrometheusSource(env.prometheus.url)
    try:
        readings = await source.read()
    finally:
        await source.close()
    assert set(readings) == set(direct)
    for instance, snap in direct.items():
        r = readings[instance]
        assert (r.kv_usage, r.waiting, r.running) == (
            snap.kv_cache_usage,
            snap.waiting,
            snap.running,
        )
        assert r.kv_capacity_tokens == (snap.num_gpu_blocks or 0) * (snap.block_size or 0) > 0
        assert r.completed == 3


async def test_the_same_decision_from_prometheus_as_from_the_engines(env: Env) -> None:
    variant = parse_variant(VARIANT, "sim")
    direct = Autoscaler([variant], env.cluster, interval_s=0.5, actuation="metric")
    via_prom = Autoscaler(
        [variant],
        env.cluster,
        interval_s=0.5,
        actuation="metric",
        prometheus=PrometheusSource(env.prometheus.url),
    )
    body = {"model": "tiny", "prompt": "hello " * 50, "max_tokens": 400}

    async def one(url: str) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await c.post(f"{url}/v1/completions", json=body)

    # 2 running + 10 waiting on each engine (max 2 running): far over the queue threshold (5)
    load = [asyncio.create_task(one(u)) for u in env.urls for _ in range(12)]
    try:
        # wait until Prometheus has scraped the queues (requests start as their clients
        # connect; on a loaded machine that can take a while)
        probe = PrometheusSource(env.prometheus.url)
        try:
            for _ in range(100):
                readings = await probe.read()
                if len(readings) == 2 and all((r.waiting or 0) >= 5 for r in readings.values()):
                    break
                await asyncio.sleep(0.2)
        finally:
            await probe.close()
        (d_direct,) = await direct.step()
        (d_prom,) = await via_prom.step()
        assert d_direct.analysis.reason.startswith("scale up"), d_direct.analysis
        assert d_prom.analysis.reason.startswith("scale up"), d_prom.analysis
        assert d_prom.recommended == d_direct.recommended > 2
        env.prometheus.stop()  # Prometheus goes away: nothing is known, nothing is decided
        (held,) = await via_prom.step()
        assert held.analysis.observed == 0
        assert held.recommended == held.current == 2, held.analysis
        errors = via_prom.metrics.errors.labels("prometheus")._value.get()
        assert errors >= 1
    finally:
        for t in load:
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await direct.stop()
        await via_prom.stop()
