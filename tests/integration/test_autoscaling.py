"""Autoscaling end to end on the local process pool: llmd-autoscaler and llmd-activator as
processes, driving real engine processes (simulated vLLM with a start-up delay) through the
local stack's control API.

A request at zero is held and served once an engine is up; a load ramp scales the pool up
(new engines start and join discovery); when the load stops the pool drains down and, idle,
goes to zero; a request at zero is served again. Nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.dev.cli import control_app
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.dev.gateway import Gateway
from llmd.runtime.lifecycle import serve_http
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

VARIANT = {
    "apiVersion": "llmd.ai/v1alpha1",
    "kind": "VariantAutoscaling",
    "metadata": {"name": "sim", "namespace": "local",
                 "labels": {"inference.optimization/acceleratorName": "sim"}},
    "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "sim"}, "modelID": "tiny",
             "variantCost": "10", "minReplicas": 0, "maxReplicas": 3},
}  # fmt: skip


@dataclass
class Local:
    cluster: LocalCluster
    activator: str
    autoscaler: str
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        for _ in range(300):
            assert proc.poll() is None, _tail(log)
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url + "/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready: {_tail(log)}")


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    launcher = SimLauncher(
        profile="h100-8b", extra_args=("--startup-delay", "1", "--max-num-seqs", "2")
    )
    cluster = LocalCluster({"sim": launcher}, tmp_path / "endpoints.yaml", tmp_path,
                           drain_timeout_s=20)  # fmt: skip
    control_port, act_port, scaler_port = free_port(), free_port(), free_port()
    server, task = serve_http(control_app(cluster), "127.0.0.1", control_port)
    control = f"http://127.0.0.1:{control_port}"
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump(VARIANT))
    act_log, scaler_log = tmp_path / "activator.log", tmp_path / "autoscaler.log"
    activator = _start(
        [sys.executable, "-m", "llmd.activator.cli", "--pool", "sim", "--control-url", control,
         "--host", "127.0.0.1", "--http-port", str(act_port), "--hold-timeout", "60s"],
        act_log,
    )  # fmt: skip
    autoscaler = _start(
        [sys.executable, "-m", "llmd.autoscaler.cli", "--variants-file", str(variants),
         "--control-url", control, "--host", "127.0.0.1", "--http-port", str(scaler_port),
         "--interval", "500ms", "--scale-to-zero", "--retention-period", "4s",
         "--scale-down-stabilization", "2s",
         "--demand-urls", json.dumps([f"http://127.0.0.1:{act_port}/metrics"])],
        scaler_log,
    )  # fmt: skip
    env = Local(cluster, f"http://127.0.0.1:{act_port}", f"http://127.0.0.1:{scaler_port}",
                tmp_path, [activator, autoscaler])  # fmt: skip
    try:
        await _ready(env.activator, activator, act_log)
        await _ready(env.autoscaler, autoscaler, scaler_log)
        yield env
    finally:
        for p in env.procs:
            p.terminate()
        for p in env.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        server.should_exit = True
        await asyncio.wait([task], timeout=5)
        await cluster.close()


async def _ready_is(cluster: LocalCluster, n: int) -> bool:
    return bool((await cluster.status("sim")).ready == n)


async def _wait_for(what: str, check: object, timeout_s: float, local: Local) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    logs = {p: (local.work / p).read_text()[-2500:] for p in ("autoscaler.log", "activator.log")}
    raise AssertionError(f"{what} not reached in {timeout_s:.0f}s: {logs}")


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_zero_to_load_to_zero_without_losing_a_request(local: Local) -> None:
    cluster = local.cluster
    assert (await cluster.status("sim")).desired == 0
    body = {"model": "tiny", "prompt": "hello " * 40, "max_tokens": 8}
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=90) as c:
        # 1. a request at zero is held, the pool is scaled up, the request is served
        t0 = time.monotonic()
        r = await c.post(local.activator + "/v1/completions", json=body)
        first = time.monotonic() - t0
        statuses.append(r.status_code)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        # the activator forwards as soon as the engine answers; the pool's own readiness
        # (its health poll) may mark it a moment later
        await _wait_for(
            "the pool's replica ready",
            lambda: _ready_is(cluster, 1),
            10,
            local,
        )
        assert first >= 1.0  # it waited for the engine's 1 s start-up

        # 2. a load ramp: 12 concurrent long requests on engines that run 2 at a time
        stop = asyncio.Event()
        long_body = body | {"max_tokens": 120}

        async def user() -> None:
            while not stop.is_set():
                resp = await c.post(local.activator + "/v1/completions", json=long_body)
                statuses.append(resp.status_code)

        users = [asyncio.create_task(user()) for _ in range(12)]

        async def scaled_up() -> bool:
            st = await cluster.status("sim")
            return st.ready >= 2 and len(await cluster.endpoints("sim")) >= 2

        await _wait_for("scale-up to 2+ ready engines", scaled_up, 60, local)
        stop.set()
        await asyncio.gather(*users)

        # 3. the load stops: drain down, then idle for the retention -> zero
        async def at_zero() -> bool:
            st = await cluster.status("sim")
            gone = not await cluster.endpoints("sim") and cluster.settled("sim")
            return st.desired == 0 and gone  # every engine drained and stopped

        await _wait_for("scale-to-zero", at_zero, 90, local)

        # 4. a request at zero again: held, served
        r = await c.post(local.activator + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True,
        })  # fmt: skip
        statuses.append(r.status_code)
        assert r.status_code == 200
        assert r.text.rstrip().endswith("data: [DONE]")

        decisions = (await c.get(local.autoscaler + "/debug/decisions")).json()
        act_metrics = (await c.get(local.activator + "/metrics")).text
        scaler_metrics = (await c.get(local.autoscaler + "/metrics")).text

    assert statuses
    assert all(s == 200 for s in statuses), statuses  # 0 lost
    reasons = [d["analysis"]["reason"] for d in decisions]
    assert any(r.startswith("scale up:") for r in reasons), reasons
    assert any(r.startswith("idle for") for r in reasons), reasons
    assert max(d["desired"] for d in decisions) >= 2
    assert _metric(act_metrics, "llmd_activator_requests_total", outcome="activated") == 2
    assert _metric(act_metrics, "llmd_activator_requests_total", outcome="timeout") == 0
    assert _metric(act_metrics, "llmd_activator_scale_requests_total", direction="up") == 2
    assert _metric(act_metrics, "llmd_activator_queue_size") == 0
    assert _metric(act_metrics, "llmd_activator_inflight_requests") == 0
    assert (
        _metric(scaler_metrics, "wva_replica_scaling_total", direction="down", reason="idle") >= 1
    )
    assert _metric(scaler_metrics, "wva_replica_scaling_total", direction="up") >= 1


async def test_gateway_sends_a_pool_at_zero_to_the_activator(tmp_path: Path) -> None:
    """Envoy -> llmd-scheduler (no endpoint in the pool) -> llmd-activator (holds, scales up)
    -> the new engine; once discovery lists the engine the scheduler routes to it itself."""
    launcher = SimLauncher(profile="h100-8b", extra_args=("--startup-delay", "1"))
    cluster = LocalCluster({"sim": launcher}, tmp_path / "endpoints.yaml", tmp_path)
    act_port = free_port()
    cfg = ActivatorConfig(pool="sim", host="127.0.0.1", http_port=act_port)
    activator = ActivatorApp(cfg, cluster)
    await activator.start()
    gateway = await asyncio.to_thread(
        Gateway.start,
        cluster.discovery_file,
        tmp_path / "gw",
        # by name, as a chart names the activator's Service: the scheduler resolves it
        scheduler_args=["--activator-endpoint", f"localhost:{act_port}"],
    )
    body = {"model": "tiny", "prompt": "hello " * 20, "max_tokens": 4}
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(gateway.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            sched = gateway.scheduler.url + "/metrics"
            assert _metric((await c.get(sched)).text, "llmd_activator_routed_requests_total") == 1
            # the scheduler re-reads discovery every second: then it routes by itself
            for _ in range(100):
                if _metric((await c.get(sched)).text, "llm_d_epp_ready_endpoints") >= 1:
                    break
                await asyncio.sleep(0.1)
            for _ in range(3):
                r = await c.post(gateway.url + "/v1/completions", json=body)
                assert r.status_code == 200
            text = (await c.get(sched)).text
        assert _metric(text, "llmd_activator_routed_requests_total") == 1
        assert _metric(text, "llmd_activator_resolve_failures_total") == 0
        reg = activator.registry
        assert (
            reg.get_sample_value(
                "llmd_activator_requests_total", {"pool": "sim", "outcome": "activated"}
            )
            == 1
        )
        forwarded = reg.get_sample_value(
            "llmd_activator_requests_total", {"pool": "sim", "outcome": "forwarded"}
        )
        assert forwarded is None  # after the first, requests skipped the activator
    finally:
        await asyncio.to_thread(gateway.stop)
        await activator.stop()
        await cluster.close()


LATENCY_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
  parameters: {minSamples: 10}
- type: latency-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: latency-scorer}]
"""


async def test_prefill_capacity_comes_from_the_scheduler_s_latency_model(tmp_path: Path) -> None:
    """Envoy -> llmd-scheduler with the predicted-latency model -> a simulated engine: the
    model learns the engine's prefill speed from the responses, and llmd-autoscaler reads it as
    one replica's prefill capacity and sizes the pool by the prompt tokens the engines compute."""
    from llmd.autoscaler.controller import Autoscaler
    from llmd.autoscaler.variants import parse_variants

    launcher = SimLauncher(profile="h100-8b", extra_args=("--max-model-len", "32768"))
    cluster = LocalCluster({"sim": launcher}, tmp_path / "e.yaml", tmp_path)
    await cluster.scale("sim", 1)
    await cluster.wait_ready("sim", 60)
    config = tmp_path / "epp.yaml"
    config.write_text(LATENCY_CONFIG)
    gateway = await asyncio.to_thread(
        Gateway.start, cluster.discovery_file, tmp_path / "gw", config_file=config
    )
    sched = gateway.scheduler.url + "/metrics"

    async def send(c: httpx.AsyncClient, words: int) -> None:
        body = {"model": "tiny", "prompt": f"{words} " + "lorem " * words, "max_tokens": 2,
                "stream": True}  # fmt: skip
        async with c.stream("POST", gateway.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                pass

    scaler = Autoscaler(
        parse_variants([VARIANT]), cluster, actuation="metric",
        latency_model_urls={"tiny": sched},
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            for k in range(24):  # prompts of 100 to 2,400 words teach the model
                await send(c, 100 * (1 + k % 24))
            for _ in range(100):  # the gateway reports responses on its access log, in batches
                capacity = _metric((await c.get(sched)).text, PREFILL_GAUGE)
                if capacity > 0:
                    break
                await asyncio.sleep(0.1)
            assert capacity > 0, "the latency model learned the engine's prefill speed"
            await scaler.step()  # the engines' counters, first read
            await asyncio.gather(*(send(c, 3000) for _ in range(8)))
            for _ in range(100):  # every response has reached the model: it stops moving
                text = (await c.get(sched)).text
                if _metric(text, "llmd_latency_model_samples", target="ttft") >= 24 + 8:
                    break
                await asyncio.sleep(0.1)
            learned = _metric(text, PREFILL_GAUGE)
            (d,) = await scaler.step()
        a = d.analysis
        assert a.prefill_tps is not None
        assert a.prefill_tps > 0
        seen = scaler.metrics.prefill.labels("tiny", "capacity")._value.get()
        assert seen == pytest.approx(learned, rel=1e-6)
        need = math.ceil(a.prefill_tps / (seen * scaler.settings.prefill_target) - 1e-9)
        assert a.replicas >= need
        if need > 1:
            assert "prefill" in a.reason
    finally:
        await asyncio.to_thread(gateway.stop)
        await cluster.close()


PREFILL_GAUGE = "llmd_latency_model_prefill_tokens_per_second"
