"""Precise vs approximate prefix routing vs round-robin, under KV-cache pressure.

llm-d's "KV-cache wins you can see" scenario (150 groups x 6,000-token shared prefixes over 8
servers, where the groups' KV is ~3x one server's cache) scaled to one machine: 4 llmd-sim
servers with the h100-32b-tp2 timing profile and 2,000 KV blocks of 16 tokens each (32k tokens
per server), 24 groups x a ~4,000-token system prompt (the groups need ~3 servers' worth of KV),
5 users per group asking ~400-token questions, 64 output tokens, Poisson arrivals near
round-robin's saturation. Every config gets a fresh fleet and the same seeded trace.

- `round-robin`: requests cycle over the servers (a Kubernetes Service).
- `approximate`: llmd's default config (queue 2, kv 2, prefix 3 with the approximate
  prefix index, pick-time accounting).
- `precise`: the same scorers, `prefix-cache-scorer` fed by `precise-prefix-cache-producer`
  (the sims' own KV events, in-memory index, speculative entries).

Scheduling runs in this process (the real Datastore scraping /metrics every 50 ms, the real
Director and plugins); requests stream straight to the picked server; TTFT is the first byte.
The hit rate is the engines' own `cached_tokens` / `prompt_tokens`.

Usage: uv run python benchmarks/precise_routing.py [--quick] [--rate R] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmd.bench.cli import PRECISE_CONFIG
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol.openai import Usage, usage_from_body
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.scheduler.core import build_core
from llmd.sim.tokenizer import default_tokenizer_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report
from scheduler_herding import pct

ROOT = Path(__file__).resolve().parent.parent
SERVERS = 4
GPU_BLOCKS = 2000
GROUPS = 40
USERS = 5
PREFIX_WORDS = 700  # ~4,000 tokens with the tiny tokenizer
QUESTION_WORDS = 70  # ~400 tokens
OUTPUT_TOKENS = 64

PRECISE = PRECISE_CONFIG.format(tokenizer=default_tokenizer_dir())
CONFIGS: dict[str, str | None] = {"round-robin": None, "approximate": None, "precise": PRECISE}


def trace(rng: random.Random, n: int, rate: float) -> list[tuple[float, str]]:
    vocab = [f"w{i}" for i in range(4000)]
    prefixes = [" ".join(rng.choices(vocab, k=PREFIX_WORDS)) for _ in range(GROUPS)]
    out = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        g = rng.randrange(GROUPS)
        u = rng.randrange(USERS)
        q = " ".join(rng.choices(vocab, k=QUESTION_WORDS))
        out.append((t, f"{prefixes[g]}\nuser {u}: {q}"))
    return out


async def run_config(name: str, arrivals: list[tuple[float, str]], work: Path) -> dict[str, Any]:
    fleet = SimFleetProcess.start(
        count=SERVERS,
        block_size=16,
        profile="h100-32b-tp2",
        work=work,
        extra_args=["--num-gpu-blocks-override", str(GPU_BLOCKS), "--max-num-seqs", "32"],
    )
    core = build_core(CONFIGS[name], refresh_interval_s=0.05)
    ds, director = core.datastore, core.director
    ds.set_endpoints(StaticFileDiscovery(fleet.endpoints_file).load())
    await core.start()
    await asyncio.sleep(1.5)  # scrapes and KV subscriptions settle
    rr = itertools.cycle(sorted(ds.all(), key=lambda e: e.name))
    ttfts: list[float] = []
    tpots: list[float] = []
    prompt_tokens = cached_tokens = output_tokens = errors = 0
    sched_ms: list[float] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(prompt: str) -> None:
                nonlocal prompt_tokens, cached_tokens, output_tokens, errors
                body = json.dumps(
                    {
                        "model": "tiny",
                        "prompt": prompt,
                        "max_tokens": OUTPUT_TOKENS,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                ).encode()
                decision = None
                t_s = time.perf_counter()
                if name == "round-robin":
                    key = next(rr).key
                else:
                    req = director.new_request({}, "/v1/completions")
                    req.body = body
                    decision = director.schedule(req)
                    key = decision.endpoints[0].key
                sched_ms.append((time.perf_counter() - t_s) * 1000)
                t0 = time.perf_counter()
                first = 0.0
                usage: Usage | None = None
                try:
                    async with session.post(
                        f"http://{key}/v1/completions",
                        data=body,
                        headers={"content-type": "application/json"},
                    ) as resp:
                        if resp.status != 200:
                            errors += 1
                            return
                        async for line in resp.content:
                            if not first:
                                first = time.perf_counter() - t0
                            if line.startswith(b"data: {") and b'"usage":{' in line:
                                usage = usage_from_body(line, stream=True) or usage
                    done = time.perf_counter() - t0
                    ttfts.append(first)
                    if usage is not None:
                        prompt_tokens += usage.prompt_tokens
                        output_tokens += usage.completion_tokens
                        cached_tokens += usage.cached_tokens
                        if usage.completion_tokens > 1:
                            tpots.append((done - first) / (usage.completion_tokens - 1))
                finally:
                    if decision is not None:
                        director.complete(decision, "natural", usage)

            start = time.perf_counter()
            tasks = []
            for at, prompt in arrivals:
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(prompt)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
    finally:
        await core.stop()
        fleet.stop()
    return {
        "config": name,
        "requests": len(arrivals),
        "errors": errors,
        "ttft_p50_s": round(pct(ttfts, 0.5), 3),
        "ttft_p90_s": round(pct(ttfts, 0.9), 3),
        "ttft_p99_s": round(pct(ttfts, 0.99), 3),
        "ttft_mean_s": round(sum(ttfts) / len(ttfts), 3) if ttfts else None,
        "tpot_p50_ms": round(pct(tpots, 0.5) * 1000, 2),
        "tpot_p90_ms": round(pct(tpots, 0.9) * 1000, 2),
        "output_tokens_per_s": round(output_tokens / wall, 1),
        "prefix_hit_rate": round(cached_tokens / prompt_tokens, 3) if prompt_tokens else None,
        "scheduling_ms_p50": round(pct(sched_ms, 0.5), 3),
        "wall_s": round(wall, 1),
    }


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    n = 120 if args.quick else 360
    arrivals = trace(random.Random(7), n, args.rate)
    results = []
    for name in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            r = await run_config(name, arrivals, Path(tmp))
        results.append(r)
        print(
            f"{name:<12} TTFT p50 {r['ttft_p50_s']:.3f}s p90 {r['ttft_p90_s']:.3f}s "
            f"p99 {r['ttft_p99_s']:.3f}s  TPOT p50 {r['tpot_p50_ms']:.1f}ms  "
            f"{r['output_tokens_per_s']:.0f} out tok/s  hit {r['prefix_hit_rate']:.0%}  "
            f"errors {r['errors']}",
            flush=True,
        )
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="120 requests instead of 360")
    p.add_argument("--rate", type=float, default=10.0, help="Poisson arrival rate (req/s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/precise-routing.json"))
    args = p.parse_args()
    results = asyncio.run(amain(args))
    write_report(
        args.out,
        "precise_routing",
        "uv run python benchmarks/precise_routing.py"
        + (" --quick" if args.quick else "")
        + (f" --rate {args.rate:g}" if args.rate != 10.0 else ""),
        scenario={
            "servers": SERVERS,
            "profile": "h100-32b-tp2",
            "kv_tokens_per_server": GPU_BLOCKS * 16,
            "groups": GROUPS,
            "users_per_group": USERS,
            "prefix_words": PREFIX_WORDS,
            "question_words": QUESTION_WORDS,
            "output_tokens": OUTPUT_TOKENS,
            "rate_per_s": args.rate,
        },
        results=results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
