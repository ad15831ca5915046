"""P/D disaggregation end to end on real vLLM 0.32 CPU servers: Envoy -> llmd-scheduler (llm-d's
P/D config: decode first, prefix-based decider) -> llmd-sidecar on the decode pod -> the prefill
leg on a real NixlConnector `kv_producer`, the decode leg on a real `kv_consumer` that pulls the
prompt's KV over NIXL (UCX over TCP).

The transferred KV must be right: greedy output of a disaggregated request equals the output of
the same request served aggregated by a plain server of the same model. The pull must be real:
the decode engine's own metrics count one NIXL transfer and the prompt's blocks as external
prefix-cache hits. vLLM 0.32 reports, in the decode leg's `usage.cached_tokens`, the prefill
engine's own prefix hits (`remote_prefill_cached_tokens`), so a client sees the figure an
aggregated request would have given it; the test checks that too.

Both engines run NIXL's UCX progress thread, which NIXL 1.5.1 starts polling without sleeping;
the harness gives it a poll delay (`llmd.vllm_cpu` engine_site), or two such engines take both of
this machine's cores and every other process waits behind them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway
from llmd.protocol import metrics as pm
from llmd.sidecar.app import SidecarApp, SidecarConfig
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.pytest_plugin import VllmFleet
from llmd.vllm_cpu.server import VllmServer, free_port, nixl_server_spec, start_servers

pytestmark = pytest.mark.vllm

MODEL = "tiny"
BLOCK = 32
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
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


@pytest.fixture(scope="module")
def pd_pair(
    vllm_env: VllmEnv, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, VllmServer]]:
    """A real prefill engine (kv_producer) and decode engine (kv_consumer), this module only."""
    specs = [
        nixl_server_spec("vllm-prefill", tiny_model_dir, "kv_producer", cpu_core=0),
        nixl_server_spec("vllm-decode", tiny_model_dir, "kv_consumer", cpu_core=1),
    ]
    prefill, decode = start_servers(vllm_env, specs, tmp_path_factory.mktemp("vllm-pd"))
    try:
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


@dataclass
class Stack:
    gateway: Gateway
    prefill: VllmServer
    decode: VllmServer
    sidecar: SidecarApp


@pytest.fixture
async def stack(pd_pair: tuple[VllmServer, VllmServer], tmp_path: Path) -> AsyncIterator[Stack]:
    prefill, decode = pd_pair
    sidecar = SidecarApp(
        SidecarConfig(
            host="127.0.0.1",
            port=free_port(),
            model_server_port=decode.port,
            metrics_port=0,
            enable_ssrf_protection=True,
            allowed_prefill_hosts=["127.0.0.1"],
        )
    )
    await sidecar.start()
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"name": "vllm-prefill", "address": "127.0.0.1", "port": str(prefill.port),
         "labels": {"llm-d.ai/role": "prefill"}},
        {"name": "vllm-decode", "address": "127.0.0.1", "port": str(sidecar.config.port),
         "labels": {"llm-d.ai/role": "decode"}},
    ]}))  # fmt: skip
    config = tmp_path / "pd.yaml"
    config.write_text(CONFIG)
    gateway = await asyncio.to_thread(Gateway.start, endpoints, tmp_path / "gw", config_file=config)
    try:
        yield Stack(gateway, prefill, decode, sidecar)
    finally:
        await asyncio.to_thread(gateway.stop)
        await sidecar.stop()


async def metric(server: VllmServer, name: str) -> float:
    """The sum of every sample of `name` (all label sets) on a real engine's /metrics."""
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{server.url}/metrics")).text
    return sum(s.value for s in pm.parse_samples(text, {name}))


def long_prompt(tag: str) -> str:
    """About 1.3k tokens of the tiny model's tokenizer, unique per tag."""
    return f"{tag}: " + "the quick brown fox jumps over the lazy dog " * 48


def greedy(prompt: str, max_tokens: int = 12) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def test_disaggregated_output_equals_aggregated_and_the_kv_is_pulled(
    stack: Stack, vllm_fleet: VllmFleet
) -> None:
    (aggregated,) = await asyncio.to_thread(vllm_fleet.get, "vllm-a")
    prompt = long_prompt("pd e2e output")
    transfers = await metric(stack.decode, "vllm:nixl_xfer_time_seconds_count")
    external_hits = await metric(stack.decode, "vllm:external_prefix_cache_hits_total")
    decode_prompt = await metric(stack.decode, "vllm:prompt_tokens_total")
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(f"{stack.gateway.url}/v1/completions", json=greedy(prompt))
        assert r.status_code == 200, r.text
        alone = await c.post(f"{aggregated.url}/v1/completions", json=greedy(prompt))
        assert alone.status_code == 200, alone.text
    pd, ref = r.json(), alone.json()
    prompt_tokens = pd["usage"]["prompt_tokens"]
    assert 1200 <= prompt_tokens <= 1500, pd["usage"]
    assert pd["choices"][0]["text"] == ref["choices"][0]["text"]
    assert pd["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"] == 12
    # the decode engine pulled the prompt's full blocks instead of computing them
    assert await metric(stack.decode, "vllm:nixl_xfer_time_seconds_count") == transfers + 1
    pulled = await metric(stack.decode, "vllm:external_prefix_cache_hits_total") - external_hits
    assert pulled >= (prompt_tokens - 1) // BLOCK * BLOCK, (pulled, prompt_tokens)
    assert await metric(stack.decode, "vllm:prompt_tokens_total") - decode_prompt == prompt_tokens
    # a fresh prompt: nothing was cached on the prefill engine, which is what usage says
    assert pd["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reg = stack.sidecar.registry
    assert reg.get_sample_value("llmd_sidecar_requests_total", {"mode": "pd", "outcome": "2xx"})
    sched = stack.gateway.scheduler.metrics_text()
    assert 'llm_d_epp_disagg_decision_total{decision_type="prefill-decode"' in sched
    assert stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0


def test_idle_nixl_engines_do_not_keep_a_core_busy(
    pd_pair: tuple[VllmServer, VllmServer],
) -> None:
    """NIXL 1.5.1's progress thread, left as shipped, keeps about one core per engine busy
    while idle; with the harness's poll delay an idle engine uses about a tenth of one."""
    time.sleep(2.0)  # after a request vLLM's worker polls its queue for up to a second
    before = [s.cpu_seconds() for s in pd_pair]
    time.sleep(3.0)
    used = [(s.cpu_seconds() - b) / 3.0 for s, b in zip(pd_pair, before, strict=True)]
    assert all(u < 0.5 for u in used), used


async def test_a_repeated_prompt_reports_the_prefill_engine_s_hits_and_streams(
    stack: Stack,
) -> None:
    prompt = long_prompt("pd e2e repeat")
    body = {**greedy(prompt, 8), "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=120) as c:
        first = await c.post(f"{stack.gateway.url}/v1/completions", json=greedy(prompt, 8))
        assert first.status_code == 200, first.text
        chunks: list[dict[str, object]] = []
        async with c.stream("POST", f"{stack.gateway.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(str(ch["choices"][0]["text"]) for ch in chunks if ch["choices"])  # type: ignore[index]
    assert text == first.json()["choices"][0]["text"]
    usage = chunks[-1]["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == 8
    # the prefill engine had the prompt's full blocks from the first request
    prompt_tokens = int(usage["prompt_tokens"])
    assert usage["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // BLOCK * BLOCK
