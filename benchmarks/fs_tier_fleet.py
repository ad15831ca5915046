"""The shared storage tier at fleet scale, on simulated engines: llm-d's "performance floor".

A fleet of simulated vLLM servers (profile h100-8b: an 8B model on one H100, 131 kB of KV per
token) serves users that each come back, turn after turn, with their own long context (8,192
tokens by default) and a new question (256 tokens), asking for one output token (what llm-d's
storage benchmark does: the cost is all prefill). Users are pinned to a server (as a prefix-aware
router would), so a server's HBM holds its users' contexts until there are more users than fit.

Two fleets, the same in all else: GPU only, and GPU plus a shared volume (llmd-fs-offload
simulated: 10 GB/s reads and writes per server, 1 ms latency, room for every context; a block is
found once its write has finished; `--volume-read-gbps` caps the volume itself). Past the point
where the working set exceeds the fleet's HBM, the first recomputes every returning context; the
second loads it from the volume. Reported per user count: throughput (requests/s and prompt
tokens/s, in simulated time), mean and p90 TTFT (client side, simulated time) and the engines'
own mean TTFT, and the ratio of the two fleets; drawn as a PNG.

Usage: uv run python benchmarks/fs_tier_fleet.py [--users 4,8,16,32,64,128] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.sim.config import SimServerConfig
from llmd.sim.fleet import SimFleet, fleet_configs
from llmd.sim.storage import StorageConfig
from llmd.vllm_cpu.server import free_port

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine_ttft_mean(text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:time_to_first_token_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:time_to_first_token_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def run_point(users: int, *, storage: bool, args: argparse.Namespace) -> dict[str, Any]:
    base = SimServerConfig(
        port=free_port(),
        served_model_name="m",
        profile="h100-8b",
        block_size=BLOCK,
        num_gpu_blocks_override=args.gpu_tokens // BLOCK,
        max_model_len=args.context + args.question + 64,
        enable_prompt_tokens_details=True,
        speed=args.speed,
        side_channel_port=free_port(),
        storage=StorageConfig(
            domain="bench",
            capacity_tokens=50_000_000,
            read_gbps=args.read_gbps,
            write_gbps=args.write_gbps,
            volume_read_gbps=args.volume_read_gbps,
        )
        if storage
        else None,
    )
    configs = [
        c.model_copy(update={"port": free_port(), "side_channel_port": free_port()})
        for c in fleet_configs(base, args.servers)
    ]
    fleet = SimFleet(configs)
    await fleet.start()
    rng = random.Random(users)
    contexts = [[rng.randrange(1000, 30000) for _ in range(args.context)] for _ in range(users)]
    ttfts: list[float] = []
    cached = 0
    try:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1000)) as c:

            async def user(u: int) -> None:
                nonlocal cached
                server = fleet.servers[u % len(fleet.servers)]
                for turn in range(args.turns):
                    question = [rng.randrange(1000, 30000) for _ in range(args.question)]
                    body = {"model": "m", "prompt": contexts[u] + question, "max_tokens": 1}
                    t = time.perf_counter()
                    r = await c.post(f"{server.url}/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    if turn:  # the first turn computes the context everywhere
                        ttfts.append((time.perf_counter() - t) * args.speed)
                    cached += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

            started = time.perf_counter()
            await asyncio.gather(*(user(u) for u in range(users)))
            wall = time.perf_counter() - started
            engine_sum = engine_count = 0.0
            for s in fleet.servers:
                es, ec = engine_ttft_mean((await c.get(f"{s.url}/metrics")).text)
                engine_sum += es
                engine_count += ec
    finally:
        await fleet.stop()
    simulated = wall * args.speed
    requests = users * args.turns
    prompt_tokens = requests * (args.context + args.question)
    return {
        "users": users,
        "fleet": "gpu+storage" if storage else "gpu-only",
        "requests": requests,
        "simulated_s": round(simulated, 2),
        "requests_per_s": round(requests / simulated, 2),
        "prompt_tokens_per_s": round(prompt_tokens / simulated),
        "cached_share": round(cached / prompt_tokens, 3),
        "ttft_mean_s": round(sum(ttfts) / len(ttfts), 3),
        "ttft_p90_s": round(pct(ttfts, 0.9), 3),
        "engine_ttft_mean_s": round(engine_sum / engine_count, 3) if engine_count else None,
    }


def plot(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for fleet, style in (("gpu-only", "o-"), ("gpu+storage", "s-")):
        pts = [r for r in rows if r["fleet"] == fleet]
        xs = [r["users"] for r in pts]
        ax1.plot(xs, [r["prompt_tokens_per_s"] for r in pts], style, label=fleet)
        ax2.plot(xs, [r["ttft_mean_s"] for r in pts], style, label=fleet)
    fit = args.servers * args.gpu_tokens // (args.context + args.question)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("users")
        ax.axvline(fit, color="grey", linestyle=":", label=f"HBM holds ~{fit} users")
        ax.legend()
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("prompt tokens/s (simulated)")
    ax2.set_ylabel("mean TTFT of returning users, s")
    ax2.set_yscale("log")
    fig.suptitle(
        f"{args.servers} simulated H100s (8B model), {args.context}-token contexts: "
        "GPU only vs GPU + shared volume"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"plot: {out}")


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for users in [int(u) for u in args.users.split(",")]:
        for storage in (False, True):
            row = await run_point(users, storage=storage, args=args)
            rows.append(row)
            print(
                f"{users:>4} users {row['fleet']:<12} {row['prompt_tokens_per_s']:>9} tok/s "
                f"{row['requests_per_s']:>7} req/s  TTFT mean {row['ttft_mean_s']:.3f}s "
                f"p90 {row['ttft_p90_s']:.3f}s (engines {row['engine_ttft_mean_s']}s) "
                f"cached {row['cached_share']:.0%}",
                flush=True,
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="4,8,16,32,64,128", help="user counts, comma-separated")
    p.add_argument("--turns", type=int, default=4, help="requests per user (the first warms)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--context", type=int, default=8192, help="tokens of each user's context")
    p.add_argument("--question", type=int, default=256, help="new tokens per turn")
    p.add_argument("--gpu-tokens", type=int, default=65536, help="KV tokens per server's HBM")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per wall second (above 1 the client's and server's own CPU time "
        "is scaled up too and distorts the figures)",
    )
    p.add_argument("--read-gbps", type=float, default=10.0, help="volume reads per server, GB/s")
    p.add_argument("--write-gbps", type=float, default=10.0, help="volume writes per server, GB/s")
    p.add_argument(
        "--volume-read-gbps",
        type=float,
        default=None,
        help="the volume's own read bandwidth, shared by all servers (default: unlimited)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "fs-tier-fleet.json"))
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    ratios = []
    for users in sorted({r["users"] for r in rows}):
        g, s = (
            next(r for r in rows if r["users"] == users and r["fleet"] == f)
            for f in ("gpu-only", "gpu+storage")
        )
        ratios.append(
            {
                "users": users,
                "throughput_x": round(s["prompt_tokens_per_s"] / g["prompt_tokens_per_s"], 2),
                "ttft_x": round(g["ttft_mean_s"] / s["ttft_mean_s"], 2),
            }
        )
    for r in ratios:
        print(
            f"{r['users']:>4} users: storage gives {r['throughput_x']}x throughput, "
            f"{r['ttft_x']}x lower TTFT"
        )
    out = Path(args.out)
    write_report(
        out,
        "fs-tier-fleet",
        "uv run python benchmarks/fs_tier_fleet.py " + shlex.join(sys.argv[1:]),
        settings=vars(args),
        rows=rows,
        ratios=ratios,
    )
    plot(rows, out.with_suffix(".png"), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
