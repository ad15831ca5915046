"""In-flight eviction (`flowControl.enableEviction`) on real processes (Envoy, llmd-scheduler,
llmd-sim), on the lean and the full (llm-d) gateway paths: sheddable requests running on a
saturated pool are revoked for a critical request that waits; the revoked clients get 429 with
`x-llm-d-request-dropped-reason: evicted`, the engines abort their work, the critical request is
served, and the revocations are confirmed with nothing left in flight."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: sheddable-eviction-filter
- type: priority-then-time-eviction-order-policy
flowControl:
  defaultRequestTTL: 60s
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""
OBJECTIVES = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
"""


@pytest.fixture(scope="module", params=["lean", "full"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SimFleetProcess, Gateway]]:
    work = tmp_path_factory.mktemp(f"evict-{request.param}")
    fleet = SimFleetProcess.start(
        count=2, block_size=16, profile="h100-8b", work=work, extra_args=["--max-num-seqs", "1"]
    )
    (work / "epp.yaml").write_text(CONFIG)
    (work / "objectives.yaml").write_text(OBJECTIVES)
    try:
        gateway = Gateway.start(
            fleet.endpoints_file,
            work / "gateway",
            config_file=work / "epp.yaml",
            scheduler_args=["--inference-objectives-file", str(work / "objectives.yaml")],
            envoy_overrides={"response_path": request.param},
        )
    except Exception:
        fleet.stop()
        raise
    yield fleet, gateway
    gateway.stop()
    fleet.stop()


async def _aborted(fleet: SimFleetProcess) -> float:
    """Requests the engines finished as aborted."""
    total = 0.0
    for e in fleet.engines:
        async with httpx.AsyncClient(timeout=5) as client:
            page = (await client.get(e.url + "/metrics")).text
        m = re.search(
            r'vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)', page
        )
        total += float(m.group(1)) if m else 0.0
    return total


async def test_sheddable_work_is_revoked_for_a_waiting_critical_request(
    stack: tuple[SimFleetProcess, Gateway],
) -> None:
    fleet, gateway = stack
    aborted_before = await _aborted(fleet)

    def body(tokens: int) -> dict[str, Any]:
        return {"model": "tiny", "prompt": f"{uuid.uuid4()} evict", "max_tokens": tokens}

    async with httpx.AsyncClient(timeout=120) as client:

        async def send(objective: str, tokens: int) -> httpx.Response:
            return await client.post(
                gateway.url + "/v1/completions",
                json=body(tokens),
                headers={"x-llm-d-inference-objective": objective},
            )

        # two long sheddable requests fill both engines (one sequence each): saturated
        batch = [asyncio.create_task(send("batch", 2000)) for _ in range(2)]
        flow: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            flow = gateway.scheduler.get_json("/debug/plugins/state")["flow_control"]
            if flow["eviction"]["tracked"] == 2:
                break
            await asyncio.sleep(0.05)
        assert flow["eviction"]["tracked"] == 2, flow
        critical = await send("critical", 8)
        batch_replies = await asyncio.gather(*batch)

    assert critical.status_code == 200, critical.text
    for r in batch_replies:
        assert r.status_code == 429, r.text
        assert r.headers["x-llm-d-request-dropped-reason"] == "evicted"
        assert r.json()["error"]["message"] == "request evicted by flow control"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flow = gateway.scheduler.get_json("/debug/plugins/state")["flow_control"]
        if flow["eviction"]["pending"] == 0 and flow["eviction"]["tracked"] == 0:
            break
        await asyncio.sleep(0.05)
    assert flow["eviction"]["revocations"] >= 2, flow
    assert flow["eviction"]["pending"] == 0, flow
    assert flow["eviction"]["tracked"] == 0, flow
    assert flow["queued"] == 0, flow
    # the engines stopped the revoked work (the gateway reset their connections)
    deadline = time.monotonic() + 10
    while (await _aborted(fleet)) < aborted_before + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await _aborted(fleet)) >= aborted_before + 2
    async with httpx.AsyncClient(timeout=5) as client:
        metrics = (await client.get(gateway.scheduler.url + "/metrics")).text
    assert re.search(
        r'llm_d_epp_flow_control_revocations_total\{inference_pool="[^"]*",outcome="confirmed"\} '
        r"([2-9]|\d\d)",
        metrics,
    ), [line for line in metrics.splitlines() if "revocation" in line]
    state = gateway.scheduler.get_json("/debug/plugins/state")
    assert all(e["inflight_requests"] == 0 for e in state["endpoints"]), state["endpoints"]


async def test_a_revoked_stream_that_has_started_is_cut(
    stack: tuple[SimFleetProcess, Gateway],
) -> None:
    """Once a response has started, a revocation cannot change its status: Envoy resets the
    stream (llm-d's behaviour). The client sees the stream end without `[DONE]`."""
    fleet, gateway = stack
    aborted_before = await _aborted(fleet)
    cut: list[bool] = []

    async with httpx.AsyncClient(timeout=120) as client:

        async def stream_batch(started: asyncio.Event) -> None:
            payload = {
                "model": "tiny",
                "prompt": f"{uuid.uuid4()} evict",
                "max_tokens": 2000,
                "stream": True,
            }
            text = ""
            try:
                async with client.stream(
                    "POST",
                    gateway.url + "/v1/completions",
                    json=payload,
                    headers={"x-llm-d-inference-objective": "batch"},
                ) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_text():
                        text += chunk
                        started.set()
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass
            cut.append("[DONE]" not in text)

        events = [asyncio.Event(), asyncio.Event()]
        batch = [asyncio.create_task(stream_batch(e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
        critical = await client.post(
            gateway.url + "/v1/completions",
            json={"model": "tiny", "prompt": "urgent", "max_tokens": 8},
            headers={"x-llm-d-inference-objective": "critical"},
        )
        await asyncio.gather(*batch)
    assert critical.status_code == 200, critical.text
    assert cut == [True, True]
    deadline = time.monotonic() + 10
    while (await _aborted(fleet)) < aborted_before + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await _aborted(fleet)) >= aborted_before + 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = gateway.scheduler.get_json("/debug/plugins/state")
        if not any(e["inflight_requests"] for e in state["endpoints"]):
            break
        await asyncio.sleep(0.05)
    assert state["flow_control"]["eviction"]["tracked"] == 0, state["flow_control"]
    assert all(e["inflight_requests"] == 0 for e in state["endpoints"]), state["endpoints"]
