"""The KV-event publisher against the library's own ingestion over real ZMQ sockets: live
batches reach the index, a dropped batch is a gap that the replay ROUTER fills."""

from __future__ import annotations

import asyncio

import pytest
import zmq.asyncio

from llmd.kvcache.index import InMemoryIndex
from llmd.kvcache.indexer import KVCacheIndexer
from llmd.kvcache.ingest import EngineEndpoint, EventApplier, Ingestor
from llmd.kvcache.keys import TokenProcessor
from llmd.kvcache.publisher import KVEventPublisher
from llmd.protocol.kv_events import BlockStored, format_topic
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

MODEL = "m"


def stored(hashes: list[int], tokens: list[int], parent: int | None) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


async def _publish_and_ingest() -> None:
    events, replay = free_port(), free_port()
    ctx = zmq.asyncio.Context()
    pub = KVEventPublisher(
        ctx,
        endpoint=f"tcp://*:{events}",
        replay_endpoint=f"tcp://*:{replay}",
        topic=format_topic("pod-a", MODEL),
    )
    await pub.start()
    index = InMemoryIndex()
    processor = TokenProcessor()
    ingestor = Ingestor(EventApplier(index, processor), shards=1, replay_timeout_s=2.0)
    await ingestor.start()
    ingestor.subscribe(
        EngineEndpoint(
            pod="pod-a", events=f"tcp://127.0.0.1:{events}", replay=f"tcp://127.0.0.1:{replay}"
        )
    )
    indexer = KVCacheIndexer(index, processor)
    tokens = list(range(1, 65))  # four 16-token blocks
    keys = indexer.keys(tokens, MODEL)
    try:
        await asyncio.sleep(0.3)  # the SUB joins (PUB drops what is sent before)
        pub.publish([stored([101], tokens[:16], None)])
        pub.drop_rate = 1.0
        pub.publish([stored([102], tokens[16:32], 101)])  # lost on the wire: a gap
        pub.drop_rate = 0.0
        pub.publish([stored([103, 104], tokens[32:], 102)])
        for _ in range(100):
            await ingestor.drain()
            if indexer.score_sync(keys, None).get("pod-a", None) is not None:
                hit = indexer.score_sync(keys, None)["pod-a"]
                if hit.blocks == 4:
                    break
            await asyncio.sleep(0.05)
        assert indexer.score_sync(keys, None)["pod-a"].blocks == 4
        stream = next(iter(ingestor.snapshot().values()))
        assert stream["gaps"] == 1
        assert stream["replays"] >= 1
        assert pub.dropped == 1
        assert pub.replays_served >= 1
    finally:
        await ingestor.stop()
        await pub.close()
        ctx.term()


def test_published_batches_reach_the_index_and_gaps_are_replayed() -> None:
    asyncio.run(_publish_and_ingest())


async def _restart_after_replay_join() -> None:
    events, replay = free_port(), free_port()
    ctx = zmq.asyncio.Context()
    pub = KVEventPublisher(
        ctx,
        endpoint=f"tcp://*:{events}",
        replay_endpoint=f"tcp://*:{replay}",
        topic=format_topic("pod-a", MODEL),
    )
    await pub.start()
    index = InMemoryIndex()
    processor = TokenProcessor()
    ingestor = Ingestor(EventApplier(index, processor), shards=1, replay_timeout_s=2.0)
    indexer = KVCacheIndexer(index, processor)
    old = list(range(1, 65))
    new = list(range(1001, 1065))
    # the engine ran before the subscriber joined: 4 batches only a replay can deliver
    for i in range(4):
        pub.publish([stored([100 + i], old[16 * i : 16 * (i + 1)], 100 + i - 1 if i else None)])
    await ingestor.start()
    ingestor.subscribe(
        EngineEndpoint(
            pod="pod-a", events=f"tcp://127.0.0.1:{events}", replay=f"tcp://127.0.0.1:{replay}"
        )
    )

    async def blocks(tokens: list[int]) -> int:
        await ingestor.drain()
        hit = indexer.score_sync(indexer.keys(tokens, MODEL), None).get("pod-a")
        return hit.blocks if hit else 0

    try:
        for _ in range(100):  # the join-time replay brings the old engine's four blocks
            if await blocks(old) == 4:
                break
            await asyncio.sleep(0.05)
        assert await blocks(old) == 4
        await asyncio.sleep(0.3)
        # the engine restarts: empty cache, sequence from 0 again, nothing to replay
        pub.reset_sequence()
        for i in range(2):
            pub.publish([stored([900 + i], new[16 * i : 16 * (i + 1)], 900 + i - 1 if i else None)])
        for _ in range(100):
            if await blocks(new) == 2 and await blocks(old) == 0:
                break
            await asyncio.sleep(0.05)
        assert await blocks(new) == 2  # the new engine's batches are not dropped as duplicates
        assert await blocks(old) == 0  # and the old engine's blocks are gone
        stream = next(iter(ingestor.snapshot().values()))
        assert stream["restarts"] == 1
    finally:
        await ingestor.stop()
        await pub.close()
        ctx.term()


def test_an_engine_restart_after_a_replay_join_clears_and_follows_the_new_engine() -> None:
    asyncio.run(_restart_after_replay_join())
