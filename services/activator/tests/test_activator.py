"""The activator on real engine processes (simulated vLLM) of the local process pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration


async def start(cluster: LocalCluster, **settings: object) -> tuple[ActivatorApp, str]:
    port = free_port()
    cfg = ActivatorConfig.model_validate(
        {"pool": "sim", "host": "127.0.0.1", "http_port": port, **settings}
    )
    app = ActivatorApp(cfg, cluster)
    await app.start()
    await asyncio.wait_for(app.activator.synced.wait(), 10)
    return app, f"http://127.0.0.1:{port}"


@pytest.fixture
async def slow_pool(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """A pool whose engines take 30 s to start."""
    launcher = SimLauncher(extra_args=("--startup-delay", "30"))
    cluster = LocalCluster({"sim": launcher}, tmp_path / "endpoints.yaml", tmp_path)
    yield cluster
    await cluster.close()


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster({"sim": SimLauncher()}, tmp_path / "endpoints.yaml", tmp_path)
    await cluster.scale("sim", 1)
    await cluster.wait_ready("sim", 60)
    yield cluster
    await cluster.close()


def metric(app: ActivatorApp, name: str, **labels: str) -> float:
    return app.registry.get_sample_value(name, {"pool": "sim", **labels}) or 0.0


async def test_full_queue_and_deadline_answer_503_with_retry_after(
    slow_pool: LocalCluster,
) -> None:
    app, url = await start(slow_pool, max_queued=2, hold_timeout="1s", retry_after=7)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            held = [
                asyncio.create_task(c.post(url + "/v1/completions", json=body)) for _ in range(2)
            ]
            while app.activator.held < 2:
                await asyncio.sleep(0.01)
            full = await c.post(url + "/v1/completions", json=body)
            assert full.status_code == 503
            assert full.headers["retry-after"] == "7"
            assert "queue is full" in full.json()["error"]["message"]
            t0 = time.monotonic()
            late = await asyncio.gather(*held)
            assert time.monotonic() - t0 < 5
            for r in late:
                assert r.status_code == 503
                assert r.headers["retry-after"] == "7"
                assert "no ready engine after 1s" in r.json()["error"]["message"]
            big = await c.post(url + "/v1/completions", content=b"x" * (33 << 20))
            assert big.status_code == 413
        assert (await slow_pool.status("sim")).desired == 1  # asked once, for one
        assert metric(app, "llmd_activator_scale_requests_total", direction="up") == 1
        assert metric(app, "llmd_activator_requests_total", outcome="rejected") == 1
        assert metric(app, "llmd_activator_requests_total", outcome="timeout") == 2
        assert metric(app, "llmd_activator_queue_size") == 0
    finally:
        await app.stop()


async def test_scale_to_zero_waits_for_streams_in_flight(pool: LocalCluster) -> None:
    app, url = await start(pool, scale_to_zero=True, scale_down_delay="500ms")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 300, "stream": True}
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            t0 = time.monotonic()
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                chunks = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            streamed = time.monotonic() - t0
            assert chunks[-1] == "data: [DONE]"
            assert streamed > 1.0  # the stream outlived the scale-down delay twice over
            assert (await pool.status("sim")).desired == 1  # not cut while in flight
            deadline = time.monotonic() + 10
            while (await pool.status("sim")).desired and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert (await pool.status("sim")).desired == 0  # idle: to zero
        assert metric(app, "llmd_activator_scale_requests_total", direction="down") == 1
        assert metric(app, "llmd_activator_requests_total", outcome="forwarded") == 1
        assert metric(app, "llmd_activator_inflight_requests") == 0
    finally:
        await app.stop()


async def test_a_client_that_leaves_gives_up_its_place(slow_pool: LocalCluster) -> None:
    app, url = await start(slow_pool, hold_timeout="60s")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            gone = asyncio.create_task(c.post(url + "/v1/completions", json=body))
            stays = asyncio.create_task(c.post(url + "/v1/completions", json=body))
            while app.activator.held < 2:
                await asyncio.sleep(0.01)
            gone.cancel()  # the client closes its connection
            for _ in range(100):
                if app.activator.held == 1:
                    break
                await asyncio.sleep(0.05)
            assert app.activator.held == 1
            assert metric(app, "llmd_activator_requests_total", outcome="abandoned") == 1
            assert metric(app, "llmd_activator_queue_size") == 1
            stays.cancel()
    finally:
        await app.stop()
