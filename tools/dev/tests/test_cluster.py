"""The local Cluster: real llmd-sim processes scaled up, down and to zero, with discovery kept
in step (the file the scheduler watches) and draining before a replica stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.runtime.cluster import Cluster, ClusterError
from llmd.runtime.discovery import StaticFileDiscovery

pytestmark = pytest.mark.integration


async def _scale_up_down_and_to_zero(tmp_path: Path) -> None:
    lines: list[str] = []
    cluster = LocalCluster(
        {"sim": SimLauncher()},
        tmp_path / "endpoints.yaml",
        tmp_path,
        drain_timeout_s=5,
        on_change=lines.append,
    )
    assert isinstance(cluster, Cluster)
    discovery = StaticFileDiscovery(cluster.discovery_file)
    try:
        assert discovery.load() == ()
        await cluster.scale("sim", 2)
        st = await cluster.wait_ready("sim", 60)
        assert (st.desired, st.ready) == (2, 2)
        found = discovery.load()
        assert sorted(e.name for e in found) == ["sim-0", "sim-1"]
        async with httpx.AsyncClient() as client:
            for e in found:
                assert (await client.get(f"http://{e.host_port}/health")).status_code == 200
        urls = [f"http://{e.host_port}" for e in found]

        await cluster.scale("sim", 0)
        st = await cluster.wait_ready("sim", 60)
        assert (st.desired, st.ready) == (0, 0)
        assert discovery.load() == ()
        async with httpx.AsyncClient() as client:
            for url in urls:  # the processes are gone, not just unlisted
                with pytest.raises(httpx.ConnectError):
                    await client.get(url + "/health", timeout=2)
        assert any(line == "sim-1 draining" for line in lines)

        await cluster.scale("sim", 1)
        await cluster.wait_ready("sim", 60)
        assert [e.name for e in discovery.load()] == ["sim-2"]
        with pytest.raises(ClusterError, match="unknown pool"):
            await cluster.scale("gpu", 1)
        with pytest.raises(ClusterError, match="between 0 and"):
            await cluster.scale("sim", -1)
    finally:
        await cluster.close()
    assert discovery.load() == ()


def test_pool_scales_up_down_and_to_zero_with_real_processes(tmp_path: Path) -> None:
    asyncio.run(_scale_up_down_and_to_zero(tmp_path))


async def test_closing_during_a_drain_stops_the_draining_replica(tmp_path: Path) -> None:
    """A replica being drained is out of the pool's list; closing the cluster then (a test that
    scales to zero and tears down at once) must still stop its process."""
    lines: list[str] = []
    cluster = LocalCluster(
        {"sim": SimLauncher()}, tmp_path / "endpoints.yaml", tmp_path, on_change=lines.append
    )
    try:
        await cluster.scale("sim", 1)
        await cluster.wait_ready("sim", 60)
        (url,) = [
            f"http://{e.host_port}" for e in StaticFileDiscovery(cluster.discovery_file).load()
        ]
        await cluster.scale("sim", 0)
        for _ in range(50):
            if "sim-0 draining" in lines:
                break
            await asyncio.sleep(0.05)
        assert "sim-0 draining" in lines
    finally:
        await cluster.close()  # the drain waits 2 s for discovery readers: it is still running
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/health", timeout=2)
