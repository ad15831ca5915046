"""The engine model: prefix hits, eviction, preemption, queueing, chunked prefill, LoRA slots."""

from __future__ import annotations

import asyncio

import pytest

from llmd.protocol.hashing import event_hash, vllm_block_hashes
from llmd.protocol.kv_events import BlockRemoved, BlockStored, KVEvent
from llmd.sim.engine import Engine, EngineError, EngineSettings, LoraAdapter, SimClock, SimRequest
from llmd.sim.latency import PROFILES, LatencyModel, LatencyProfile
from llmd.sim.metrics import EngineMetrics

BS = 16


class Harness:
    def __init__(self, engine: Engine, events: list[KVEvent]) -> None:
        self.engine = engine
        self.events = events

    async def run(self, *reqs: SimRequest, timeout: float = 5.0) -> None:
        for r in reqs:
            self.engine.submit(r)
        async with asyncio.timeout(timeout):
            while not all(r.finished for r in reqs):
                await asyncio.sleep(0.001)

    def request(self, prompt: list[int], max_tokens: int = 1, **kw: object) -> SimRequest:
        return self.engine.new_request(f"r{len(prompt)}-{id(prompt)}", prompt, max_tokens, **kw)  # type: ignore[arg-type]


def make(
    *,
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    budget: int = 4096,
    max_loras: int = 1,
    profile: LatencyProfile | None = None,
    speed: float = 1.0,
) -> Harness:
    events: list[KVEvent] = []
    settings = EngineSettings(
        block_size=BS,
        num_gpu_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=4096,
        max_loras=max_loras,
    )
    metrics = EngineMetrics("m", max_model_len=4096, cache_config={})
    engine = Engine(
        settings,
        LatencyModel(profile or PROFILES["instant"]),
        SimClock(speed),
        metrics,
        list(range(10, 500)),
        publish=events.extend,
    )
    engine.start()
    return Harness(engine, events)


def prompt(n: int, offset: int = 1000) -> list[int]:
    return [offset + i for i in range(n)]


async def test_repeated_prompt_hits_every_full_block_but_the_last_token() -> None:
    h = make()
    a = h.request(prompt(64))
    await h.run(a)
    assert a.cached_tokens == 0
    b = h.request(prompt(64))
    await h.run(b)
    # 64 tokens: the last token must be computed, so at most (64 - 1) // 16 = 3 blocks hit.
    assert b.cached_tokens == 48
    m = h.engine.metrics
    assert (m.prefix_queries, m.prefix_hits) == (128, 48)
    await h.engine.stop()


async def test_stored_events_carry_vllm_block_hashes_in_chained_order() -> None:
    h = make()
    p = prompt(70)
    await h.run(h.request(p, max_tokens=1))
    stored = [e for e in h.events if isinstance(e, BlockStored)]
    published = [int(x) for e in stored for x in e.block_hashes]
    expected = [event_hash(d) for d in vllm_block_hashes(p, BS)]
    assert published[: len(expected)] == expected
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids[: 4 * BS] == p[: 4 * BS]
    assert stored[0].medium == "GPU"
    assert stored[0].group_idx == 0
    await h.engine.stop()


async def test_free_cached_blocks_are_evicted_lru_with_block_removed_events() -> None:
    h = make(num_blocks=7)  # 6 usable
    a = h.request(prompt(48, 1000))
    await h.run(a)  # caches 3 blocks, then frees them (they stay hittable)
    assert h.engine.pool.num_cached_hashes == 3
    big = h.request(prompt(90, 5000))  # needs 6 blocks: every cached block of `a` is reused
    await h.run(big)
    removed = [int(x) for e in h.events if isinstance(e, BlockRemoved) for x in e.block_hashes]
    assert set(removed) >= {event_hash(d) for d in vllm_block_hashes(prompt(48, 1000), BS)}
    again = h.request(prompt(48, 1000))
    await h.run(again)
    assert again.cached_tokens == 0
    await h.engine.stop()


async def test_out_of_blocks_preempts_the_newest_running_request_and_both_finish() -> None:
    h = make(num_blocks=9)  # 8 usable blocks = 128 tokens for two growing sequences
    first = h.request(prompt(40, 1000), max_tokens=60)
    second = h.request(prompt(40, 3000), max_tokens=60)
    await h.run(first, second)
    assert h.engine.metrics.preemptions >= 1
    assert second.num_preemptions >= 1
    assert first.num_preemptions == 0
    assert len(first.output_ids) == len(second.output_ids) == 60
    assert h.engine.pool.num_free_blocks == 8  # everything returned
    await h.engine.stop()


async def test_max_num_seqs_queues_the_rest_fifo() -> None:
    slow = LatencyProfile(step_overhead_s=0.01)
    h = make(max_num_seqs=1, profile=slow, speed=10.0)
    a = h.request(prompt(20, 1000), max_tokens=5)
    b = h.request(prompt(20, 2000), max_tokens=5)
    h.engine.submit(a)
    h.engine.submit(b)
    await asyncio.sleep(0.003)
    assert (len(h.engine.running), len(h.engine.waiting)) == (1, 1)
    await h.run()
    async with asyncio.timeout(5):
        while not (a.finished and b.finished):
            await asyncio.sleep(0.001)
    assert a.first_scheduled is not None
    assert b.first_scheduled is not None
    assert b.first_scheduled >= a.finished_at - 1e-9  # type: ignore[operator]
    await h.engine.stop()


async def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    h = make(budget=32)
    r = h.request(prompt(100), max_tokens=1)
    steps_before = h.engine.steps
    await h.run(r)
    assert h.engine.steps - steps_before == 4  # 32 + 32 + 32 + 4 tokens
    await h.engine.stop()


async def test_lora_slots_defer_a_second_adapter_until_the_first_drains() -> None:
    slow = LatencyProfile(step_overhead_s=0.01)
    h = make(max_loras=1, profile=slow, speed=10.0)
    la, lb = LoraAdapter("a", "/a", 1), LoraAdapter("b", "/b", 2)
    ra = h.request(prompt(20, 1000), max_tokens=4, lora=la)
    rb = h.request(prompt(20, 2000), max_tokens=4, lora=lb)
    await h.run(ra, rb)
    assert rb.first_scheduled is not None
    assert ra.finished_at is not None
    assert rb.first_scheduled >= ra.finished_at - 1e-9
    stored = [e for e in h.events if isinstance(e, BlockStored) and e.lora_name == "a"]
    assert stored
    assert stored[0].lora_id == 1
    assert stored[0].extra_keys == [("a",)]
    await h.engine.stop()


async def test_full_waiting_queue_rejects_with_503_and_counts() -> None:
    h = make()
    h.engine.settings.max_waiting = 1
    h.engine.hang()
    h.engine.submit(h.request(prompt(10)))
    with pytest.raises(EngineError) as info:
        h.engine.submit(h.request(prompt(11)))
    assert info.value.status == 503
    assert h.engine.metrics.admission_rejections["max_num_queued_reqs"] == 1
    await h.engine.stop()


async def test_abort_frees_blocks_and_counts_abort() -> None:
    h = make()
    h.engine.hang()
    r = h.request(prompt(40))
    h.engine.submit(r)
    h.engine.abort(r)
    assert r.finish_reason == "abort"
    assert h.engine.metrics.success["abort"] == 1
    assert not h.engine.waiting
    await h.engine.stop()
