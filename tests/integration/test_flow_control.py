"""Flow control on real processes (Envoy, llmd-scheduler, llmd-sim): priorities jump the queue,
clients that leave the queue leak nothing, a metrics outage does not stop dispatch, and an
empty pool answers 503 after the no-endpoint TTL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
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
- type: utilization-detector
  parameters: {queueDepthThreshold: 1}
flowControl:
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 2s
  saturationDetector: {pluginRef: utilization-detector}
  priorityBands:
  - {priority: -1, fairnessPolicyRef: round-robin-fairness-policy}
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


class Stack:
    def __init__(self, fleet: SimFleetProcess, gateway: Gateway, endpoints: Path) -> None:
        self.fleet, self.gateway, self.endpoints = fleet, gateway, endpoints

    @property
    def url(self) -> str:
        return self.gateway.url

    def flow(self) -> dict[str, Any]:
        state: dict[str, Any] = self.gateway.scheduler.get_json("/debug/plugins/state")
        return state["flow_control"]  # type: ignore[no-any-return]

    def faults(self, **faults: Any) -> None:
        for e in self.fleet.engines:
            httpx.post(e.url + "/sim/faults", json=faults, timeout=5).raise_for_status()


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("flow")
    fleet = SimFleetProcess.start(
        count=2, block_size=16, profile="h100-8b", work=work, extra_args=["--max-num-seqs", "1"]
    )
    config = work / "epp.yaml"
    config.write_text(CONFIG)
    objectives = work / "objectives.yaml"
    objectives.write_text(OBJECTIVES)
    try:
        gateway = Gateway.start(
            fleet.endpoints_file,
            work / "gateway",
            config_file=config,
            scheduler_args=["--inference-objectives-file", str(objectives)],
            scheduler_api=request.param,
        )
    except Exception:
        fleet.stop()
        raise
    yield Stack(fleet, gateway, fleet.endpoints_file)
    gateway.stop()
    fleet.stop()


def body(tokens: int) -> dict[str, Any]:
    return {"model": "tiny", "prompt": f"{uuid.uuid4()} flow", "max_tokens": tokens}


async def test_a_critical_request_overtakes_queued_batch_work(stack: Stack) -> None:
    done: dict[str, list[float]] = {"critical": [], "batch": []}
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(objective: str) -> int:
            r = await client.post(
                stack.url + "/v1/completions",
                json=body(60),
                headers={"x-llm-d-inference-objective": objective},
            )
            done[objective].append(time.monotonic() - t0)
            return r.status_code

        batch = [asyncio.create_task(one("batch")) for _ in range(12)]
        await asyncio.sleep(0.5)
        queued = stack.flow()["bands"]["-1"]["requests"]
        assert queued >= 4, stack.flow()  # the pool saturated and batch work queued
        critical = [asyncio.create_task(one("critical")) for _ in range(3)]
        codes = await asyncio.gather(*batch, *critical)
    assert all(c == 200 for c in codes), codes
    assert max(done["critical"]) < max(done["batch"]), done
    outcomes = stack.flow()["outcomes"]
    assert outcomes["Dispatched"] >= 15
    assert stack.flow()["queued"] == 0


async def test_clients_leaving_the_queue_leak_nothing(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        before = stack.flow()["outcomes"]["EvictedContextCancelled"]
        flood = [
            asyncio.create_task(client.post(stack.url + "/v1/completions", json=body(80)))
            for _ in range(6)
        ]
        await asyncio.sleep(0.4)

        async def impatient() -> None:
            with pytest.raises(httpx.TimeoutException):
                await client.post(stack.url + "/v1/completions", json=body(4), timeout=0.3)

        await asyncio.gather(*(impatient() for _ in range(4)))
        results = await asyncio.gather(*flood)
    assert all(r.status_code == 200 for r in results)
    deadline = time.monotonic() + 5
    while stack.flow()["queued"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    state = stack.flow()
    assert state["queued"] == 0, state
    assert state["queued_bytes"] == 0, state
    assert state["outcomes"]["EvictedContextCancelled"] > before, state


def test_a_metrics_outage_does_not_stop_dispatch(stack: Stack) -> None:
    stack.faults(metrics_error_rate=1.0)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            eps = stack.gateway.scheduler.get_json("/debug/plugins/state")["endpoints"]
            if all((e["metrics_age_s"] or 0) > 2 for e in eps):
                break
            time.sleep(0.2)
        for _ in range(6):
            r = httpx.post(stack.url + "/v1/completions", json=body(4), timeout=30)
            assert r.status_code == 200, r.text
        assert stack.flow()["stale_endpoints"] == 2
        metrics = httpx.get(stack.gateway.scheduler.url + "/metrics").text
        assert 'llm_d_epp_flow_control_stale_endpoints{detector="utilization-detector"} 2.0' in (
            metrics
        )
    finally:
        stack.faults(metrics_error_rate=0.0)


def test_an_empty_pool_answers_503_after_the_no_endpoint_ttl(stack: Stack) -> None:
    saved = stack.endpoints.read_text()
    stack.endpoints.write_text("endpoints: []\n")
    try:
        deadline = time.monotonic() + 10
        while stack.gateway.scheduler.get_json("/debug/plugins/state")["endpoints"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        t = time.monotonic()
        r = httpx.post(stack.url + "/v1/completions", json=body(4), timeout=30)
        waited = time.monotonic() - t
        assert r.status_code == 503, r.text
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert waited >= 1.5  # it waited for an endpoint to appear (scale from zero)
    finally:
        stack.endpoints.write_text(saved)
    deadline = time.monotonic() + 10
    while len(stack.gateway.scheduler.get_json("/debug/plugins/state")["endpoints"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
