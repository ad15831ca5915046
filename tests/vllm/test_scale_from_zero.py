"""Scale from zero with a real vLLM CPU engine: a request arrives at a pool with no replicas,
the activator holds it, the local process pool starts a vLLM server, and the request is
streamed from it once it answers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.dev.cluster import LocalCluster, VllmLauncher
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.vllm


async def test_request_at_zero_is_served_by_a_fresh_vllm(
    vllm_env: VllmEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    events: list[tuple[float, str]] = []
    cluster = LocalCluster(
        {"vllm": VllmLauncher(vllm_env, tiny_model_dir)},
        tmp_path / "endpoints.yaml",
        tmp_path,
        on_change=lambda line: events.append((time.monotonic(), line)),
    )
    port = free_port()
    cfg = ActivatorConfig(
        pool="vllm", host="127.0.0.1", http_port=port, hold_timeout=400.0, poll_interval=0.05
    )
    app = ActivatorApp(cfg, cluster)
    await app.start()
    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        assert (await cluster.status("vllm")).desired == 0
        async with httpx.AsyncClient(timeout=420) as c:
            t0 = time.monotonic()
            first: float | None = None
            lines: list[str] = []
            async with c.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        first = first or time.monotonic()
                        lines.append(line)
        assert lines[-1] == "data: [DONE]"
        assert '"completion_tokens":8' in lines[-2].replace(" ", "")
        # the activator probes the engine itself, so it may forward (and finish) before the
        # pool's own 0.2 s health poll marks the replica ready: wait for that poll here
        await cluster.wait_ready("vllm", 30)
        ready_at = next(t for t, line in events if "ready at" in line)
        assert first is not None
        print(
            f"\nscale from zero on real vLLM: engine ready (cluster poll) {ready_at - t0:.2f}s "
            f"after the request; first token {first - t0:.2f}s after it "
            f"({(first - ready_at) * 1000:+.0f} ms from the pool's ready poll)"
        )
        reg = app.registry
        assert (
            reg.get_sample_value(
                "llmd_activator_requests_total", {"pool": "vllm", "outcome": "activated"}
            )
            == 1
        )
        assert (
            reg.get_sample_value(
                "llmd_activator_scale_requests_total", {"pool": "vllm", "direction": "up"}
            )
            == 1
        )
        assert (await cluster.status("vllm")).ready == 1
    finally:
        await app.stop()
        await cluster.close()
