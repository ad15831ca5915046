"""Data-parallel ranks end to end on real processes: Envoy -> llmd-scheduler
(`data-parallel-profile-handler`) -> llmd-sidecar rank 0 (`--data-parallel-size 2`) -> the
picked rank's engine. Two simulated engines on consecutive ports stand for a vLLM pod's two
data-parallel ranks; the pool lists both ranks, the gateway reaches the pod on rank 0's port
only, and `x-data-parallel-host-port` carries the scheduler's pick to the sidecar."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess, free_run
from llmd.sidecar.app import SidecarApp, SidecarConfig

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters: {{primaryPort: {port}}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: queue-scorer}}, {{pluginRef: max-score-picker}}]
"""


async def _counter(url: str, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{url}/metrics")).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))


async def _released(url: str, names: list[str]) -> bool:
    """Whether every named endpoint's in-flight gauge is back to 0 (within a few seconds: the
    gateway ends a stream just after the client has read its answer)."""
    for _ in range(50):
        async with httpx.AsyncClient() as c:
            text = (await c.get(f"{url}/metrics")).text
        zero = [
            f'llm_d_epp_inflight_requests{{endpoint_name="{n}",namespace="",'
            f'producer_name="inflight-load-producer"}} 0.0' in text
            for n in names
        ]
        if all(zero):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_the_scheduler_picks_a_rank_and_the_sidecar_serves_it_there(tmp_path: Path) -> None:
    fleet = await asyncio.to_thread(
        SimFleetProcess.start, count=2, block_size=16, profile="h100-8b", work=tmp_path
    )
    engines = [e.url for e in fleet.engines]
    port = free_run(2)
    sidecar = SidecarApp(
        SidecarConfig(
            host="127.0.0.1",
            port=port,
            model_server_port=int(engines[0].rsplit(":", 1)[1]),
            metrics_port=0,
            data_parallel_size=2,
        )
    )
    await sidecar.start()
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"name": f"pod-0-rank-{r}", "address": "127.0.0.1", "port": str(port + r)}
        for r in range(2)
    ]}))  # fmt: skip
    config = tmp_path / "dp.yaml"
    config.write_text(CONFIG.format(port=port))
    gateway = await asyncio.to_thread(Gateway.start, endpoints, tmp_path / "gw", config_file=config)
    n = 12
    try:
        before = [await _counter(e, "vllm:request_success_total") for e in engines]
        body = {"model": "tiny", "prompt": "count to twenty " * 8, "max_tokens": 24}
        async with httpx.AsyncClient(timeout=60) as c:
            answers = await asyncio.gather(
                *(c.post(f"{gateway.url}/v1/completions", json=body) for _ in range(n))
            )
            # a client's own rank header never reaches the sidecar: the gateway strips it
            forged = await c.post(
                f"{gateway.url}/v1/completions", json=body,
                headers={"x-data-parallel-host-port": f"127.0.0.1:{port + 7}"},
            )  # fmt: skip
            sched = (await c.get(gateway.scheduler.url + "/metrics")).text
        assert [a.status_code for a in answers] == [200] * n, answers[0].text
        assert forged.status_code == 200, forged.text
        served = [await _counter(e, "vllm:request_success_total") - b
                  for e, b in zip(engines, before, strict=True)]  # fmt: skip
        sent = [
            sidecar.registry.get_sample_value(
                "llmd_sidecar_data_parallel_requests_total", {"rank": str(r)}
            )
            or 0.0
            for r in range(2)
        ]
        # every request came in on rank 0's port, and each rank's engine served exactly the
        # requests the scheduler sent it: concurrent picks spread over both ranks
        assert sum(served) == n + 1
        assert sent == served
        assert min(served) > 0
        assert "llmd_served_endpoint_mismatch_total 0.0" in sched
        # the accounting was on the ranks, and it was all given back
        assert await _released(gateway.scheduler.url, ["pod-0-rank-0", "pod-0-rank-1"])
    finally:
        await asyncio.to_thread(gateway.stop)
        await sidecar.stop()
        fleet.stop()
