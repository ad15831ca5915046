"""The index, key computation and event application, in memory and on a real Valkey."""

from __future__ import annotations

import random
import uuid

import pytest

from llmd.kvcache.index import InMemoryIndex, PodEntry, ratio_mapping
from llmd.kvcache.indexer import KVCacheIndexer
from llmd.kvcache.ingest import EventApplier
from llmd.kvcache.keys import TokenProcessor, TokenProcessorConfig, event_block_extras
from llmd.kvcache.valkey import ValkeyIndex, entry_field
from llmd.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from llmd.protocol.request_keys import request_keys

MODEL = "test-model"


def stored(
    hashes: list[int], tokens: list[int], parent: int | None = None, **kw: object
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=kw.pop("block_size", 16),  # type: ignore[arg-type]
        lora_id=None,
        medium=kw.pop("medium", "GPU"),  # type: ignore[arg-type]
        lora_name=kw.pop("lora_name", None),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def batch(*events: object, rank: int = 0) -> EventBatch:
    return EventBatch(ts=1.0, events=list(events), data_parallel_rank=rank)  # type: ignore[arg-type]


def test_llm_d_golden_keys_through_the_processor() -> None:
    p = TokenProcessor()
    assert p.keys(list(range(1, 41)), MODEL) == [9540012594951042066, 16921089685996993662]
    seeded = TokenProcessor(TokenProcessorConfig(hash_seed="42"))
    assert seeded.keys(list(range(1, 41)), MODEL) == [3239622172847516705, 18365376266021390534]


def test_event_extras_strip_the_lora_name_and_digest_bytes() -> None:
    raw = [("sql-lora", ("img1", 3), "salt"), ("sql-lora",), (b"\x01\x02",)]
    assert event_block_extras(raw, "sql-lora", 3) == [["img1", "salt"], None, None]
    assert event_block_extras([("sql-lora",)], "sql-lora", 1) is None
    # two engine blocks per index block: merged; one per two: replicated
    assert event_block_extras([("a",), ("b",)], None, 1) == [["a", "b"]]
    assert event_block_extras([("a",)], None, 2) == [["a"], ["a"]]


def test_ratio_mapping_pairs_blocks_of_different_sizes() -> None:
    assert ratio_mapping([1, 2], [10, 20]) == [(1, 10), (2, 20)]
    assert ratio_mapping([1], [10, 20]) == [(1, 10), (1, 20)]
    assert ratio_mapping([1, 2, 3, 4], [10, 20]) == [(1, 10), (2, 10), (3, 20), (4, 20)]


def test_longest_prefix_is_consecutive_and_tier_weighted() -> None:
    idx = InMemoryIndex()
    keys = [11, 12, 13, 14]
    idx.add_sync(None, keys, PodEntry("a"))
    idx.add_sync(None, keys[:2], PodEntry("b", "cpu"))
    idx.add_sync(None, [11, 13, 14], PodEntry("c"))  # a hole at 12: only block 11 counts
    idx.add_sync(None, keys[:3], PodEntry("b"))  # b has gpu for 3 blocks, cpu for 2
    hits = idx.longest_prefix_sync(keys)
    assert (hits["a"].blocks, hits["a"].score) == (4, 4.0)
    assert (hits["b"].blocks, hits["b"].tiers) == (3, {"gpu": 3})
    assert hits["c"].blocks == 1
    only_cpu = InMemoryIndex()
    only_cpu.add_sync(None, keys, PodEntry("x", "cpu"))
    assert only_cpu.longest_prefix_sync(keys)["x"].score == pytest.approx(3.2)
    assert idx.longest_prefix_sync(keys, pods={"c"}) == {"c": hits["c"]}


def test_index_bounds_evict_least_recent_keys() -> None:
    idx = InMemoryIndex(max_keys=3)
    for k in range(5):
        idx.add_sync(None, [k], PodEntry("a"))
    assert len(idx) == 3
    assert idx.evicted_keys == 2
    assert idx.holders(0) == []
    assert idx.holders(4) == [PodEntry("a")]
    small = InMemoryIndex(max_bytes=10_000)
    small.add_sync(None, list(range(1000)), PodEntry("a"))
    assert small.approx_bytes <= 10_000
    assert small.evicted_keys > 0


async def test_applier_follows_stores_removes_parents_and_clears() -> None:
    idx = InMemoryIndex()
    ap = EventApplier(idx, TokenProcessor())
    toks = list(range(1, 49))
    r = request_keys(toks, MODEL)
    await ap.apply("pod-a", MODEL, batch(stored([101, 102], toks[:32])))
    await ap.apply("pod-a", MODEL, batch(stored([103], toks[32:48], parent=102)))
    assert idx.longest_prefix_sync(r)["pod-a"].blocks == 3
    # duplicate store of block 103: one removal is absorbed, the second evicts
    await ap.apply("pod-a", MODEL, batch(stored([103], toks[32:48], parent=102)))
    await ap.apply("pod-a", MODEL, batch(BlockRemoved(block_hashes=[103], medium="GPU")))
    assert idx.longest_prefix_sync(r)["pod-a"].blocks == 3
    await ap.apply("pod-a", MODEL, batch(BlockRemoved(block_hashes=[103], medium="GPU")))
    assert idx.longest_prefix_sync(r)["pod-a"].blocks == 2
    # a store whose parent is unknown cannot be keyed: skipped, counted
    await ap.apply("pod-a", MODEL, batch(stored([201], toks[:16], parent=999)))
    assert ap.metrics.stores_skipped.labels("missing-parent")._value.get() == 1
    # CPU placeholder (no tokens) for a known engine key: a tier update
    await ap.apply("pod-a", MODEL, batch(stored([101], [], medium="CPU", block_size=0)))
    assert {e.tier for e in idx.holders(r[0])} == {"gpu", "cpu"}
    # DP ranks are separate holders: rank 1's removal leaves rank 0's entry
    await ap.apply("pod-a", MODEL, batch(stored([101, 102], toks[:32]), rank=1))
    await ap.apply("pod-a", MODEL, batch(BlockRemoved(block_hashes=[101], medium="GPU"), rank=1))
    assert PodEntry("pod-a", "gpu", -1, 0) in idx.holders(r[0])
    await ap.apply("pod-a", MODEL, batch(AllBlocksCleared()))
    assert idx.longest_prefix_sync(r) == {}


async def test_lora_blocks_match_the_read_path() -> None:
    idx = InMemoryIndex()
    ap = EventApplier(idx, TokenProcessor())
    toks = list(range(1, 33))
    extra = [("sql-lora",), ("sql-lora",)]
    await ap.apply("p", "base", batch(stored([1, 2], toks, lora_name="sql-lora", extra_keys=extra)))
    keys = TokenProcessor().prompt_keys(toks, "sql-lora")
    assert idx.longest_prefix_sync(keys)["p"].blocks == 2


async def test_speculative_entries_expire_and_yield_to_confirmed_ones() -> None:
    now = [0.0]
    idx = InMemoryIndex()
    ix = KVCacheIndexer(idx, speculative_ttl_s=2.0, clock=lambda: now[0])
    keys = [1, 2, 3]
    ix.speculate_sync(keys, "a")
    assert ix.score_sync(keys, None)["a"].tiers == {"": 3}
    idx.add_sync(None, keys[:2], PodEntry("a"))
    assert ix.score_sync(keys, None)["a"].tiers == {"gpu": 2, "": 1}
    now[0] = 2.5
    assert ix.score_sync(keys, None)["a"].tiers == {"gpu": 2}


def test_bad_predictions_make_a_pod_untrusted_then_trusted_again() -> None:
    idx = InMemoryIndex()
    ix = KVCacheIndexer(idx)
    # over-predictions (blocks evicted between routing and prefill) are not the index's fault
    for _ in range(8):
        ix.observe("a", 256, cached_tokens=0, prompt_tokens=300, engine_block_size=32)
    assert not ix.health["a"].untrusted
    # hits the index knew nothing of (not even speculatively) are
    for _ in range(10):
        ix.observe("a", 0, cached_tokens=256, prompt_tokens=300, engine_block_size=32)
    assert ix.health["a"].untrusted
    assert ix.metrics.resyncs.labels("a")._value.get() == 1
    idx.add_sync(None, [1, 2], PodEntry("a"))
    assert ix.score_sync([1, 2], None)["a"].score == pytest.approx(0.5)
    for _ in range(8):
        ix.observe("a", 256, cached_tokens=256, prompt_tokens=300, engine_block_size=32)
    assert not ix.health["a"].untrusted
    # the last prompt token is never cached: a full-prompt prediction is capped like vLLM's
    ix.observe("b", 64, cached_tokens=32, prompt_tokens=64, engine_block_size=32)
    assert ix.health["b"].errors[-1] == (0, 0)
    assert ix.metrics.predictions.labels("b", "exact")._value.get() == 1
    # a concurrent request's blocks, known only speculatively, explain a larger hit
    ix.observe("b", 0, 128, 200, 32, speculative_tokens=160)
    assert ix.health["b"].errors[-1] == (0, 0)


def test_valkey_fields_are_go_json() -> None:
    assert entry_field(PodEntry("10.0.0.7:8000", "gpu", 0)) == (
        '{"PodIdentifier":"10.0.0.7:8000","DeviceTier":"gpu","Speculative":false,'
        '"HasGroup":true,"GroupIdx":0}'
    )


async def test_valkey_backend_matches_the_in_memory_one(valkey_url: str) -> None:
    vk = ValkeyIndex(valkey_url, prefix=f"t{uuid.uuid4().hex[:6]}:")
    mem = InMemoryIndex()
    try:
        toks = list(range(1, 65))
        r = request_keys(toks, MODEL)
        for index in (mem, vk):
            ap = EventApplier(index, TokenProcessor())
            await ap.apply("a", MODEL, batch(stored([1, 2, 3, 4], toks)))
            await ap.apply("b", MODEL, batch(stored([1, 2], toks[:32], medium="CPU")))
            await ap.apply("a", MODEL, batch(BlockRemoved(block_hashes=[4], medium="GPU")))
        want = await mem.longest_prefix(r)
        got = await vk.longest_prefix(r)
        assert got == want
        assert got["a"].blocks == 3
        assert got["b"].score == pytest.approx(1.6)
        assert await vk.longest_prefix(r, pods={"b"}) == {"b": want["b"]}
        assert await vk.request_key(3) == r[2]
        assert await vk.clear("a") == 3
        assert set(await vk.longest_prefix(r)) == {"b"}
        vk.pod_ttl_s = 0
        assert await vk.janitor(live={"c"}) == ["b"]
        assert await vk.longest_prefix(r) == {}
    finally:
        await vk.close()


async def test_valkey_lookup_agrees_with_the_in_memory_one_on_random_fleets(
    valkey_url: str,
) -> None:
    """Random holders per block (GPU, CPU, storage and speculative entries, removals, nested
    and overlapping prefixes) on both backends; every lookup, with and without a pod filter
    and with other tier weights, must give the same hits."""
    rng = random.Random(11)
    tag = uuid.uuid4().hex[:6]
    mixed = 0
    for round_ in range(6):
        mem = InMemoryIndex()
        vk = ValkeyIndex(valkey_url, prefix=f"r{tag}{round_}:")
        try:
            keys = [rng.getrandbits(63) for _ in range(40)]
            pods = [f"10.2.0.{i}:8000" for i in range(12)]
            for _ in range(60):
                pod = rng.choice(pods)
                tier = rng.choice(["gpu", "gpu", "gpu", "cpu", "storage"])
                entry = PodEntry(pod, tier, speculative=rng.random() < 0.1)
                if entry.speculative:
                    entry = entry._replace(tier="")
                start = rng.randrange(0, 8) if rng.random() < 0.2 else 0
                chain = keys[start : start + rng.randrange(1, len(keys))]
                for index in (mem, vk):
                    await index.add(None, chain, entry)
                if rng.random() < 0.15:
                    gone = chain[rng.randrange(len(chain)) :]
                    for index in (mem, vk):
                        await index.evict_request_keys(gone, entry)
            for query, kw in (
                (keys, {}),
                (keys[: rng.randrange(1, 40)], {}),
                (keys, {"pods": set(rng.sample(pods, 4))}),
                (keys, {"weights": {"gpu": 1.0, "cpu": 0.5, "storage": 0.25, "": 0.9}}),
            ):
                want = await mem.longest_prefix(query, **kw)  # type: ignore[arg-type]
                got = await vk.longest_prefix(query, **kw)  # type: ignore[arg-type]
                assert set(got) == set(want), (round_, kw)
                for pod, hit in want.items():
                    assert got[pod].blocks == hit.blocks, (round_, pod)
                    assert got[pod].tiers == hit.tiers, (round_, pod)
                    assert got[pod].score == pytest.approx(hit.score), (round_, pod)
                    mixed += set(hit.tiers) != {"gpu"}
        finally:
            await vk.close()
    assert mixed > 10  # the walk met CPU, storage and speculative holders, not only GPU ones


async def test_valkey_lookup_reads_set_texts_written_without_the_tier_header(
    valkey_url: str,
) -> None:
    """A replica from before the set texts carried their `!g`/`!m` header may still be writing
    to the same server: its texts are read correctly (the header is then worked out)."""
    vk = ValkeyIndex(valkey_url, prefix=f"h{uuid.uuid4().hex[:6]}:")
    try:
        keys = [101, 102, 103, 104]
        await vk.add(None, keys, PodEntry("a"))
        await vk.add(None, keys[:3], PodEntry("b", "cpu"))
        want = await vk.longest_prefix(keys)
        # rewrite every set text the old way: no header, no newline at either end
        for name in [k async for k in vk.redis.scan_iter(match=f"{vk.prefix}set:*")]:
            body = (await vk.redis.get(name)).decode()
            assert body.startswith(("!g\n", "!m\n"))
            await vk.redis.set(name, body[3:].rstrip("\n"))
        got = await vk.longest_prefix(keys)
        assert got == want
        assert got["a"].blocks == 4
        assert got["b"].tiers == {"cpu": 3}
    finally:
        await vk.close()


async def test_speculative_entries_past_the_bound_are_evicted_from_shared_indexes(
    valkey_url: str,
) -> None:
    vk = ValkeyIndex(valkey_url, prefix=f"s{uuid.uuid4().hex[:6]}:")
    try:
        ix = KVCacheIndexer(vk, speculative_ttl_s=60, max_speculative=1)
        await ix.speculate([1, 2], "a")
        await ix.speculate([7, 8], "b")  # pushes a's entry out of the bound: gone from Valkey
        assert await vk.longest_prefix([1, 2]) == {}
        assert (await vk.longest_prefix([7, 8]))["b"].blocks == 2
    finally:
        await vk.close()


async def test_a_shared_volume_credits_every_pod_of_its_storage_domain() -> None:
    """llmd-fs-offload's STORAGE events (ownership fs:<domain>) belong to the domain; any pod
    labelled with it is credited; the evictor's removals (another publisher) take them away."""
    idx = InMemoryIndex()
    ap = EventApplier(idx, TokenProcessor())
    ix = KVCacheIndexer(idx)
    toks = list(range(1, 49))
    r = request_keys(toks, MODEL)
    await ap.apply("pod-a", MODEL, batch(stored([101, 102, 103], toks)))
    # A's tier wrote the three blocks to the shared volume of domain "vol", in two files
    # (vLLM's self-describing events: one event per file, naming its blocks)
    first = stored([101, 102], [], medium="STORAGE", block_size=0, ownership="fs:vol")
    second = stored([103], [], medium="STORAGE", block_size=0, ownership="fs:vol")
    await ap.apply("pod-a", MODEL, batch(first, second))
    assert {e.pod for e in idx.holders(r[0])} == {"pod-a", "storage:vol"}
    # A evicts them from its GPU: only the volume holds them now
    await ap.apply("pod-a", MODEL, batch(BlockRemoved(block_hashes=[101, 102, 103], medium="GPU")))
    domains = {"pod-a": "vol", "pod-b": "vol", "pod-c": "other"}
    hits = ix.score_sync(r, ["pod-a", "pod-b", "pod-c"], domains)
    assert set(hits) == {"pod-a", "pod-b"}, "pod-c mounts another volume"
    assert hits["pod-b"].blocks == 3
    assert hits["pod-b"].tiers == {"storage": 3}
    # a scheduler's measured storage weight overrides the configured one for its call only
    weighed = await ix.score(r, ["pod-b"], domains, {"storage": 0.5})
    assert weighed["pod-b"].score == pytest.approx(1.5)
    assert ix.score_sync(r, ["pod-b"], domains)["pod-b"].score == pytest.approx(3.0)
    assert ix.score_sync(r, ["pod-b"]) == {}, "without its domain a pod has no claim on the volume"
    # the evictor publishes on its own topic; the domain in the ownership finds the entries
    removed = BlockRemoved(block_hashes=[103], medium="STORAGE", ownership="fs:vol")
    await ap.apply("llmd-fs-evictor-0", MODEL, batch(removed))
    assert ix.score_sync(r, ["pod-b"], domains)["pod-b"].blocks == 2
    # a pod's own GPU blocks still count when they are worth more than the volume's
    await ap.apply("pod-b", MODEL, batch(stored([101, 102, 103], toks)))
    assert ix.score_sync(r, ["pod-b"], domains)["pod-b"].tiers == {"gpu": 3}


async def test_the_evictor_removes_a_whole_chunk_however_many_pods_announced_it() -> None:
    """A file holds a chunk of blocks and is named by the last; every pod of the domain may
    announce it (a store of an existing file touches it). One removal takes the whole chunk."""
    idx = InMemoryIndex()
    ap = EventApplier(idx, TokenProcessor())
    ix = KVCacheIndexer(idx)
    toks = list(range(1, 49))
    r = request_keys(toks, MODEL)
    await ap.apply("pod-a", MODEL, batch(stored([101, 102, 103], toks)))
    chunk = stored([101, 102], [], medium="STORAGE", block_size=0, ownership="fs:vol")
    tail = stored([103], [], medium="STORAGE", block_size=0, ownership="fs:vol")
    await ap.apply("pod-a", MODEL, batch(chunk, tail))
    await ap.apply("pod-b", MODEL, batch(chunk, tail))  # B found the files there
    domains = {"pod-c": "vol"}
    assert ix.score_sync(r, ["pod-c"], domains)["pod-c"].blocks == 3
    evicted = BlockRemoved(block_hashes=[102], medium="STORAGE", ownership="fs:vol")
    await ap.apply("evictor", MODEL, batch(evicted))
    assert ix.score_sync(r, ["pod-c"], domains) == {}, "blocks 101 and 102 went with their file"
