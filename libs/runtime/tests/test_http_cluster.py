"""HttpCluster against the local stack's real control API (no engine started)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmd.dev.cli import control_app
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.runtime.cluster import ClusterError, HttpCluster, PoolStatus
from llmd.runtime.lifecycle import serve_http
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration


async def test_http_cluster_reads_and_refuses_like_the_pool(tmp_path: Path) -> None:
    local = LocalCluster({"sim": SimLauncher()}, tmp_path / "endpoints.yaml", tmp_path)
    port = free_port()
    server, task = serve_http(control_app(local), "127.0.0.1", port)
    cluster = HttpCluster(f"http://127.0.0.1:{port}")
    try:
        for _ in range(50):
            try:
                assert await cluster.pools() == ["sim"]
                break
            except ClusterError:
                await asyncio.sleep(0.05)
        assert await cluster.status("sim") == PoolStatus(desired=0, ready=0)
        assert await cluster.endpoints("sim") == []
        with pytest.raises(ClusterError, match="unknown pool 'decode'"):
            await cluster.status("decode")
        with pytest.raises(ClusterError, match="unknown pool 'decode'"):
            await cluster.scale("decode", 1)
        with pytest.raises(ClusterError, match=">= 0"):
            await cluster.scale("sim", -1)
        with pytest.raises(ClusterError, match="between 0 and 64"):
            await cluster.scale("sim", 65)
    finally:
        await cluster.aclose()
        server.should_exit = True
        await asyncio.wait([task], timeout=5)
        await local.close()
    gone = HttpCluster(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    with pytest.raises(ClusterError, match="cannot read pools"):
        await gone.pools()
    with pytest.raises(ClusterError, match="cannot reach"):
        await gone.scale("sim", 1)
    await gone.aclose()
