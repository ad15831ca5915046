"""How many simulated servers and requests per second one core of llmd-sim sustains.

Each scenario starts `llmd-sim --count N` pinned to one core (the load generator runs on another),
sends Poisson traffic spread over the N servers (512-token prompts, half of them sharing a
256-token prefix, 64 output tokens, h100-8b profile), and records the achieved request rate, the
simulator's CPU use (from /proc), and the client-side latency. While the simulator core is not
saturated the modelled latency is what clients see, whatever N is; requests/s per core is the
achieved rate divided by the CPU share used.

Usage: uv run python benchmarks/sim_capacity.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import machine

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is you that it he was for on are as with his they at be this".split()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def prompt(rng: random.Random, shared: str) -> str:
    own = " ".join(rng.choice(WORDS) for _ in range(256))
    return (shared + " " + own) if rng.random() < 0.5 else own + " " + own


async def drive(
    urls: list[str], rate: float, duration: float, stream: bool, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    shared = " ".join(rng.choice(WORDS) for _ in range(256))
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    tasks: list[asyncio.Task[None]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(url: str, text: str) -> None:
            nonlocal errors
            body = {"prompt": text, "max_tokens": 64, "ignore_eos": True, "stream": stream}
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", json=body) as r:
                    if r.status != 200:
                        errors += 1
                        return
                    if stream:
                        first = True
                        async for _ in r.content.iter_any():
                            if first:
                                ttfts.append(time.perf_counter() - t0)
                                first = False
                    else:
                        await r.read()
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        next_at = start
        i = 0
        while next_at - start < duration:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(urls[i % len(urls)], prompt(rng, shared))))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "sent": i,
        "completed": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
        "e2e_p50_s": statistics.median(latencies) if latencies else None,
        "e2e_p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
    }


def start_sim(count: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    port = 20000 + random.Random().randrange(0, 5000)
    events = {
        "enable_kv_cache_events": True,
        "endpoint": f"tcp://*:{port + 10000}",
        "replay_endpoint": f"tcp://*:{port + 20000}",
    }
    cmd = [
        sys.executable, "-m", "llmd.sim.cli", "--count", str(count), "--port", str(port),
        "--profile", "h100-8b", "--enable-prompt-tokens-details", "--log-level", "WARNING",
        "--side-channel-port", str(port + 30000), "--kv-events-config", json.dumps(events),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "ready" not in line:
        proc.kill()
        rest = proc.stdout.read().decode(errors="replace")
        raise RuntimeError(f"llmd-sim did not start: {line}{rest[-3000:]}")
    return proc, [f"http://127.0.0.1:{port + i}" for i in range(count)]


def scenario(count: int, rate_per_server: float, duration: float, stream: bool) -> dict[str, Any]:
    proc, urls = start_sim(count)
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        result = asyncio.run(drive(urls, rate_per_server * count, duration, stream, seed=count))
        cpu = cpu_seconds(proc.pid) - cpu0
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    rps = result["completed"] / result["elapsed_s"]
    share = cpu / wall
    return {
        "servers": count,
        "stream": stream,
        "offered_rps": rate_per_server * count,
        "achieved_rps": round(rps, 1),
        "sim_cpu_share": round(share, 3),
        "rps_per_core": round(rps / share, 1) if share > 0 else None,
        "output_tokens_per_s_per_core": round(64 * rps / share) if share > 0 else None,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs (smoke)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/reports/sim-capacity.json"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})  # the generator stays off the simulator's core
    duration = 3.0 if args.quick else 15.0
    plan = [
        (1, 4.0, False),
        (8, 4.0, False),
        (32, 4.0, False),
        (64, 4.0, False),
        (8, 4.0, True),
        (32, 8.0, False),
    ]
    rows = []
    for count, rate, stream in plan:
        print(
            f"  {count} server(s), {rate * count:.0f} req/s offered, stream={stream} ...",
            flush=True,
        )
        rows.append(scenario(count, rate, duration, stream))
    report = {
        "benchmark": "sim-capacity",
        "command": "uv run python benchmarks/sim_capacity.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "workload": "Poisson arrivals over N servers; 512-token prompts (half share a 256-token "
        "prefix), 64 output tokens, profile h100-8b, KV events on",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        "\n| servers | stream | offered req/s | achieved req/s | sim CPU | req/s per core "
        "| out tok/s per core | e2e p50 | e2e p99 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['servers']} | {r['stream']} | {r['offered_rps']:.0f} | {r['achieved_rps']} | "
            f"{r['sim_cpu_share']:.0%} | {r['rps_per_core']} | "
            f"{r['output_tokens_per_s_per_core']} | "
            f"{r['e2e_p50_s']:.3f} s | {r['e2e_p99_s']:.3f} s |"
        )
    print(f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
