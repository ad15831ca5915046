"""Flow control: what it costs at low load, what it protects at 2x overload, and that a metrics
outage does not stop dispatch. One simulated fleet, both targets in the same run.

Targets (Envoy + llmd-scheduler, lean path, llmd's default scoring):
- `off`: flow control off (llm-d's default: requests go straight to the engines' queues).
- `on`: `featureGates: [flowControl]` with llm-d's default policies (utilization detector,
  global-strict fairness, FCFS, static usage limit), a 10 s queue TTL, and the sheddable band
  capped at `--sheddable-queue` requests.
- `evict`: `on` plus `enableEviction: true`: while a higher band waits on a saturated pool,
  in-flight sheddable requests are revoked (their streams are cut; counted as `cut`).

Phases:
0. admission cost: CPU microseconds of the scheduler's admission step per request, in process,
   on an unloaded pool (the path every request takes below saturation).
1. low load, both gateways up, the targets alternating `--low-rounds` times: Poisson arrivals
   at 30% of the fleet's capacity, one class. Client TTFT p50/p99 and each scheduler's CPU per
   request (from /proc; it includes the scheduler's idle scraping).
2. 2x overload: Poisson at twice the capacity. A quarter `critical` (priority 10), half
   `standard` (priority 0) from two tenants at equal rates, a quarter `sheddable`
   (priority -1). Per class: TTFT p50/p99 of served requests, success and shed rates (429/503),
   the share meeting `--slo-ms`; Jain's fairness index over the two standard tenants' served
   requests.
3. stale metrics: 70% load for 15 s; every engine's /metrics fails for the middle 5 s
   (llmd-sim's metrics_error_rate fault). Requests rejected, and the served rate, during the
   outage and before it.

Capacity is measured first (closed loop, direct to the engines). The engines' own TTFT (mean,
from their /metrics) is reported beside the clients'.

Usage: uv run python benchmarks/flow_control.py [--engines N] [--max-num-seqs S]
           [--output-tokens T] [--sheddable-tokens T] [--overload-seconds S]
           [--targets off,on,evict] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import cpu_seconds
from protocol_throughput import write_report

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.discovery import Endpoint
from llmd.scheduler.core import build_core

CLASSES = {
    "critical": ("critical", "crit"),
    "standard-a": ("standard", "tenant-a"),
    "standard-b": ("standard", "tenant-b"),
    "sheddable": ("sheddable", "bulk"),
}
"""Class -> (objective, fairness id); each a quarter of the overload traffic."""
TOKENS_BY_CLASS: dict[str, int] = {}
"""Output tokens of a class when not the phase's own (`--sheddable-tokens`)."""
OBJECTIVES = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: standard}
spec: {priority: 0}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: sheddable}
spec: {priority: -1}
"""
BASE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
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
"""


def flow_config(sheddable_queue: int) -> str:
    return (
        BASE
        + f"""
featureGates: [flowControl]
flowControl:
  defaultRequestTTL: 10s
  defaultNegativePriorityBand: {{maxRequests: {sheddable_queue}}}
"""
    )


CUT = 499
"""A streamed response that started and was cut before `[DONE]` (a revoked request)."""


@dataclass
class Result:
    cls: str
    status: int
    ttft_s: float | None
    sent_at: float


@dataclass
class Load:
    results: list[Result] = field(default_factory=list)


async def one(
    session: aiohttp.ClientSession, url: str, cls: str, tokens: int, t0: float, load: Load
) -> None:
    objective, tenant = CLASSES[cls]
    headers = {
        "x-llm-d-inference-objective": objective,
        "x-llm-d-inference-fairness-id": tenant,
    }
    body = {
        "model": "tiny",
        "prompt": f"{random.random()} " + "word " * 64,
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
    }
    sent = time.perf_counter()
    first = None
    status = 0
    done = False
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            status = resp.status
            async for line in resp.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter() - sent
                done = done or line.startswith(b"data: [DONE]")
    except (aiohttp.ClientError, TimeoutError):
        status = CUT if status == 200 else -1
    if status == 200 and not done:
        status = CUT
    load.results.append(Result(cls, status, first if status == 200 else None, sent - t0))


async def open_loop(
    url: str, rps: float, seconds: float, tokens: int, mix: list[str], seed: int
) -> Load:
    rng = random.Random(seed)
    load = Load()
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        t0 = time.perf_counter()
        tasks = []
        at = 0.0
        while at < seconds:
            at += rng.expovariate(rps)
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            cls = rng.choice(mix)
            n = TOKENS_BY_CLASS.get(cls, tokens)
            tasks.append(asyncio.create_task(one(session, url, cls, n, t0, load)))
        await asyncio.gather(*tasks)
    return load


async def capacity(urls: list[str], tokens: int, seconds: float = 10.0) -> float:
    """Completed requests per second with every engine kept full (closed loop, direct)."""
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                body = {"model": "tiny", "prompt": f"cap {i} {random.random()}",
                        "max_tokens": tokens, "ignore_eos": True}  # fmt: skip
                async with session.post(urls[i % len(urls)] + "/v1/completions", json=body) as r:
                    await r.read()
                    if r.status == 200 and time.perf_counter() < stop:
                        done += 1

        await asyncio.gather(*(worker(i) for i in range(len(urls) * 8)))
    return done / seconds


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * q))] * 1000, 1)


def summarize(load: Load, slo_s: float, classes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        rs = [r for r in load.results if r.cls == cls]
        if not rs:
            continue
        ok = [r.ttft_s for r in rs if r.status == 200 and r.ttft_s is not None]
        shed = sum(1 for r in rs if r.status in (429, 503))
        cut = sum(1 for r in rs if r.status == CUT)
        out[cls] = {
            "sent": len(rs),
            "ttft_p50_ms": pct(ok, 0.5),
            "ttft_p99_ms": pct(ok, 0.99),
            "success_rate": round(len(ok) / len(rs), 3),
            "shed_rate": round(shed / len(rs), 3),
            "cut_rate": round(cut / len(rs), 3),
            "other_errors": len(rs) - len(ok) - shed - cut,
            "within_slo": round(sum(1 for t in ok if t <= slo_s) / len(rs), 3),
        }
    return out


def jain(values: list[float]) -> float | None:
    if not values or not any(values):
        return None
    return round(sum(values) ** 2 / (len(values) * sum(v * v for v in values)), 4)


async def engine_ttft(urls: list[str]) -> tuple[float, float]:
    """Sum and count of the engines' own TTFT histograms."""
    total, count = 0.0, 0.0
    async with aiohttp.ClientSession() as session:
        for u in urls:
            async with session.get(u + "/metrics") as r:
                text = await r.text()
            for line in text.splitlines():
                if line.startswith("vllm:time_to_first_token_seconds_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:time_to_first_token_seconds_count"):
                    count += float(line.rsplit(" ", 1)[1])
    return total, count


@contextmanager
def gateway(fleet: SimFleetProcess, work: Path, config: str) -> Iterator[Gateway]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "epp.yaml").write_text(config)
    (work / "objectives.yaml").write_text(OBJECTIVES)
    gw = Gateway.start(
        fleet.endpoints_file,
        work,
        config_file=work / "epp.yaml",
        scheduler_args=["--inference-objectives-file", str(work / "objectives.yaml")],
    )
    try:
        yield gw
    finally:
        gw.stop()


async def set_faults(urls: list[str], **faults: Any) -> None:
    async with aiohttp.ClientSession() as session:
        for u in urls:
            async with session.post(u + "/sim/faults", json=faults) as r:
                r.raise_for_status()


async def phase(
    gw: Gateway, urls: list[str], rps: float, seconds: float, tokens: int, mix: list[str], seed: int
) -> tuple[Load, float, float]:
    """A load phase: results, scheduler CPU seconds used, engines' mean TTFT (s)."""
    pid = [gw.scheduler.process.pid]
    cpu0 = cpu_seconds(pid)
    s0, c0 = await engine_ttft(urls)
    load = await open_loop(gw.url, rps, seconds, tokens, mix, seed)
    s1, c1 = await engine_ttft(urls)
    cpu = cpu_seconds(pid) - cpu0
    return load, cpu, (s1 - s0) / (c1 - c0) if c1 > c0 else 0.0


async def low_load(
    gws: dict[str, Gateway], urls: list[str], cap: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Low load, the targets alternating round by round (the machine's noise hits both)."""
    loads: dict[str, Load] = {n: Load() for n in gws}
    cpu = dict.fromkeys(gws, 0.0)
    eng_sum = dict.fromkeys(gws, 0.0)
    eng_n = dict.fromkeys(gws, 0.0)
    for r in range(args.low_rounds):
        for name, gw in gws.items():
            print(f"[{name}] low load round {r + 1}: {0.3 * cap:.1f} req/s", flush=True)
            s0, c0 = await engine_ttft(urls)
            load, used, _ = await phase(gw, urls, 0.3 * cap, args.low_seconds,
                                        args.output_tokens, ["standard-a"], 10 + r)  # fmt: skip
            s1, c1 = await engine_ttft(urls)
            loads[name].results += load.results
            cpu[name] += used
            eng_sum[name] += s1 - s0
            eng_n[name] += c1 - c0
    out = {}
    for name in gws:
        summary = summarize(loads[name], args.slo_ms / 1000, ["standard-a"])["standard-a"]
        n = max(1, len(loads[name].results))
        summary["scheduler_cpu_ms_per_request"] = round(cpu[name] * 1000 / n, 2)
        summary["engine_ttft_mean_ms"] = round(eng_sum[name] / max(1, eng_n[name]) * 1000, 1)
        out[name] = summary
    return out


async def overload_and_stale(
    name: str, gw: Gateway, urls: list[str], cap: float, args: argparse.Namespace
) -> dict[str, Any]:
    slo = args.slo_ms / 1000
    mix = list(CLASSES)
    print(
        f"[{name}] 2x overload: {2 * cap:.1f} req/s for {args.overload_seconds:.0f} s", flush=True
    )
    over, cpu, eng = await phase(gw, urls, 2 * cap, args.overload_seconds, args.output_tokens,
                                 mix, 2)  # fmt: skip
    over_sum = summarize(over, slo, list(CLASSES))
    served = [
        sum(1 for r in over.results if r.cls == c and r.status == 200)
        for c in ("standard-a", "standard-b")
    ]
    await asyncio.sleep(5)
    print(f"[{name}] stale metrics: {0.7 * cap:.1f} req/s, /metrics failing 5 s", flush=True)
    stale_load = asyncio.create_task(
        open_loop(gw.url, 0.7 * cap, 15, args.output_tokens, ["standard-a"], 3)
    )
    await asyncio.sleep(5)
    await set_faults(urls, metrics_error_rate=1.0)
    await asyncio.sleep(5)
    await set_faults(urls, metrics_error_rate=0.0)
    stale = await stale_load
    before = [r for r in stale.results if r.sent_at < 5]
    during = [r for r in stale.results if 6 <= r.sent_at < 10]  # scrapes stale after ~1 s
    return {
        "overload": {
            "classes": over_sum,
            "jain_standard_tenants": jain([float(x) for x in served]),
            "engine_ttft_mean_ms": round(eng * 1000, 1),
            "scheduler_cpu_ms_per_request": round(cpu * 1000 / max(1, len(over.results)), 2),
        },
        "stale_metrics": {
            "rejected_during_outage": sum(1 for r in during if r.status != 200),
            "served_per_s_before": round(sum(r.status == 200 for r in before) / 5, 2),
            "served_per_s_during": round(sum(r.status == 200 for r in during) / 4, 2),
            "sent_during": len(during),
        },
    }


async def admit_cost(n: int = 20_000) -> dict[str, float]:
    """CPU microseconds of the scheduler's admission step per request, in process, unloaded
    pool (the fast path every request takes below saturation)."""
    out = {}
    for name, config in (("off", BASE), ("on", flow_config(8))):
        core = build_core(config)
        ds = core.datastore
        ds.set_endpoints(tuple(Endpoint(f"p{i}", "127.0.0.1", 9000 + i) for i in range(4)))
        d = core.director
        body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4}).encode()
        reqs = []
        for _ in range(n):
            req = d.new_request({}, "/v1/completions")
            req.body = body
            reqs.append(req)
        if d.flow is not None:
            d.flow.start()
        t = time.process_time()
        for i, req in enumerate(reqs):
            if i % 1000 == 0:  # keep the engines' metrics fresh, as scraping does
                now = ds.clock()
                for e in ds.all():
                    e.note_scrape(now, SNAPSHOT, now)
            await d.admit(req)
        out[name] = round((time.process_time() - t) / n * 1e6, 1)
        if d.flow is not None:
            await d.flow.stop()
    return out


SNAPSHOT = EngineSnapshot(
    waiting=0, running=1, kv_cache_usage=0.1, block_size=16, num_gpu_blocks=1000
)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    micro = await admit_cost()
    print(f"admission CPU per request (in process): {micro} us", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fleet = SimFleetProcess.start(
            count=args.engines,
            block_size=16,
            profile="h100-8b",
            work=work,
            extra_args=["--max-num-seqs", str(args.max_num_seqs)],
        )
        try:
            urls = [e.url for e in fleet.engines]
            cap = await capacity(urls, args.output_tokens)
            print(f"fleet capacity: {cap:.1f} req/s", flush=True)
            out: dict[str, Any] = {
                "capacity_rps": round(cap, 2),
                "admission_cpu_us_per_request": micro,
                "targets": {},
            }
            configs = {
                "off": BASE,
                "on": flow_config(args.sheddable_queue),
                "evict": flow_config(args.sheddable_queue) + "  enableEviction: true\n",
            }
            with ExitStack() as stack:
                gws = {
                    name: stack.enter_context(gateway(fleet, work / name, configs[name]))
                    for name in args.targets.split(",")
                }
                await asyncio.sleep(1)
                low = await low_load(gws, urls, cap, args)
                for name, gw in gws.items():
                    res = await overload_and_stale(name, gw, urls, cap, args)
                    out["targets"][name] = {"low_load": low[name], **res}
                    await asyncio.sleep(3)
            return out
        finally:
            fleet.stop()


def print_table(res: dict[str, Any]) -> None:
    print(f"\ncapacity {res['capacity_rps']} req/s")
    print(f"admission CPU per request: {res['admission_cpu_us_per_request']} us")
    for name, t in res["targets"].items():
        low = t["low_load"]
        print(
            f"{name:>4} low load: TTFT p50/p99 {low['ttft_p50_ms']}/{low['ttft_p99_ms']} ms, "
            f"scheduler CPU {low['scheduler_cpu_ms_per_request']} ms/req"
        )
        for cls, c in t["overload"]["classes"].items():
            print(
                f"{name:>4} overload {cls:<11} TTFT p50/p99 {c['ttft_p50_ms']}/{c['ttft_p99_ms']} "
                f"ms  success {c['success_rate']}  shed {c['shed_rate']}  cut {c['cut_rate']}  "
                f"within SLO "
                f"{c['within_slo']}"
            )
        print(f"{name:>4} Jain (standard tenants): {t['overload']['jain_standard_tenants']}")
        print(f"{name:>4} stale metrics: {t['stale_metrics']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=2)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--low-seconds", type=float, default=10)
    ap.add_argument("--low-rounds", type=int, default=2)
    ap.add_argument("--overload-seconds", type=float, default=30)
    ap.add_argument("--slo-ms", type=float, default=2000, help="TTFT SLO for 'within SLO'")
    ap.add_argument("--sheddable-queue", type=int, default=8)
    ap.add_argument(
        "--sheddable-tokens",
        type=int,
        default=0,
        help="output tokens of the sheddable class (default: --output-tokens)",
    )
    ap.add_argument("--targets", default="off,on,evict", help="of off, on, evict")
    ap.add_argument("--out", default="benchmarks/reports/flow-control.json")
    args = ap.parse_args()
    bad = set(args.targets.split(",")) - {"off", "on", "evict"}
    if bad:
        ap.error(f"--targets: unknown {sorted(bad)}")
    if args.sheddable_tokens:
        TOKENS_BY_CLASS["sheddable"] = args.sheddable_tokens
    res = asyncio.run(main_async(args))
    print_table(res)
    write_report(
        args.out,
        "flow-control",
        "uv run python benchmarks/flow_control.py " + shlex.join(sys.argv[1:]),
        **res,
    )


if __name__ == "__main__":
    main()
