"""llmd.kvcache against a real vLLM 0.32 CPU server: the index holds exactly the blocks vLLM's
events say are cached, predicts `cached_tokens` to the block, drops evicted blocks, and notices
a restarted engine (sequence reset) and resyncs.

The server is this module's own (a small KV cache, so evictions happen, and it is restarted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
import zmq

from llmd.dev.gateway import SchedulerProcess
from llmd.kvcache.index import InMemoryIndex
from llmd.kvcache.indexer import KVCacheIndexer
from llmd.kvcache.ingest import EngineEndpoint, EventApplier, Ingestor
from llmd.kvcache.keys import TokenProcessor
from llmd.kvcache.tokenization import ChatMessageIn, ModelTokenizer, RenderClient, TokenizerError
from llmd.protocol.kv_events import END_SEQ, BlockRemoved, BlockStored, decode_batch, to_u64
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, start_servers

pytestmark = pytest.mark.vllm

ENGINE_BLOCK = 32
GPU_BLOCKS = 160  # 5,120 tokens of KV (vLLM wants max_model_len to fit): fillers evict


@pytest.fixture(scope="module")
def server(
    vllm_env: VllmEnv, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    spec = VllmServerSpec(
        pod="vllm-kv",
        model_dir=tiny_model_dir,
        block_size=ENGINE_BLOCK,
        extra_args=[
            "--num-gpu-blocks-override",
            str(GPU_BLOCKS),
            "--max-num-seqs",
            "4",
            "--enable-scale-out",  # the render endpoints
        ],
    )
    (s,) = start_servers(vllm_env, [spec], tmp_path_factory.mktemp("vllm-kv"))
    yield s
    s.stop()


class Reference:
    """What vLLM says is cached: GPU hashes stored minus removed, from a raw SUB socket (after
    a replay of everything the server still buffers), independent of llmd.kvcache's ingestion."""

    def __init__(self, server: VllmServer) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.connect(server.kv_events_endpoint)
        self.cached: set[int] = set()
        self.removed = 0
        self.last_seq = -1
        time.sleep(0.5)
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(server.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        while True:
            assert dealer.poll(5000), "replay timed out"
            parts = dealer.recv_multipart()
            if parts[2] == END_SEQ:
                break
            self.apply(int.from_bytes(parts[2], "big"), parts[3])
        dealer.close(linger=0)

    def apply(self, seq: int, payload: bytes) -> None:
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        for ev in decode_batch(payload).events:
            if isinstance(ev, BlockStored):
                self.cached |= {to_u64(h) for h in ev.block_hashes}
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    self.cached.discard(to_u64(h))
                    self.removed += 1

    def drain(self) -> None:
        while self.sock.poll(300):
            _, seq, payload = self.sock.recv_multipart()
            self.apply(int.from_bytes(seq, "big"), payload)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class Harness:
    def __init__(self, server: VllmServer, tokenizer_dir: Path) -> None:
        self.server = server
        self.index = InMemoryIndex()
        self.applier = EventApplier(self.index, TokenProcessor())
        self.ingestor = Ingestor(self.applier, shards=1)
        self.indexer = KVCacheIndexer(self.index, TokenProcessor(), metrics=self.applier.metrics)
        self.tokenizer = ModelTokenizer(tokenizer_dir)
        self.pod = server.address
        self.ref = Reference(server)
        self.http = httpx.AsyncClient(timeout=60)

    async def complete(self, prompt: str) -> dict[str, int]:
        r = await self.http.post(
            self.server.url + "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
        )
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        return {
            "prompt_tokens": u["prompt_tokens"],
            "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        }

    async def settle(self) -> None:
        await asyncio.sleep(0.8)
        await self.ingestor.drain()
        self.ref.drain()

    def predicted_tokens(self, prompt: str) -> int:
        keys = self.indexer.keys(self.tokenizer.encode(prompt), "tiny")
        hit = self.indexer.score_sync(keys, None).get(self.pod)
        return hit.blocks * self.indexer.block_size if hit else 0


@pytest.fixture
async def h(server: VllmServer, tiny_model_dir: Path) -> AsyncIterator[Harness]:
    harness = Harness(server, tiny_model_dir)
    await harness.ingestor.start()
    harness.ingestor.subscribe(
        EngineEndpoint(
            pod=server.address, events=server.kv_events_endpoint, replay=server.replay_endpoint
        )
    )
    await asyncio.sleep(1.0)  # ZMQ slow joiner (and the joining replay)
    yield harness
    await harness.ingestor.stop()
    await harness.http.aclose()
    harness.ref.close()


def text(tag: str, words: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


async def test_index_matches_vllm_and_predicts_cached_tokens(h: Harness) -> None:
    prompts = [text(f"p{i}x", 150) for i in range(3)]
    for p in prompts:
        await h.complete(p)
    await h.settle()
    assert h.ref.cached
    assert h.index.engine_keys(h.pod) == h.ref.cached  # exactly what vLLM reports
    for p in prompts:
        predicted = h.predicted_tokens(p)
        usage = await h.complete(p)
        cap = (usage["prompt_tokens"] - 1) // ENGINE_BLOCK * ENGINE_BLOCK
        assert usage["cached_tokens"] > 0
        assert usage["cached_tokens"] == min(predicted // ENGINE_BLOCK * ENGINE_BLOCK, cap)


async def test_evictions_remove_entries(h: Harness) -> None:
    first = text("evictme", 100)
    await h.complete(first)
    await h.settle()
    assert h.predicted_tokens(first) > 0
    for i in range(8):  # ~250 blocks of prompts through a 160-block cache
        await h.complete(text(f"filler{i}x", 150))
    await h.settle()
    assert h.ref.removed > 0
    assert h.index.engine_keys(h.pod) == h.ref.cached
    usage = await h.complete(first)
    assert h.applier.blocks_removed > 0
    assert usage["cached_tokens"] == 0


async def test_a_restarted_vllm_is_detected_and_resynced(
    h: Harness, server: VllmServer, vllm_env: VllmEnv
) -> None:
    before = text("before", 200)
    for i in range(3):
        await h.complete(text(f"warm{i}x", 60))
    await h.complete(before)
    await h.settle()
    assert h.predicted_tokens(before) > 0
    server.stop()
    server.start(vllm_env)
    await asyncio.to_thread(server.wait_healthy)
    after = text("after", 200)
    await h.complete(after)
    deadline = time.monotonic() + 10
    while h.applier.metrics.sequence.labels("restart")._value.get() < 1:
        assert time.monotonic() < deadline, h.ingestor.snapshot()
        await h.settle()
    await h.settle()
    assert h.predicted_tokens(before) == 0  # the old engine's blocks are gone with it
    assert h.predicted_tokens(after) > 0
    usage = await h.complete(after)
    assert usage["cached_tokens"] == min(
        h.predicted_tokens(after) // ENGINE_BLOCK * ENGINE_BLOCK,
        (usage["prompt_tokens"] - 1) // ENGINE_BLOCK * ENGINE_BLOCK,
    )


async def test_vllm_render_endpoints_tokenize_like_the_model_directory(
    h: Harness, server: VllmServer
) -> None:
    render = RenderClient(server.url)
    try:
        p = text("render", 50)
        got = await render.tokens("/v1/completions", {"model": "tiny", "prompt": p})
        assert got == h.tokenizer.encode(p)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
        got = await render.tokens("/v1/chat/completions", {"model": "tiny", "messages": msgs})
        want = h.tokenizer.encode_chat([ChatMessageIn(m["role"], m["content"]) for m in msgs])
        assert got == want
        # a long shared system prompt and history: the second and third chats reuse the cached
        # tokens of the parts seen before, and must still match the engine token for token
        system = {"role": "system", "content": text("shared system", 400)}
        history = [{"role": "user", "content": "first question"},
                   {"role": "assistant", "content": "first answer </s> with a marker"}]  # fmt: skip
        hits = h.tokenizer.segments.hits
        for turn in ("one", "two", "three"):
            chat = [system, *history, {"role": "user", "content": f"question {turn}"}]
            got = await render.tokens("/v1/chat/completions", {"model": "tiny", "messages": chat})
            ours = h.tokenizer.encode_chat([ChatMessageIn(m["role"], m["content"]) for m in chat])
            assert got == ours
        assert h.tokenizer.segments.hits > hits
        with pytest.raises(TokenizerError, match="404"):
            await render.tokens("/v1/completions", {"model": "no-such-model", "prompt": "x"})
    finally:
        await render.close()


LLMD_STYLE = """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{renderUrl: "{url}"}}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 1}}]
"""
LLM_D_STYLE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{backend: vllm, modelName: tiny, vllm: {{url: "{url}"}}}}
- type: precise-prefix-cache-producer
  parameters: {{tokenProcessorConfig: {{blockSize: 16}}}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 1}}]
"""


@pytest.mark.parametrize("style", ["llmd", "llm-d-token-producer"])
async def test_a_scheduler_tokenizing_through_vllm_render_routes_by_vllm_events(
    h: Harness, server: VllmServer, tmp_path: Path, style: str
) -> None:
    """The render server given directly, or as llm-d configs give it (token-producer's vLLM
    backend, which llmd hands to the precise producer)."""
    pool = tmp_path / "pool.yaml"
    labels = {
        "llmd.ai/kv-events-endpoint": server.kv_events_endpoint,
        "llmd.ai/kv-replay-endpoint": server.replay_endpoint,
    }
    pool.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {
                        "name": "vllm-kv",
                        "address": "127.0.0.1",
                        "port": server.port,
                        "labels": labels,
                    }
                ]
            }
        )
    )
    config = tmp_path / "epp.yaml"
    config.write_text((LLMD_STYLE if style == "llmd" else LLM_D_STYLE).format(url=server.url))
    p = text(f"routed {style}", 120)
    await h.complete(p)
    sched = await asyncio.to_thread(SchedulerProcess.start, pool, tmp_path, config_file=config)
    try:
        score = 0.0
        deadline = time.monotonic() + 20
        while score < 0.9 and time.monotonic() < deadline:
            r = await h.http.post(
                sched.debug_url + "/debug/explain", json={"body": {"model": "tiny", "prompt": p}}
            )
            assert r.status_code == 200, r.text
            scores = r.json()["profiles"]["default"]["scores"]["prefix-cache-scorer"]
            score = scores["per_endpoint"]["vllm-kv"]
            await asyncio.sleep(0.3)
        assert score > 0.9  # the joining replay brought vLLM's blocks; render gave the tokens
    finally:
        await asyncio.to_thread(sched.stop)
