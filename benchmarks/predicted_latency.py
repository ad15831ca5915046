"""Predicted-latency routing against llm-d's baseline and its "sticky until saturated" stack,
on llm-d's predicted-latency experiment shapes, one simulated fleet, all targets in one run.

Targets (Envoy + llmd-scheduler, flow control off so routing alone is compared):
- `optimized-baseline`: llm-d's default profile (queue 2, kv-cache utilization 2, prefix 3);
- `sticky-until-saturated`: `prefix-cache-affinity-filter` + `token-load-scorer` +
  `max-score-picker` (llm-d's current default stack);
- `predicted-latency`: llmd's in-process `predicted-latency-producer` + `latency-scorer`
  (SLO headers on every request; the model learns online from the run's own responses), with
  llm-d's default headroom strategy (`least`: the endpoint with the least headroom that is
  still predicted to meet the SLO);
- `predicted-latency-most`: the same with `headroomSelectionStrategy: most`.

Each predicted-latency row records the model's training samples: a model with no TTFT samples
predicts nothing, and its scorer falls back to llm-d's composite score.

Shapes: prefill-heavy (ISL:OSL about 400:1) and decode-heavy (about 4:1). Half of each prompt is
one of 16 shared prefixes. For each shape the SLOs are set from an unloaded probe (TTFT 4x,
TPOT 2x its median), the fleet's capacity is measured (closed loop, over four request lifetimes),
then Poisson load at `--fractions` of capacity (1.4 is past it) for `--seconds` per target.
Reported per point: client TTFT and TPOT p90, SLO attainment (both met), goodput (requests
meeting the SLO per second), and the engines' own mean TTFT.

The fleet runs at `--speed` (0.25: a quarter of real time), so that its capacity is a rate the
load generator, Envoy and the scheduler can drive on two cores. Every time reported is wall
time; the engines' own figures are scaled by 1 / speed too.

Usage: uv run python benchmarks/predicted_latency.py [--engines N] [--max-num-seqs S]
           [--seconds S] [--fractions 0.6,1.0,1.4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_control import engine_ttft, gateway
from protocol_throughput import write_report

from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol.metrics import parse_samples

TARGETS = {
    "optimized-baseline": """
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
""",
    "sticky-until-saturated": """
plugins:
- type: prefix-cache-affinity-filter
- type: token-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-affinity-filter}
  - {pluginRef: token-load-scorer}
  - {pluginRef: max-score-picker}
""",
    "predicted-latency": """
plugins:
- type: predicted-latency-producer
- type: prefix-cache-scorer
- type: latency-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: latency-scorer, weight: 1}
""",
    # the same with the headroom strategy reversed: among the endpoints predicted to meet the
    # SLO, the one with the most headroom (llm-d's default, least, packs requests up to it)
    "predicted-latency-most": """
plugins:
- type: predicted-latency-producer
- type: prefix-cache-scorer
- type: latency-scorer
  parameters: {headroomSelectionStrategy: most}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: latency-scorer, weight: 1}
""",
}
SHAPES = {"prefill-heavy": (250, 5), "decode-heavy": (50, 100)}
"""Shape -> (prompt words, output tokens): about 400:1 and 4:1 in tokens (the simulator's tiny
tokenizer makes about 8 tokens of each generated word)."""


@dataclass
class Outcome:
    ok: bool
    ttft: float | None
    tpot: float | None


def prompt(rng: random.Random, words: int, groups: list[str]) -> str:
    shared = rng.choice(groups)
    own = " ".join(f"u{rng.randrange(50_000)}" for _ in range(words - words // 2))
    return f"{shared} {own}"


async def request(
    session: aiohttp.ClientSession, url: str, text: str, tokens: int, slo: dict[str, str]
) -> Outcome:
    body = {"model": "tiny", "prompt": text, "max_tokens": tokens, "stream": True,
            "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    chunks = 0
    try:
        async with session.post(url + "/v1/completions", json=body, headers=slo) as r:
            if r.status != 200:
                await r.read()
                return Outcome(False, None, None)
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(False, None, None)
    end = time.perf_counter() - t0
    tpot = (end - first) / (chunks - 1) if first is not None and chunks > 1 else None
    return Outcome(first is not None, first, tpot)


async def open_loop(
    url: str, rps: float, seconds: float, shape: tuple[int, int], groups: list[str],
    slo: dict[str, str], seed: int,
) -> list[Outcome]:  # fmt: skip
    rng = random.Random(seed)
    out: list[Outcome] = []
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def one(text: str) -> None:
            out.append(await request(session, url, text, shape[1], slo))

        tasks = []
        t0 = time.perf_counter()
        at = 0.0
        while at < seconds:
            at += rng.expovariate(rps)
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(prompt(rng, shape[0], groups))))
        await asyncio.gather(*tasks)
    return out


async def capacity(
    urls: list[str], shape: tuple[int, int], groups: list[str], window: float
) -> float:
    """Requests completed per second by a closed loop that keeps every engine full, over a
    window several request lifetimes long (a short window undercounts long requests)."""
    rng = random.Random(7)
    done = 0
    stop = time.perf_counter() + window
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                o = await request(session, urls[i % len(urls)], prompt(rng, shape[0], groups),
                                  shape[1], {})  # fmt: skip
                if o.ok and time.perf_counter() < stop:
                    done += 1

        await asyncio.gather(*(worker(i) for i in range(len(urls) * 6)))
    return done / window


async def probe(url: str, shape: tuple[int, int], groups: list[str]) -> tuple[float, float]:
    """Median TTFT and TPOT of unloaded requests, one at a time."""
    rng = random.Random(3)
    outs = []
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            outs.append(await request(session, url, prompt(rng, shape[0], groups), shape[1], {}))
    ttfts = [o.ttft for o in outs if o.ttft is not None]
    tpots = [o.tpot for o in outs if o.tpot is not None]
    return statistics.median(ttfts), statistics.median(tpots) if tpots else 0.01


def p90(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * 0.9))] * 1000, 1)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    fractions = [float(f) for f in args.fractions.split(",")]
    result: dict[str, Any] = {"profile": args.profile, "speed": args.speed, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fleet = SimFleetProcess.start(
            count=args.engines, block_size=16, profile=args.profile, work=work,
            extra_args=["--max-num-seqs", str(args.max_num_seqs), "--speed", str(args.speed)],
        )  # fmt: skip
        try:
            urls = [e.url for e in fleet.engines]
            for shape_name, shape in SHAPES.items():
                grng = random.Random(11)
                groups = [
                    " ".join(f"g{g}w{grng.randrange(50_000)}" for _ in range(shape[0] // 2))
                    for g in range(16)
                ]
                ttft0, tpot0 = await probe(urls[0], shape, groups)
                lifetime = ttft0 + shape[1] * tpot0
                cap = await capacity(urls, shape, groups, max(8.0, 4 * lifetime))
                slo_ttft, slo_tpot = 4 * ttft0, 2 * tpot0
                slo = {
                    "x-llm-d-slo-ttft-ms": f"{slo_ttft * 1000:.0f}",
                    "x-llm-d-slo-tpot-ms": f"{slo_tpot * 1000:.1f}",
                }
                print(f"[{shape_name}] capacity {cap:.1f} req/s; SLO TTFT {slo_ttft * 1000:.0f} "
                      f"ms, TPOT {slo_tpot * 1000:.1f} ms", flush=True)  # fmt: skip
                shape_out: dict[str, Any] = {
                    "words_in": shape[0], "tokens_out": shape[1], "capacity_rps": round(cap, 2),
                    "slo_ttft_ms": round(slo_ttft * 1000), "slo_tpot_ms": round(slo_tpot * 1000, 1),
                    "targets": {},
                }  # fmt: skip
                for name, config in TARGETS.items():
                    rows = []
                    with gateway(fleet, work / f"{shape_name}-{name}", config) as gw:
                        await asyncio.sleep(1)
                        for i, frac in enumerate(fractions):
                            rps = frac * cap
                            s0, c0 = await engine_ttft(urls)
                            outs = await open_loop(gw.url, rps, args.seconds, shape, groups,
                                                   slo, 100 + i)  # fmt: skip
                            s1, c1 = await engine_ttft(urls)
                            good = [
                                o for o in outs
                                if o.ok and o.ttft is not None and o.ttft <= slo_ttft
                                and (o.tpot is None or o.tpot <= slo_tpot)
                            ]  # fmt: skip
                            row = {
                                "load": frac,
                                "rps": round(rps, 2),
                                "sent": len(outs),
                                "errors": sum(1 for o in outs if not o.ok),
                                "ttft_p90_ms": p90([o.ttft for o in outs if o.ttft is not None]),
                                "tpot_p90_ms": p90([o.tpot for o in outs if o.tpot is not None]),
                                "slo_attainment": round(len(good) / max(1, len(outs)), 3),
                                "goodput_rps": round(len(good) / args.seconds, 2),
                                "engine_ttft_mean_ms": round(
                                    (s1 - s0) / (c1 - c0) * 1000 / args.speed, 1)
                                    if c1 > c0 else None,
                            }  # fmt: skip
                            samples = await model_samples(gw.scheduler.url + "/metrics")
                            if samples is not None:
                                row["latency_model_samples"] = samples
                            print(f"[{shape_name}] {name:<23} {row}", flush=True)
                            rows.append(row)
                            await asyncio.sleep(3)
                    shape_out["targets"][name] = rows
                result["shapes"][shape_name] = shape_out
        finally:
            fleet.stop()
    return result


async def model_samples(url: str) -> dict[str, float] | None:
    """The scheduler's latency-model training samples (None: no model in this config). A
    predicted-latency target whose model never trained is the composite fallback."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    out = {
        m.labels["target"]: m.value for m in parse_samples(text, ("llmd_latency_model_samples",))
    }
    return out or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=6)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--profile", default="h100-32b-tp2")
    ap.add_argument(
        "--speed",
        type=float,
        default=0.25,
        help="simulated seconds per wall second: below 1 the fleet is slower in wall time, so "
        "saturating it takes a request rate this 2-core machine can generate",
    )
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--fractions", default="0.6,1.0,1.4")
    ap.add_argument("--out", default="benchmarks/reports/predicted-latency.json")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    write_report(
        args.out,
        "predicted-latency",
        "uv run python benchmarks/predicted_latency.py " + shlex.join(sys.argv[1:]),
        **res,
    )


if __name__ == "__main__":
    main()
