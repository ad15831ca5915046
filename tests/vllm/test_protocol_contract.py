"""llmd.protocol against real vLLM 0.32: events, block hashes, metrics."""

from __future__ import annotations

import httpx
import pytest

from llmd.protocol.hashing import event_hash, vllm_block_hashes
from llmd.protocol.kv_events import BlockStored, EventBatch, decode_batch, parse_topic
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.protocol.openai import decode_usage
from llmd.vllm_cpu.server import VllmServer

from .conftest import KVEventTap

pytestmark = pytest.mark.vllm

MODEL = "tiny"


def tokenize(server: VllmServer, **body: object) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, **body}, timeout=30)
    r.raise_for_status()
    tokens: list[int] = r.json()["tokens"]
    return tokens


def complete(server: VllmServer, prompt: str, max_tokens: int = 2) -> dict[str, object]:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    r.raise_for_status()
    body: dict[str, object] = r.json()
    return body


def stored_chain(batches: list[EventBatch], tokens: list[int]) -> list[int]:
    """The published hashes of the chain whose first event starts with `tokens`' first block."""
    stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
    head = next(
        e for e in stored if e.parent_block_hash is None and e.token_ids[:32] == tokens[:32]
    )
    chain = [int(h) for h in head.block_hashes]
    for e in stored:  # later steps extend the chain (generated tokens filling blocks)
        if e.parent_block_hash == chain[-1]:
            chain.extend(int(h) for h in e.block_hashes)
    return chain


def test_every_published_batch_decodes(vllm_server: VllmServer, kv_tap: KVEventTap) -> None:
    for i in range(3):
        complete(vllm_server, f"decoder check {i} " + "the system answer " * (10 + 7 * i))
    frames = kv_tap.drain()
    assert frames, "vLLM published no KV events"
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    for frame in frames:
        topic = parse_topic(frame.topic)
        assert (topic.pod, topic.model) == (vllm_server.spec.pod, MODEL)
        batch = decode_batch(frame.payload)
        assert batch.unknown_events == 0
        assert batch.data_parallel_rank == 0
        for event in batch.events:
            if isinstance(event, BlockStored):
                assert event.block_size == 32
                assert len(event.token_ids) == 32 * len(event.block_hashes)
                assert event.medium == "GPU"


def test_block_hashes_equal_vllm_blockstored_events(
    vllm_server: VllmServer, kv_tap: KVEventTap
) -> None:
    prompt = "hash contract " + "people write the long document context " * 40
    tokens = tokenize(vllm_server, prompt=prompt)
    assert len(tokens) >= 6 * 32
    kv_tap.drain(0.2)
    complete(vllm_server, prompt)
    batches = [decode_batch(f.payload) for f in kv_tap.drain()]
    expected = [event_hash(d) for d in vllm_block_hashes(tokens, 32)]
    assert stored_chain(batches, tokens)[: len(expected)] == expected


def test_chat_prompt_hashes_equal_vllm_events(vllm_server: VllmServer, kv_tap: KVEventTap) -> None:
    messages = [
        {"role": "system", "content": "you answer questions " * 12},
        {"role": "user", "content": "what is the number of the water " * 12},
    ]
    tokens = tokenize(vllm_server, messages=messages, add_generation_prompt=True)
    kv_tap.drain(0.2)
    r = httpx.post(
        f"{vllm_server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 2},
        timeout=60,
    )
    r.raise_for_status()
    batches = [decode_batch(f.payload) for f in kv_tap.drain()]
    expected = [event_hash(d) for d in vllm_block_hashes(tokens, 32)]
    assert len(expected) >= 3
    assert stored_chain(batches, tokens)[: len(expected)] == expected


def test_replay_returns_the_batches_published_live(
    vllm_server: VllmServer, kv_tap: KVEventTap
) -> None:
    complete(vllm_server, "replay check " + "two more number " * 30)
    live = kv_tap.drain()
    assert live
    replayed = {f.seq: f for f in kv_tap.replay(live[0].seq)}
    for frame in live:
        assert replayed[frame.seq].payload == frame.payload
        assert replayed[frame.seq].topic == frame.topic


def test_metrics_parse_into_the_right_snapshot(vllm_server: VllmServer) -> None:
    before = parse_engine_snapshot(httpx.get(f"{vllm_server.url}/metrics", timeout=10).text)
    prompt = "metrics check " + "find the long day " * 30
    n_prompt = len(tokenize(vllm_server, prompt=prompt))
    complete(vllm_server, prompt)
    second = complete(vllm_server, prompt)
    usage = decode_usage(second)
    assert usage is not None
    assert usage.cached_tokens > 0
    after = parse_engine_snapshot(httpx.get(f"{vllm_server.url}/metrics", timeout=10).text)

    assert after.block_size == 32
    assert after.num_gpu_blocks is not None
    assert after.num_gpu_blocks > 0
    assert after.cache_config["enable_prefix_caching"] == "True"
    assert after.running == 0
    assert after.waiting == 0
    assert after.kv_cache_usage is not None
    assert 0.0 <= after.kv_cache_usage <= 1.0
    assert before.prefix_cache_queries is not None
    assert after.prefix_cache_queries is not None
    assert before.prefix_cache_hits is not None
    assert after.prefix_cache_hits is not None
    assert after.prefix_cache_queries - before.prefix_cache_queries == 2 * n_prompt
    assert after.prefix_cache_hits - before.prefix_cache_hits == usage.cached_tokens
    assert after.lora is None  # LoRA is not enabled on this server
