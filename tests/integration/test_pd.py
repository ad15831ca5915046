"""P/D disaggregation end to end on real processes: Envoy -> llmd-scheduler (llm-d's P/D
config: decode first, prefix-based decider) -> llmd-sidecar on the decode pod -> prefill leg on
the prefill engine, decode leg on the decode engine (simulated vLLM 0.32 with the
NixlConnector contract: the decode engine pulls the blocks over the prefill's side channel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
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
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""


@dataclass
class Stack:
    gateway: Gateway
    prefill: str
    decode: str
    sidecar: SidecarApp


@pytest.fixture(params=["ext_proc", "ext_authz"])
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    prefill = await asyncio.to_thread(SimFleetProcess.start_pd, "kv_producer", tmp_path)
    decode = await asyncio.to_thread(SimFleetProcess.start_pd, "kv_consumer", tmp_path)
    decode_port = int(decode.engines[0].url.rsplit(":", 1)[1])
    sidecar = SidecarApp(
        SidecarConfig(
            host="127.0.0.1", port=free_port(), model_server_port=decode_port, metrics_port=0
        )
    )
    await sidecar.start()
    prefill_port = int(prefill.engines[0].url.rsplit(":", 1)[1])
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"name": "prefill-0", "address": "127.0.0.1", "port": str(prefill_port),
         "labels": {"llm-d.ai/role": "prefill"}},
        {"name": "decode-0", "address": "127.0.0.1", "port": str(sidecar.config.port),
         "labels": {"llm-d.ai/role": "decode"}},
    ]}))  # fmt: skip
    config = tmp_path / "pd.yaml"
    config.write_text(CONFIG)
    gateway = await asyncio.to_thread(
        Gateway.start, endpoints, tmp_path / "gw", config_file=config, scheduler_api=request.param
    )
    try:
        yield Stack(gateway, prefill.engines[0].url, decode.engines[0].url, sidecar)
    finally:
        await asyncio.to_thread(gateway.stop)
        await sidecar.stop()
        prefill.stop()
        decode.stop()


async def _counter(url: str, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{url}/metrics")).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))


async def test_long_prompts_are_disaggregated_and_short_ones_are_not(stack: Stack) -> None:
    long_prompt = "a long system prompt shared by many requests " * 60
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(f"{stack.gateway.url}/v1/completions",
                         json={"model": "tiny", "prompt": long_prompt, "max_tokens": 8})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        short = await c.post(f"{stack.gateway.url}/v1/completions",
                             json={"model": "tiny", "prompt": "hi there", "max_tokens": 3})  # fmt: skip
        assert short.status_code == 200, short.text
        sched = (await c.get(stack.gateway.scheduler.url + "/metrics")).text
    # one prefill leg on the prefill engine (one generated token), one NIXL pull on the decode one
    assert await _counter(stack.prefill, "vllm:generation_tokens_total") == 1
    assert await _counter(stack.decode, "vllm:nixl_xfer_time_seconds_count") == 1
    reg = stack.sidecar.registry
    assert (
        reg.get_sample_value("llmd_sidecar_requests_total", {"mode": "pd", "outcome": "2xx"}) == 1
    )
    assert (
        reg.get_sample_value(
            "llmd_sidecar_requests_total", {"mode": "decode-only", "outcome": "2xx"}
        )
        == 1
    )
    decisions = {
        line.split('decision_type="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in sched.splitlines()
        if line.startswith("llm_d_epp_disagg_decision_total{")
    }
    assert decisions == {"prefill-decode": 1.0, "decode-only": 1.0}
