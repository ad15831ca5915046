"""Warm start: time to first token of the first requests a new replica gets for the pool's hot
prefixes, with and without llmd-activator's warm start, with and without an FS tier.

Each round of each mode starts a fresh local pool of simulated engines (`llmd-sim`, h100-8b
profile, one process each). The first replica serves `--prefixes` hot prompts of
~`--prefix-words` words once (with an FS tier they are stored on the shared volume). Then the
pool is scaled to 2; `--delay` seconds after the new replica first answers `/health`, one user
request per hot prefix (the prefix plus a question, streamed) is sent to the new replica, all at
once, and their times to first token are measured. Modes:

- `cold`: no FS tier, no warm start: the new replica computes every prefix;
- `fs`: the replicas share a simulated FS-tier volume (`--storage-dir`): the new replica loads
  the prefixes from it when the requests come;
- `warm`: the same volume, and llmd-activator (`--warm-prompts-file`) sends every hot prompt to
  the new replica with max_tokens 1 as soon as it answers: the prefixes are loaded (from the
  volume) before the users' requests come;
- `warm-nofs`: warm start without an FS tier: the warm-up computes the prefixes.

Reported per mode and delay: TTFT p50 / max over the rounds' requests, the engine's own prompt
tokens by source for those requests (device = GPU prefix cache, disk = loaded from the volume,
computed), and how long the warm-up took.

Usage: uv run python benchmarks/warm_start.py [--rounds N] [--delays 0,1] [--modes ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.protocol.metrics import parse_samples
from llmd.runtime.discovery import Endpoint
from llmd.vllm_cpu.server import free_port

MODES = ("cold", "fs", "warm", "warm-nofs")
TOPICS = ("garden tools", "travel insurance", "tax returns", "cloud billing", "pet food")


def hot_prompts(n: int, words: int) -> list[str]:
    filler = "the of and to in is was for on that with as by at from this are were".split()
    out = []
    for i in range(n):
        head = f"You are the support agent of a company that sells {TOPICS[i % len(TOPICS)]}. "
        body = " ".join(filler[(i * 7 + k) % len(filler)] for k in range(words))
        out.append(f"[{i}] {head}{body}")
    return out


async def _sources(s: aiohttp.ClientSession, ep: Endpoint) -> dict[str, float]:
    async with s.get(f"http://{ep.host_port}/metrics") as r:
        text = await r.text()
    out = {"computed": 0.0}
    for m in parse_samples(text):
        if m.name == "vllm:prompt_tokens_cached_by_source_total":
            out[m.labels["source"]] = m.value
        elif m.name == "vllm:prompt_tokens_by_source_total" and m.labels["source"] == (
            "local_compute"
        ):
            out["computed"] = m.value
    return out


async def ttft(s: aiohttp.ClientSession, ep: Endpoint, prompt: str) -> float:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": True,
            "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    async with s.post(f"http://{ep.host_port}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.monotonic() - t0
    assert first is not None
    return first


async def one_round(
    mode: str, delay: float, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    await asyncio.to_thread(work.mkdir, parents=True)
    extra = ["--max-num-seqs", "16"]
    if mode in ("fs", "warm"):
        extra += ["--storage-domain", "vol", "--storage-dir", str(work / "vol")]
    launcher = SimLauncher(profile="h100-8b", extra_args=tuple(extra))
    cluster = LocalCluster(
        {"sim": launcher}, work / "endpoints.yaml", work, on_change=lambda _line: None
    )
    prompts = hot_prompts(args.prefixes, args.prefix_words)
    app = None
    try:
        await cluster.scale("sim", 1)
        await cluster.wait_ready("sim", 60)
        (first,) = await cluster.endpoints("sim")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for p in prompts:  # the pool's history: each hot prompt served once
                await ttft(s, first, p)
            await asyncio.sleep(1.0)  # the volume's writes finish
            settings: dict[str, Any] = {"pool": "sim", "host": "127.0.0.1",
                                        "http_port": free_port()}  # fmt: skip
            if mode.startswith("warm"):
                warm = work / "warm.yaml"
                await asyncio.to_thread(warm.write_text, yaml.safe_dump(prompts, width=1 << 20))
                settings |= {"warm_prompts_file": str(warm), "warm_model": "tiny",
                             "warm_concurrency": args.warm_concurrency}  # fmt: skip
            app = ActivatorApp(ActivatorConfig.model_validate(settings), cluster)
            await app.start()
            await asyncio.wait_for(app.activator.synced.wait(), 10)
            await cluster.scale("sim", 2)
            new = None
            while new is None:  # the new replica's first healthy answer
                for ep in await cluster.endpoints("sim"):
                    if ep.host_port != first.host_port:
                        try:
                            async with s.get(f"http://{ep.host_port}/health") as r:
                                if r.status == 200:
                                    new = ep
                        except aiohttp.ClientError:
                            pass
                await asyncio.sleep(0.02)
            up = time.monotonic()
            await asyncio.sleep(delay)
            before = await _sources(s, new)
            questions = [f"{p} Question {k}: where is my order?" for k, p in enumerate(prompts)]
            ttfts = await asyncio.gather(*(ttft(s, new, q) for q in questions))
            after = await _sources(s, new)
            warmed_s = None
            if app.warmer is not None:
                total = app.registry.get_sample_value(
                    "llmd_activator_warm_duration_seconds_sum", {"pool": "sim"}
                )
                done = app.registry.get_sample_value(
                    "llmd_activator_warmed_replicas_total", {"pool": "sim"}
                )
                warmed_s = total if done else None
            return {
                "ttfts_ms": [round(t * 1000, 1) for t in ttfts],
                "tokens": {k: after.get(k, 0) - before.get(k, 0) for k in after},
                "warm_up_s": None if warmed_s is None else round(warmed_s, 3),
                "warm_done_before_requests": warmed_s is not None and warmed_s <= delay,
                "first_request_after_up_s": round(time.monotonic() - up - max(ttfts), 3),
            }
    finally:
        if app is not None:
            await app.stop()
        await cluster.close()


def summarize(mode: str, delay: float, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t for r in rounds for t in r["ttfts_ms"]]
    tokens: dict[str, float] = {}
    for r in rounds:
        for k, v in r["tokens"].items():
            tokens[k] = tokens.get(k, 0) + v / len(rounds)
    warm = [r["warm_up_s"] for r in rounds if r["warm_up_s"] is not None]
    return {
        "mode": mode,
        "delay_s": delay,
        "ttft_p50_ms": round(statistics.median(ttfts), 1),
        "ttft_max_ms": max(ttfts),
        "ttft_mean_ms": round(statistics.fmean(ttfts), 1),
        "tokens_per_round": {k: round(v) for k, v in tokens.items() if v},
        "warm_up_s_median": round(statistics.median(warm), 3) if warm else None,
    }


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmd-warm-start-"))
    delays = [float(d) for d in args.delays.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r} (one of {', '.join(MODES)})")
    results: dict[tuple[str, float], list[dict[str, Any]]] = {}
    n = 0
    for r in range(args.rounds):  # modes alternate within a round: drift hits them alike
        for delay in delays:
            for mode in modes:
                n += 1
                res = await one_round(mode, delay, args, work / f"{n}-{mode}")
                results.setdefault((mode, delay), []).append(res)
                print(f"round {r + 1}/{args.rounds} {mode:9} delay {delay:g}s: "
                      f"TTFT {res['ttfts_ms']} ms, tokens {res['tokens']}, "
                      f"warm-up {res['warm_up_s']} s", flush=True)  # fmt: skip
    rows = [summarize(m, d, results[(m, d)]) for d in delays for m in modes]
    print(f"\n{'mode':10} {'delay':>5} {'TTFT p50':>9} {'max':>8}  warm-up  tokens/round")
    for row in rows:
        print(f"{row['mode']:10} {row['delay_s']:5g} {row['ttft_p50_ms']:9.1f} "
              f"{row['ttft_max_ms']:8.1f}  {row['warm_up_s_median'] or '-':>7}  "
              f"{json.dumps(row['tokens_per_round'])}")  # fmt: skip
    write_report(
        args.out,
        "warm-start",
        "uv run python benchmarks/warm_start.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        rows=rows,
        rounds={f"{m}@{d:g}s": v for (m, d), v in results.items()},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh pools per mode and delay")
    p.add_argument("--delays", default="0,1", help="seconds from the new replica's first "
                   "healthy answer to the users' requests (comma-separated)")  # fmt: skip
    p.add_argument("--modes", default=",".join(MODES), help="cold,fs,warm,warm-nofs")
    p.add_argument("--prefixes", type=int, default=4, help="hot prefixes")
    p.add_argument("--prefix-words", type=int, default=1800, help="words per hot prefix")
    p.add_argument("--warm-concurrency", type=int, default=2)
    p.add_argument("--out", default="benchmarks/reports/warm-start.json")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
