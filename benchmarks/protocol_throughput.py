"""Throughput of llmd.protocol's hot paths: block hashing, request keys, event decoding, metrics.

Usage: uv run python benchmarks/protocol_throughput.py [--quick] [--out FILE]
Prints a Markdown table and writes a JSON report (command, versions, machine, figures).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llmd.protocol.hashing import vllm_block_hashes
from llmd.protocol.kv_events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    encode_batch,
)
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.protocol.request_keys import request_keys

ROOT = Path(__file__).resolve().parent.parent
METRICS_PAGE = ROOT / "libs/protocol/tests/data/vllm-0.32-metrics.txt"


def timed(fn: Callable[[], object], min_time_s: float, min_runs: int = 5) -> list[float]:
    """Per-call seconds over repeated runs (at least `min_runs`, at least `min_time_s`)."""
    runs: list[float] = []
    started = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - started < min_time_s:
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def machine() -> dict[str, Any]:
    """Where a benchmark ran (CPU, cores, Python, platform, commit): llmd-bench's record."""
    from llmd.bench.cli import machine as bench_machine

    return bench_machine()


def write_report(out: str | Path, name: str, command: str, **fields: Any) -> None:
    """The JSON report every benchmark writes: what ran, when, where, and its results."""
    report = {
        "benchmark": name,
        "command": command,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **fields,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")


def hashing_rows(min_time_s: float) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows = []
    for n_tokens in (2_000, 8_000, 100_000):
        tokens = [rng.randrange(150_000) for _ in range(n_tokens)]
        cases: list[tuple[str, Callable[[list[int]], object]]] = [
            ("vLLM sha256 (block 16)", functools.partial(vllm_block_hashes, block_size=16)),
            (
                "vLLM sha256_cbor (block 16)",
                functools.partial(vllm_block_hashes, block_size=16, algo="sha256_cbor"),
            ),
            ("llm-d cbor-fnv keys (block 16)", functools.partial(request_keys, model="m")),
            (
                "llm-d xxh64 keys (block 16)",
                functools.partial(request_keys, model="m", algo="xxh64"),
            ),
            (
                "llm-d cbor-fnv keys (block 64)",
                functools.partial(request_keys, model="m", block_size=64),
            ),
        ]
        for name, fn in cases:
            runs = timed(functools.partial(fn, tokens), min_time_s)
            med = statistics.median(runs)
            rows.append(
                {
                    "what": name,
                    "tokens": n_tokens,
                    "median_ms": round(med * 1e3, 3),
                    "p99_ms": round(sorted(runs)[int(0.99 * (len(runs) - 1))] * 1e3, 3),
                    "mtokens_per_s": round(n_tokens / med / 1e6, 2),
                }
            )
    return rows


def decode_rows(min_time_s: float) -> list[dict[str, Any]]:
    rng = random.Random(1)
    rows = []
    for blocks_per_event, events in ((4, 1), (64, 1), (1, 64)):
        evs: list[BlockStored | BlockRemoved] = []
        for i in range(events):
            evs.append(
                BlockStored(
                    block_hashes=[rng.getrandbits(64) for _ in range(blocks_per_event)],
                    parent_block_hash=rng.getrandbits(64) if i else None,
                    token_ids=[rng.randrange(150_000) for _ in range(16 * blocks_per_event)],
                    block_size=16,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                    extra_keys=[None] * blocks_per_event,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        payload = encode_batch(EventBatch(ts=time.time(), events=list(evs), data_parallel_rank=0))
        runs = timed(functools.partial(decode_batch, payload), min_time_s, min_runs=200)
        med = statistics.median(runs)
        blocks = blocks_per_event * events
        rows.append(
            {
                "what": f"decode batch: {events} BlockStored x {blocks_per_event} blocks of 16",
                "payload_bytes": len(payload),
                "median_us": round(med * 1e6, 2),
                "batches_per_s": round(1 / med),
                "blocks_per_s": round(blocks / med),
            }
        )
    return rows


def metrics_rows(min_time_s: float) -> list[dict[str, Any]]:
    page = METRICS_PAGE.read_text()

    def full_parse() -> None:
        for fam in text_string_to_metric_families(page):
            for _ in fam.samples:
                pass

    rows = []
    for name, fn in (
        ("llmd parse_engine_snapshot", lambda: parse_engine_snapshot(page)),
        ("prometheus_client parser (whole page)", full_parse),
    ):
        runs = timed(fn, min_time_s, min_runs=20)
        med = statistics.median(runs)
        rows.append(
            {
                "what": name,
                "page_lines": page.count("\n"),
                "median_us": round(med * 1e6, 1),
                "pages_per_s": round(1 / med),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/reports/protocol-throughput.json",
        help="where to write the JSON report",
    )
    args = parser.parse_args()
    min_time_s = 0.05 if args.quick else 1.0
    print("measuring hashing...", file=sys.stderr, flush=True)
    hashing = hashing_rows(min_time_s)
    print("measuring event decoding...", file=sys.stderr, flush=True)
    decoding = decode_rows(min_time_s)
    print("measuring metrics parsing...", file=sys.stderr, flush=True)
    metrics = metrics_rows(min_time_s)
    mach = machine()
    report: dict[str, Any] = {
        "command": "uv run python benchmarks/protocol_throughput.py"
        + (" --quick" if args.quick else ""),
        "machine": mach,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hashing": hashing,
        "decoding": decoding,
        "metrics_parsing": metrics,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"## llmd.protocol throughput ({mach['cpu']}, {mach['cores']} cores)", end="\n\n")
    print(table(hashing), "\n")
    print(table(decoding), "\n")
    print(table(metrics), "\n")
    print(f"report: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
