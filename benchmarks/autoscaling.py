"""Autoscaling on a compressed day: GPU-seconds and SLO attainment for llmd-autoscaler, static
peak provisioning and a WVA-like 30 s saturation loop, on one seeded trace.

Each target gets a fresh local process pool of simulated engines (`llmd-sim`, h100-8b
profile) that take `--startup-delay` seconds to start, as real model servers take tens of
seconds; `llmd-activator` is the entry point (round robin over ready engines) for every
target, so routing is the same and only the scaling differs:

- `static`: `--max-replicas` engines the whole day (provisioned for the peak);
- `llmd`: `llmd-autoscaler` with its defaults (5 s loop, load-sized steps, 30 s scale-down
  window);
- `llmd-headroom` (not run by default): the same with `--saturation-batch-target 0.5`
  (batches sized at half their limit);
- `wva30`: the same saturation analyzer run the way WVA runs it: a 30 s loop, one replica
  added or removed per cycle, no load trend.

The trace: Poisson arrivals whose rate follows a day compressed into `--duration` seconds
(night, a morning ramp, a midday peak, an evening fall) with two short bursts at 3x. Requests
stream `--output-tokens` tokens from ~`--prompt-words`-word prompts.

Reported per target: GPU-seconds (engine processes alive, starting ones included, integrated
over the run), SLO attainment (requests answered 200 with TTFT within `--slo-ms`), TTFT
p50/p90/p99, errors; a PNG of offered load, replicas and TTFT over time.

Usage: uv run python benchmarks/autoscaling.py [--duration S] [--peak-rps R]
           [--startup-delay S] [--targets static,llmd,wva30] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.dev.cli import control_app
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.runtime.lifecycle import serve_http
from llmd.vllm_cpu.server import free_port

WORDS = "the of and to in is was for on that with as by at from his her an are were this".split()


def rate_at(t: float, duration: float, peak: float, base: float) -> float:
    """Offered requests/s at `t`: a compressed day with two 3x bursts."""
    day = 0.5 * (1 - math.cos(2 * math.pi * t / duration))  # 0 at night, 1 at midday
    rate = base + (peak - base) * math.pow(day, 1.5)
    if in_burst(t, duration):
        rate *= 3
    return rate


BURSTS = (0.22, 0.72)
"""Where the two 3x bursts start, as a share of the day; each lasts a 24th of it."""


def in_burst(t: float, duration: float, settle_s: float = 0.0) -> bool:
    """`t` falls in a burst, or within `settle_s` after one ends."""
    return any(b * duration <= t < b * duration + duration / 24 + settle_s for b in BURSTS)


def make_trace(duration: float, peak: float, base: float, seed: int) -> list[float]:
    """Arrival times by thinning a Poisson process at the peak rate."""
    rng = random.Random(seed)
    top = peak * 3
    t = 0.0
    out: list[float] = []
    while True:
        t += rng.expovariate(top)
        if t >= duration:
            return out
        if rng.random() < rate_at(t, duration, peak, base) / top:
            out.append(t)


@dataclass
class Result:
    at: float
    status: int
    ttft_s: float | None
    e2e_s: float
    error: str = ""


@dataclass
class TargetRun:
    name: str
    results: list[Result] = field(default_factory=list)
    replicas: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, engine processes alive, ready)"""


def _variant(max_replicas: int, max_num_seqs: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmd.ai/v1alpha1",
        "kind": "VariantAutoscaling",
        "metadata": {"name": "sim", "namespace": "bench"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "sim"}, "modelID": "tiny",
                 "variantCost": "10", "minReplicas": 1, "maxReplicas": max_replicas,
                 "modelProfile": {"accelerators": [{"acc": "sim", "accCount": 1,
                                                    "maxBatchSize": max_num_seqs}]}},
    }  # fmt: skip


def _proc(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


async def _wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


async def one_request(
    s: aiohttp.ClientSession, url: str, prompt: str, tokens: int, at: float
) -> Result:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": tokens, "stream": True,
            "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    ttft = None
    try:
        async with s.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                text = (await r.read())[:300].decode("utf-8", "replace")
                return Result(at, r.status, None, time.monotonic() - t0, text)
            async for _ in r.content.iter_any():
                if ttft is None:
                    ttft = time.monotonic() - t0
            return Result(at, r.status, ttft, time.monotonic() - t0)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Result(at, 0, None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")


async def run_target(
    name: str, args: argparse.Namespace, trace: list[float], work: Path
) -> TargetRun:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    launcher = SimLauncher(
        profile="h100-8b",
        extra_args=("--startup-delay", str(args.startup_delay),
                    "--max-num-seqs", str(args.max_num_seqs)),
        startup_timeout_s=args.startup_delay + 60,
    )  # fmt: skip
    cluster = LocalCluster({"sim": launcher}, work / "endpoints.yaml", work, drain_timeout_s=30)
    control_port, act_port, scaler_port = free_port(), free_port(), free_port()
    server, task = serve_http(control_app(cluster), "127.0.0.1", control_port)
    control = f"http://127.0.0.1:{control_port}"
    start = args.max_replicas if name == "static" else 1
    print(
        f"[{name}] starting {start} engine(s) ({args.startup_delay:g}s start-up each)", flush=True
    )
    await cluster.scale("sim", start)
    await cluster.wait_ready("sim", args.startup_delay + 90)
    procs = [
        _proc([sys.executable, "-m", "llmd.activator.cli", "--pool", "sim",
               "--control-url", control, "--host", "127.0.0.1", "--http-port", str(act_port),
               "--hold-timeout", "120s", "--log-level", "warning"], work / "activator.log")
    ]  # fmt: skip
    if name != "static":
        (work / "variants.yaml").write_text(
            yaml.safe_dump(_variant(args.max_replicas, args.max_num_seqs))
        )
        wva = ["--interval", "30s", "--max-scale-up-step", "1", "--max-scale-down-step", "1",
               "--no-predictive"]  # fmt: skip
        extra = {"llmd": [], "llmd-headroom": ["--saturation-batch-target", "0.5"], "wva30": wva}[
            name
        ]
        procs.append(_proc(
            [sys.executable, "-m", "llmd.autoscaler.cli", "--variants-file",
             str(work / "variants.yaml"), "--control-url", control, "--host", "127.0.0.1",
             "--http-port", str(scaler_port),
             "--demand-urls", json.dumps([f"http://127.0.0.1:{act_port}/metrics"]), *extra],
            work / "autoscaler.log",
        ))  # fmt: skip
        await _wait_http(f"http://127.0.0.1:{scaler_port}/readyz")
    await _wait_http(f"http://127.0.0.1:{act_port}/readyz")
    run = TargetRun(name)
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(64)]
    t0 = time.monotonic()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            eps = await cluster.endpoints("sim")
            run.replicas.append((time.monotonic() - t0, len(eps), sum(e.ready for e in eps)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    url = f"http://127.0.0.1:{act_port}"
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = []
        for i, at in enumerate(trace):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                one_request(s, url, prompts[i % len(prompts)], args.output_tokens, at)
            ))  # fmt: skip
            if i % 200 == 0:
                print(f"[{name}] t={at:5.0f}s sent {i}/{len(trace)}", flush=True)
        run.results = list(await asyncio.gather(*tasks))
    done.set()
    await sampler
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
    server.should_exit = True
    await asyncio.wait([task], timeout=5)
    await cluster.close()
    return run


async def scale_from_zero(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One request at a pool with no replicas, through llmd-activator: its time to first token
    against the moment the engine itself logged that it serves."""
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    events: list[tuple[float, str]] = []
    launcher = SimLauncher(
        profile="h100-8b", extra_args=("--startup-delay", str(args.startup_delay)),
        startup_timeout_s=args.startup_delay + 60,
    )  # fmt: skip
    cluster = LocalCluster(
        {"sim": launcher}, work / "endpoints.yaml", work,
        on_change=lambda line: events.append((time.monotonic(), line)),
    )  # fmt: skip
    control_port, act_port = free_port(), free_port()
    server, task = serve_http(control_app(cluster), "127.0.0.1", control_port)
    act = _proc(
        [sys.executable, "-m", "llmd.activator.cli", "--pool", "sim", "--control-url",
         f"http://127.0.0.1:{control_port}", "--host", "127.0.0.1", "--http-port",
         str(act_port), "--hold-timeout", "120s"],
        work / "activator.log",
    )  # fmt: skip
    await _wait_http(f"http://127.0.0.1:{act_port}/readyz")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        t0, wall0 = time.monotonic(), time.time()
        r = await one_request(s, f"http://127.0.0.1:{act_port}", "hello " * 50, 16, 0.0)
    ready_at = next((t for t, line in events if "ready at" in line), None)
    serving = await asyncio.to_thread(_serving_at, work / "sim-0.log")
    act.terminate()
    act.wait(timeout=15)
    server.should_exit = True
    await asyncio.wait([task], timeout=5)
    await cluster.close()
    ttft = r.ttft_s
    up = serving - wall0 if serving is not None else None
    after = None if ttft is None or up is None else round((ttft - up) * 1000, 1)
    out = {
        "status": r.status,
        "ttft_s": None if ttft is None else round(ttft, 3),
        "engine_serving_s": None if up is None else round(up, 3),
        "pool_saw_ready_s": None if ready_at is None else round(ready_at - t0, 3),
        "first_token_after_engine_serving_ms": after,
    }
    print(f"scale from zero: {json.dumps(out)}", flush=True)
    return out


def _serving_at(log: Path) -> float | None:
    """Wall-clock time the engine logged that it serves (its own view of being up)."""
    import datetime

    for line in log.read_text().splitlines():
        if " serving " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def attainment(run: TargetRun, slo_s: float, duration: float, settle_s: float) -> float:
    """SLO attainment of the requests that arrived outside the bursts (and the `settle_s`
    after each, the time a scale-up takes to land)."""
    calm = [r for r in run.results if not in_burst(r.at, duration, settle_s)]
    met = sum(1 for r in calm if r.status == 200 and r.ttft_s is not None and r.ttft_s <= slo_s)
    return round(met / max(1, len(calm)), 4)


def summarize(
    run: TargetRun, slo_s: float, duration: float, settle_s: float = 30.0
) -> dict[str, Any]:
    gpu_s = 0.0
    for (t1, n, _), (t2, _, _) in zip(run.replicas, run.replicas[1:], strict=False):
        gpu_s += n * (t2 - t1)
    ok = [r for r in run.results if r.status == 200 and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    met = sum(1 for t in ttfts if t <= slo_s)
    errors: dict[str, int] = {}
    for r in run.results:
        if r.status != 200 or r.ttft_s is None:
            key = f"{r.status} {r.error[:120]}".strip()
            errors[key] = errors.get(key, 0) + 1
    return {
        "target": run.name,
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "gpu_seconds": round(gpu_s, 1),
        "mean_replicas": round(gpu_s / max(1e-9, run.replicas[-1][0]), 2) if run.replicas else 0,
        "max_replicas": max((n for _, n, _ in run.replicas), default=0),
        "slo_attainment": round(met / max(1, len(run.results)), 4),
        "slo_attainment_outside_bursts": attainment(run, slo_s, duration, settle_s),
        "ttft_p50_ms": round((pct(ttfts, 0.5) or 0) * 1000, 1),
        "ttft_p90_ms": round((pct(ttfts, 0.9) or 0) * 1000, 1),
        "ttft_p99_ms": round((pct(ttfts, 0.99) or 0) * 1000, 1),
        "error_kinds": errors,
    }


def plot(runs: list[TargetRun], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    xs = [i * args.duration / 400 for i in range(401)]
    axes[0].plot(xs, [rate_at(x, args.duration, args.peak_rps, args.base_rps) for x in xs])
    axes[0].set_ylabel("offered req/s")
    for run in runs:
        axes[1].step([t for t, _, _ in run.replicas], [n for _, n, _ in run.replicas],
                     where="post", label=run.name)  # fmt: skip
        bins: dict[int, list[float]] = {}
        for r in run.results:
            bins.setdefault(int(r.at // 5), []).append(
                r.ttft_s if r.ttft_s is not None else float("nan")
            )
        keys = sorted(bins)
        axes[2].plot([k * 5 for k in keys], [(pct(bins[k], 0.9) or 0) * 1000 for k in keys],
                     label=run.name)  # fmt: skip
    axes[1].set_ylabel("engines (starting included)")
    axes[1].legend()
    axes[2].set_ylabel("TTFT p90 per 5 s (ms)")
    axes[2].axhline(args.slo_ms, color="grey", linestyle="--", linewidth=0.8)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("seconds into the compressed day")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"plot: {out}")


async def main_async(args: argparse.Namespace) -> None:
    trace = make_trace(args.duration, args.peak_rps, args.base_rps, args.seed)
    print(f"trace: {len(trace)} requests over {args.duration:g}s (peak {args.peak_rps:g} req/s, "
          f"bursts 3x)", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="llmd-autoscaling-"))
    settle = args.startup_delay + 10
    runs = []
    for name in args.targets.split(","):
        runs.append(await run_target(name, args, trace, work / name))
        print(json.dumps(summarize(runs[-1], args.slo_ms / 1000, args.duration, settle)))
    rows = [summarize(r, args.slo_ms / 1000, args.duration, settle) for r in runs]
    print(f"\n{'target':8} {'GPU-s':>8} {'mean':>6} {'SLO':>7} {'TTFT p50':>9} {'p90':>8} "
          f"{'p99':>8} {'errors':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['target']:8} {r['gpu_seconds']:8.0f} {r['mean_replicas']:6.2f} "
              f"{r['slo_attainment']:7.1%} {r['ttft_p50_ms']:9.0f} {r['ttft_p90_ms']:8.0f} "
              f"{r['ttft_p99_ms']:8.0f} {r['errors']:6d}")  # fmt: skip
    zero = await scale_from_zero(args, work / "zero")
    plot(runs, args, Path(args.plot))
    series = {
        r.name: {"replicas": r.replicas[::4],
                 "results": [[x.at, x.status, x.ttft_s] for x in r.results]}
        for r in runs
    }  # fmt: skip
    write_report(
        args.out,
        "autoscaling",
        "uv run python benchmarks/autoscaling.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k not in {"out", "plot"}},
        rows=rows,
        scale_from_zero=zero,
        series=series,
    )


def from_report(path: Path) -> None:
    """Print a saved report's rows, with the SLO attainment outside the bursts worked out
    from its per-request series (for reports written before that column existed)."""
    doc = json.loads(path.read_text())
    settings = doc["settings"]
    slo_s, duration = settings["slo_ms"] / 1000, settings["duration"]
    settle = settings["startup_delay"] + 10
    print(f"{doc['command']}  ({doc['when']})")
    print(f"{'target':14} {'GPU-s':>7} {'SLO':>7} {'outside bursts':>15}")
    for row in doc["rows"]:
        series = doc["series"][row["target"]]["results"]
        run = TargetRun(row["target"], [Result(at, st, tt, 0.0) for at, st, tt in series])
        calm = attainment(run, slo_s, duration, settle)
        print(f"{row['target']:14} {row['gpu_seconds']:7.0f} {row['slo_attainment']:7.1%} "
              f"{calm:15.1%}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300, help="seconds of compressed day")
    p.add_argument("--peak-rps", type=float, default=6.0, help="midday request rate")
    p.add_argument("--base-rps", type=float, default=0.5, help="night request rate")
    p.add_argument("--startup-delay", type=float, default=20, help="engine start-up seconds")
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=4, help="engine batch limit")
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=300)
    p.add_argument("--slo-ms", type=float, default=1000, help="TTFT objective")
    p.add_argument("--targets", default="static,llmd,wva30")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/reports/autoscaling.json")
    p.add_argument("--plot", default="benchmarks/reports/autoscaling.png")
    p.add_argument("--from-report", type=Path, help="only summarize a saved report, run nothing")
    args = p.parse_args()
    if args.from_report:
        from_report(args.from_report)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
