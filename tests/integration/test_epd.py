"""E/P/D end to end on real processes: Envoy -> llmd-scheduler (an encode, a prefill and a
decode profile; llm-d's multimodal and prefix-based deciders) -> llmd-sidecar (`ec-nixl`) on
the decode pod -> each image to the encode engine, the prefill leg on the prefill engine, the
decode leg on the decode engine (simulated vLLM 0.32: EC producer and consumers, NixlConnector
KV transfer)."""

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
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-multimodal-decider
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 64}
- type: disagg-profile-handler
  parameters:
    deciders: {encode: always-disagg-multimodal-decider, prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: encode
  plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker},
            {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""


@dataclass
class Stack:
    gateway: Gateway
    encoder: str
    prefill: str
    decode: str
    sidecar: SidecarApp


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    encoder = await asyncio.to_thread(SimFleetProcess.start_encoders, tmp_path)
    prefill = await asyncio.to_thread(
        lambda: SimFleetProcess.start_pd("kv_producer", tmp_path, ec_consumer=True)
    )
    decode = await asyncio.to_thread(
        lambda: SimFleetProcess.start_pd("kv_consumer", tmp_path, ec_consumer=True)
    )
    sidecar = SidecarApp(
        SidecarConfig(
            host="127.0.0.1", port=free_port(), model_server_port=_port(decode.engines[0].url),
            metrics_port=0, ec_connector="ec-nixl",
        )
    )  # fmt: skip
    await sidecar.start()
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"name": "encode-0", "address": "127.0.0.1", "port": str(_port(encoder.engines[0].url)),
         "labels": {"llm-d.ai/role": "encode"}},
        {"name": "prefill-0", "address": "127.0.0.1", "port": str(_port(prefill.engines[0].url)),
         "labels": {"llm-d.ai/role": "prefill"}},
        {"name": "decode-0", "address": "127.0.0.1", "port": str(sidecar.config.port),
         "labels": {"llm-d.ai/role": "decode"}},
    ]}))  # fmt: skip
    config = tmp_path / "epd.yaml"
    config.write_text(CONFIG)
    gateway = await asyncio.to_thread(Gateway.start, endpoints, tmp_path / "gw", config_file=config)
    try:
        yield Stack(
            gateway, encoder.engines[0].url, prefill.engines[0].url, decode.engines[0].url,
            sidecar,
        )  # fmt: skip
    finally:
        await asyncio.to_thread(gateway.stop)
        await sidecar.stop()
        for fleet in (encoder, prefill, decode):
            fleet.stop()


async def _mm(url: str) -> dict[str, int]:
    async with httpx.AsyncClient() as c:
        items: dict[str, int] = (await c.get(f"{url}/sim/state")).json()["mm_items"]
    return items


def _chat(text: str, *urls: str) -> dict[str, object]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "tiny", "max_tokens": 6, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]}  # fmt: skip


async def test_images_go_to_the_encoder_and_their_encodings_to_prefill_and_decode(
    stack: Stack,
) -> None:
    long_text = "describe both pictures and compare their colours and shapes " * 20
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(
            f"{stack.gateway.url}/v1/chat/completions",
            json=_chat(long_text, "https://example.com/a.png", "https://example.com/b.png"),
            # a client cannot pick encoders: the gateway drops this, the scheduler sets its own
            headers={"x-encoder-hosts-ports": "127.0.0.1:1"},
        )
        assert r.status_code == 200, r.text
        assert r.text.rstrip().endswith("data: [DONE]")
        # a text-only chat goes nowhere near the encoder
        text_only = await c.post(
            f"{stack.gateway.url}/v1/chat/completions", json=_chat("just a short question")
        )
        assert text_only.status_code == 200, text_only.text
        sched = (await c.get(stack.gateway.scheduler.url + "/metrics")).text
    assert await _mm(stack.encoder) == {"encoded": 2, "received": 0}
    assert await _mm(stack.prefill) == {"encoded": 0, "received": 2}
    assert await _mm(stack.decode) == {"encoded": 0, "received": 2}
    reg = stack.sidecar.registry
    assert reg.get_sample_value(
        "llmd_sidecar_requests_total", {"mode": "encode-pd", "outcome": "2xx"}
    ) == 1  # fmt: skip
    assert reg.get_sample_value("llmd_sidecar_encoder_items_total", {"outcome": "ok"}) == 2
    decisions = {
        line.split('decision_type="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in sched.splitlines()
        if line.startswith("llm_d_epp_disagg_decision_total{")
    }
    assert decisions == {"encode-prefill-decode": 1.0, "decode-only": 1.0}
