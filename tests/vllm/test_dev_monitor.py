"""llmd-dev's live monitor shows a real vLLM server's KV events and load."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llmd.dev.monitor import EngineAddress, monitor
from llmd.vllm_cpu.server import VllmServer

pytestmark = pytest.mark.vllm


async def test_monitor_prints_stored_blocks_and_load(vllm_server: VllmServer) -> None:
    lines: list[str] = []
    stop = asyncio.Event()
    engine = EngineAddress(vllm_server.spec.pod, vllm_server.url, vllm_server.kv_events_endpoint)
    task = asyncio.create_task(monitor([engine], stop, lines.append, load_interval_s=0.2))
    await asyncio.sleep(1.5)  # let the subscription reach the publisher
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"{vllm_server.url}/v1/completions",
            json={
                "model": "tiny",
                "prompt": "monitor check " + "the answer " * 40,
                "max_tokens": 2,
            },
        )
        r.raise_for_status()
    for _ in range(50):
        if any("stored" in line for line in lines):
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 10)
    pod = vllm_server.spec.pod
    assert any(
        line.startswith(f"[{pod}] seq=") and "block(s) of 32 tokens on GPU" in line
        for line in lines
    )
    assert any(line.startswith(f"[{pod}] load: running=") for line in lines)
