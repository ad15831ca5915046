"""Cache-source routing end to end on real processes: three simulated vLLM 0.32 engines with
the NixlConnector as `kv_both`, each behind an llmd-sidecar, Envoy + llmd-scheduler with
`llmd-cache-source-pd-decider`. While the pod holding a hot prefix is busy, the next request
with that prefix goes to an idle pod, and that pod pulls the prefix's KV from the holder (the
holder's prefill leg hits its own cache) instead of computing it again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol import metrics as pm
from llmd.sidecar.app import SidecarApp, SidecarConfig
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16}
- type: prefix-cache-scorer
- type: active-request-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: llmd-cache-source-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: llmd-cache-source-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer}, {pluginRef: active-request-scorer, weight: 2}]
"""


@dataclass
class Stack:
    gateway: Gateway
    engines: list[str]
    """Engine URL per pod name's index (pod-0 .. pod-2)."""
    sidecars: list[SidecarApp]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    transfer = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    fleet = await asyncio.to_thread(
        SimFleetProcess.start, count=3, block_size=16, profile="h100-8b", work=tmp_path,
        extra_args=["--kv-transfer-config", transfer],
    )  # fmt: skip
    sidecars: list[SidecarApp] = []
    entries = []
    for i, engine in enumerate(fleet.engines):
        sidecar = SidecarApp(
            SidecarConfig(
                host="127.0.0.1",
                port=free_port(),
                model_server_port=int(engine.url.rsplit(":", 1)[1]),
                metrics_port=0,
            )
        )
        await sidecar.start()
        sidecars.append(sidecar)
        entries.append({"name": f"pod-{i}", "address": "127.0.0.1",
                        "port": str(sidecar.config.port), "labels": {"llm-d.ai/role": "both"}})  # fmt: skip
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
    config = tmp_path / "epp.yaml"
    config.write_text(CONFIG)
    gateway = await asyncio.to_thread(Gateway.start, endpoints, tmp_path / "gw", config_file=config)
    try:
        yield Stack(gateway, [e.url for e in fleet.engines], sidecars)
    finally:
        await asyncio.to_thread(gateway.stop)
        for sidecar in sidecars:
            await sidecar.stop()
        fleet.stop()


async def by_source(url: str) -> dict[str, float]:
    """An engine's prompt tokens by source (local_compute, local_cache_hit, ...)."""
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{url}/metrics")).text
    out: dict[str, float] = {}
    for sample in pm.parse_samples(text, {pm.PROMPT_TOKENS_BY_SOURCE}):
        source = sample.labels["source"]
        out[source] = out.get(source, 0.0) + sample.value
    return out


async def test_an_idle_pod_pulls_a_busy_holder_s_prefix_instead_of_recomputing_it(
    stack: Stack,
) -> None:
    hot = "a long shared system prompt for every request of this tenant " * 40
    url = f"{stack.gateway.url}/v1/completions"
    async with httpx.AsyncClient(timeout=60) as c:
        # the first request makes one pod the prefix's holder, and keeps it busy
        body = {"model": "tiny", "prompt": hot + "first", "max_tokens": 400, "stream": True}
        async with c.stream("POST", url, json=body) as busy:
            assert busy.status_code == 200
            lines = busy.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break  # dispatched and decoding
            before = [await by_source(e) for e in stack.engines]
            held = [i for i, b in enumerate(before) if b.get("local_compute", 0) > 0]
            assert len(held) == 1, before
            (h,) = held
            r = await c.post(url, json={"model": "tiny", "prompt": hot + "second",
                                        "max_tokens": 8})  # fmt: skip
            assert r.status_code == 200, r.text
            after = [await by_source(e) for e in stack.engines]
            async for _ in lines:
                pass
    delta = [{k: after[i].get(k, 0) - before[i].get(k, 0) for k in after[i]} for i in range(3)]
    (d,) = [i for i in range(3) if i != h and delta[i].get("external_kv_transfer", 0) > 0]
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    # the idle pod pulled (nearly) the whole prompt and computed almost none of it
    assert delta[d]["external_kv_transfer"] >= prompt_tokens - 32, delta
    assert delta[d].get("local_compute", 0) <= 16, delta
    # the holder's prefill leg came from its own cache
    assert delta[h]["local_cache_hit"] >= prompt_tokens - 48, delta
    sched = await asyncio.to_thread(stack.gateway.scheduler.metrics_text)
    decisions = [x for x in sched.splitlines() if x.startswith("llm_d_epp_disagg_decision_total{")]
    assert any('decision_type="prefill-decode"' in x and x.endswith(" 1.0") for x in decisions), (
        decisions
    )
    reg = stack.sidecars[d].registry
    assert reg.get_sample_value("llmd_sidecar_requests_total", {"mode": "pd", "outcome": "2xx"})
