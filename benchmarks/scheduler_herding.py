"""Herding: do bursts of concurrent decisions pile onto one endpoint?

llm-d's scorers read metrics scraped every 50 ms and count a request only after it is sent, so
every decision inside a burst sees the same scores and the max-score picker sends the whole
burst to one endpoint (a known llm-d problem). llmd counts each request against its
endpoint at pick time, breaks ties by outstanding work, and drops overloaded endpoints from the
candidates (a hot prefix spreads instead of queueing on its cache holder).

Setup: 8 llmd-sim servers (h100-8b timing, max 16 running sequences each) in one process, the
real Datastore (scraping /metrics every 50 ms) and Director in this process, requests sent
straight to the picked engine (streaming, so TTFT is measured). Each config gets a fresh fleet.
Workloads: `distinct` = bursts of 64 requests with distinct 512-token prompts; `hot-prefix` =
bursts of 64 requests sharing a 1,536-token prefix. 8 bursts, 1.5 s apart, 128 output tokens.

Configs: `llm-d` = queue 2, kv 2, prefix 3, random tie-break, no pick-time accounting;
`llmd` = the built-in default.

Usage: uv run python benchmarks/scheduler_herding.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmd.dev.sim_engines import SimFleetProcess
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.scheduler.core import build_core

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import machine

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is you that it he was for on are as with his they at be this".split()

LLM_D = """
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
  parameters: {tieBreak: random}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
llmd: {pickTimeAccounting: false}
"""
CONFIGS = {"llm-d": LLM_D, "llmd": None}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def run_config(
    name: str, config: str | None, workload: str, bursts: int, burst_size: int, work: Path
) -> dict[str, Any]:
    fleet = SimFleetProcess.start(
        count=8, block_size=16, profile="h100-8b", work=work, extra_args=["--max-num-seqs", "16"]
    )
    core = build_core(config, refresh_interval_s=0.05)
    ds, director = core.datastore, core.director
    ds.set_endpoints(StaticFileDiscovery(fleet.endpoints_file).load())
    await core.start()
    await asyncio.sleep(0.5)
    rng = random.Random(11)
    hot = words(rng, 1536)
    ttfts: list[float] = []
    e2es: list[float] = []
    shares: list[float] = []
    per_pod_peak: collections.Counter[str] = collections.Counter()
    errors = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(prompt: str) -> str:
                nonlocal errors
                req = director.new_request({}, "/v1/completions")
                req.body = json.dumps(
                    {"model": "tiny", "prompt": prompt, "max_tokens": 128, "stream": True}
                ).encode()
                decision = director.schedule(req)
                ep = decision.endpoints[0]
                per_pod_peak[ep.name] = max(per_pod_peak[ep.name], ep.inflight_requests)
                t0 = time.perf_counter()
                first = 0.0
                try:
                    async with session.post(
                        f"http://{ep.key}/v1/completions",
                        data=req.body,
                        headers={"content-type": "application/json"},
                    ) as resp:
                        if resp.status != 200:
                            errors += 1
                        async for _ in resp.content.iter_any():
                            if not first:
                                first = time.perf_counter() - t0
                    e2es.append(time.perf_counter() - t0)
                    ttfts.append(first)
                finally:
                    director.complete(decision, "natural")
                return ep.name

            tasks: list[asyncio.Task[Any]] = []
            for b in range(bursts):
                if workload == "distinct":
                    prompts = [words(rng, 512) for _ in range(burst_size)]
                else:
                    prompts = [hot + " " + words(rng, 32) for _ in range(burst_size)]
                batch = [asyncio.create_task(one(p)) for p in prompts]
                tasks += batch

                async def share(batch: list[asyncio.Task[str]] = batch) -> None:
                    names = await asyncio.gather(*batch)
                    shares.append(max(collections.Counter(names).values()) / len(names))

                tasks.append(asyncio.create_task(share()))
                if b < bursts - 1:
                    await asyncio.sleep(1.5)
            await asyncio.gather(*tasks)
    finally:
        await core.stop()
        fleet.stop()
    return {
        "config": name,
        "workload": workload,
        "requests": len(e2es),
        "errors": errors,
        "ttft_p50_s": round(pct(ttfts, 0.5), 3),
        "ttft_p99_s": round(pct(ttfts, 0.99), 3),
        "e2e_p50_s": round(pct(e2es, 0.5), 3),
        "e2e_p99_s": round(pct(e2es, 0.99), 3),
        "mean_burst_share_of_busiest_pod": round(statistics.mean(shares), 3),
        "peak_inflight_per_pod": dict(sorted(per_pod_peak.items())),
    }


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    bursts = 3 if args.quick else 8
    results = []
    for workload in ("distinct", "hot-prefix"):
        for name, config in CONFIGS.items():
            with tempfile.TemporaryDirectory() as tmp:
                r = await run_config(name, config, workload, bursts, 64, Path(tmp))
            results.append(r)
            print(
                f"{workload:<10} {name:<6} TTFT p50 {r['ttft_p50_s']:.3f}s "
                f"p99 {r['ttft_p99_s']:.3f}s"
                f"  e2e p99 {r['e2e_p99_s']:.3f}s  busiest pod takes "
                f"{r['mean_burst_share_of_busiest_pod']:.0%} of a burst  errors {r['errors']}",
                flush=True,
            )
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 bursts per run instead of 8")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/scheduler-herding.json"))
    args = p.parse_args()
    results = asyncio.run(amain(args))
    report = {
        "benchmark": "scheduler_herding",
        "command": "uv run python benchmarks/scheduler_herding.py"
        + (" --quick" if args.quick else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
