"""What a router costs per request, measured from outside on one fleet in one run.

Targets, each in front of the same simulated engines (llmd-sim, profile `instant` unless
--profile): `direct` (the client round-robins over the engines itself: the baseline), `envoy-rr`
(Envoy alone, round-robin), `llmd-lean` (Envoy + llmd-scheduler, the generated lean path:
request body buffered once, responses never through the scheduler), `llmd-full` (the same with
llm-d's full-duplex ext_proc shape: every response chunk through the scheduler), `llmd-authz`
(the lean path with Envoy asking the scheduler through ext_authz's HTTP check instead of
ext_proc), and the peers `sglang-cache-aware` and `vllm-router` when their virtualenvs can be
made. `noop-extproc` is Envoy's lean path in front of a do-nothing Python grpc.aio ext_proc
server (`noop_extproc.py`): the floor under any scheduler written on grpc.aio; `noop-authz` is
the same for an ext_authz HTTP check server (`noop_authz.py`).

Workload: streamed chat completions whose system prompts (~`--prompt-words` words) come from
16 groups, a short distinct user turn, `--output-tokens` tokens, `--concurrency` in flight,
`--requests` per target. For each target: client TTFT p50/p99 (first content chunk), the same
minus `direct`'s (what the router adds), errors, and CPU milliseconds per request of every
router process (user + system, from /proc) and of the engines' process. A router's idle CPU
(no traffic, `--idle-seconds`: metrics scraping, health checks) is measured first and reported
per second, with the per-request CPU beyond it (the cost that grows with traffic).

With `--rates R1,R2,...` the run is a rate ladder instead: for each target, open-loop Poisson
stages of `--stage-seconds` at each offered rate, reporting per stage the achieved rate, TTFT
p50/p99, errors and router CPU per request; then, per target, the highest stage it sustains: 0
errors, the client sending at >= 90% of the offered rate and >= 95% of that completed per
second, and TTFT p99 at most `--added-p99-ms` above `envoy-rr`'s at the same stage when
`envoy-rr` is among the targets.

Usage: uv run python benchmarks/gateway_overhead.py [--requests N] [--concurrency C]
           [--output-tokens T] [--prompt-words W] [--targets a,b,...] [--rounds R]
           [--sim-args '--max-model-len 40000'] [--out FILE]
       uv run python benchmarks/gateway_overhead.py --rates 100,200,300 --targets
           envoy-rr,llmd-lean [--stage-seconds S] [--added-p99-ms 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.bench.peers import PEERS, PeerError, running
from llmd.dev.envoy import EnvoyProcess, EnvoySettings
from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.vllm_cpu.server import free_port

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = (
    "direct",
    "envoy-rr",
    "noop-extproc",
    "noop-authz",
    "llmd-lean",
    "llmd-full",
    "llmd-authz",
    "sglang-cache-aware",
    "vllm-router",
)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def pids_listening(port: int) -> list[int]:
    """Processes holding a socket that listens on `port` (peers rename their processes, so
    their command lines cannot be searched)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # LISTEN
                    inodes.add(f"socket:[{f[9]}]")
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        out.append(int(entry.name))
                        break
    return out


def session_pids(leaders: list[int]) -> list[int]:
    """Every process in the sessions these processes lead (a peer's launcher and its workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) in leaders:  # session id
                out.append(int(entry.name))
    return out


@dataclass
class Target:
    name: str
    url: str
    router_pids: dict[str, list[int]]
    """Process label -> pids whose CPU counts as the router's."""
    engine_urls: list[str] = field(default_factory=list)
    """Only for `direct`: the client spreads requests over these itself."""


async def poisson_arrivals(rng: random.Random, rate: float, seconds: float) -> AsyncIterator[int]:
    """Yield 0, 1, 2, ... at the arrival times of a Poisson process at `rate` per second,
    for `seconds` from the first call (an open-loop load generator's clock)."""
    t0 = time.perf_counter()
    at = 0.0
    i = 0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i
        i += 1


def workload(n: int, words: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    systems = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(16)]
    out = []
    for i in range(n):
        system = systems[rng.randrange(16)]
        user = f"question {i}: " + " ".join(rng.choice(vocab) for _ in range(12))
        out.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
    return out


async def streamed_ttft(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    output_tokens: int,
    errors: dict[str, int],
) -> float | None:
    """One streamed chat request: seconds to its first content chunk, or None (counted in
    `errors` by status or exception name) when it failed."""
    body = {"model": "tiny", "messages": messages, "max_tokens": output_tokens,
            "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                await resp.read()
                return None
            async for line in resp.content:
                if first is None and line.startswith(b"data: {") and b'"content"' in line:
                    first = time.perf_counter() - t0
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return None
    if first is None:
        errors["no-content"] = errors.get("no-content", 0) + 1
    return first


async def drive(
    target: Target, prompts: list[list[dict[str, str]]], concurrency: int, output_tokens: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue[tuple[int, list[dict[str, str]]]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    bases = target.engine_urls or [target.url]

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i, messages = queue.get_nowait()
            url = bases[i % len(bases)]
            first = await streamed_ttft(session, url, messages, output_tokens, errors)
            if first is not None:
                ttfts.append(first)

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {
        "requests": len(prompts),
        "ok": len(ttfts),
        "errors": errors,
        "wall_s": round(wall, 3),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2) if ttfts else None,
        "ttft_p99_ms": round(ttfts[int(len(ttfts) * 0.99) - 1] * 1000, 2) if ttfts else None,
    }


async def drive_rate(
    target: Target,
    prompts: list[list[dict[str, str]]],
    rate: float,
    seconds: float,
    output_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Open loop: Poisson arrivals at `rate` for `seconds`, each request its own task (a slow
    router makes requests pile up instead of slowing the sender down)."""
    rng = random.Random(seed)
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    bases = target.engine_urls or [target.url]

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        messages = prompts[i % len(prompts)]
        first = await streamed_ttft(session, bases[i % len(bases)], messages, output_tokens, errors)
        if first is not None:
            ttfts.append(first)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        async for i in poisson_arrivals(rng, rate, seconds):
            tasks.append(asyncio.create_task(one(session, i)))
        sent_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {
        "offered_rate": rate,
        "sent": len(tasks),
        "send_rate": round(len(tasks) / sent_s, 1) if sent_s else None,
        "ok": len(ttfts),
        "achieved_rate": round(len(ttfts) / wall, 1) if wall else None,
        "errors": errors,
        "wall_s": round(wall, 3),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2) if ttfts else None,
        "ttft_p99_ms": round(ttfts[int(len(ttfts) * 0.99) - 1] * 1000, 2) if ttfts else None,
    }


@contextlib.contextmanager
def started(
    name: str, fleet: SimFleetProcess, work: Path, scheduler_args: list[str]
) -> Iterator[Target]:
    endpoints = [(e.address, e.port) for e in StaticFileDiscovery(fleet.endpoints_file).load()]
    if name == "direct":
        yield Target(name, "", {}, [f"http://{a}:{p}" for a, p in endpoints])
    elif name == "envoy-rr":
        envoy = EnvoyProcess(
            EnvoySettings(listen_port=free_port(), admin_port=free_port(),
                          listen_address="127.0.0.1", round_robin_only=True,
                          fallback_endpoints=endpoints),
            work / name,
        )  # fmt: skip
        envoy.start()
        try:
            assert envoy.proc is not None
            yield Target(name, envoy.url, {"envoy": [envoy.proc.pid]})
        finally:
            envoy.stop()
    elif name in ("noop-extproc", "noop-authz"):
        port = free_port()
        dests = ",".join(f"{a}:{p}" for a, p in endpoints)
        script = "noop_extproc.py" if name == "noop-extproc" else "noop_authz.py"
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / script), str(port), dests]
        )
        api: dict[str, Any] = (
            {"extproc_port": port}
            if name == "noop-extproc"
            else {"extproc_port": free_port(), "extauthz_port": port, "scheduler_api": "ext_authz"}
        )
        envoy = EnvoyProcess(
            EnvoySettings(listen_port=free_port(), admin_port=free_port(),
                          listen_address="127.0.0.1", feedback=False, **api),
            work / name,
        )  # fmt: skip
        try:
            time.sleep(1.5)
            envoy.start()
            assert envoy.proc is not None
            yield Target(name, envoy.url, {"noop": [server.pid], "envoy": [envoy.proc.pid]})
        finally:
            envoy.stop()
            server.kill()
            server.wait(timeout=10)
    elif name in ("llmd-lean", "llmd-full", "llmd-authz"):
        path = "full" if name == "llmd-full" else "lean"
        gw = Gateway.start(
            fleet.endpoints_file,
            work / name,
            envoy_overrides={"response_path": path},
            scheduler_args=scheduler_args,
            scheduler_api="ext_authz" if name == "llmd-authz" else "ext_proc",
        )
        try:
            assert gw.envoy.proc is not None
            pids = {"scheduler": [gw.scheduler.process.pid], "envoy": [gw.envoy.proc.pid]}
            yield Target(name, gw.url, pids)
        finally:
            gw.stop()
    elif name in PEERS:
        port = free_port()
        urls = [f"http://{a}:{p}" for a, p in endpoints]
        with running(name, urls, port, work / f"{name}.log") as url:
            yield Target(name, url, {name: session_pids(pids_listening(port))})
    else:
        raise ValueError(f"unknown target {name!r}; expected some of {ALL_TARGETS}")


def measure(
    name: str, fleet: SimFleetProcess, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    prompts = workload(args.requests, args.prompt_words, seed=1)
    warm = workload(max(20, args.concurrency * 4), args.prompt_words, seed=2)
    with started(name, fleet, work, shlex.split(args.scheduler_args)) as target:
        asyncio.run(drive(target, warm, args.concurrency, args.output_tokens))
        all_pids = [p for ps in target.router_pids.values() for p in ps]
        idle0, t_idle = cpu_seconds(all_pids), time.monotonic()
        time.sleep(args.idle_seconds)  # what the router costs with no traffic (scraping...)
        idle_ms_per_s = (cpu_seconds(all_pids) - idle0) * 1000 / (time.monotonic() - t_idle)
        before = {label: cpu_seconds(ps) for label, ps in target.router_pids.items()}
        engines_before = cpu_seconds([fleet.process.pid])
        row = asyncio.run(drive(target, prompts, args.concurrency, args.output_tokens))
        n = max(1, row["requests"])
        row["router_cpu_ms_per_request"] = {
            label: round((cpu_seconds(ps) - before[label]) * 1000 / n, 3)
            for label, ps in target.router_pids.items()
        }
        row["router_cpu_ms_total"] = round(
            sum(row["router_cpu_ms_per_request"].values()), 3
        ) if all_pids else 0.0  # fmt: skip
        row["router_idle_cpu_ms_per_s"] = round(idle_ms_per_s, 2)
        row["router_cpu_ms_per_request_beyond_idle"] = round(
            max(0.0, row["router_cpu_ms_total"] - idle_ms_per_s * row["wall_s"] / n), 3
        )
        row["engines_cpu_ms_per_request"] = round(
            (cpu_seconds([fleet.process.pid]) - engines_before) * 1000 / n, 3
        )
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    base = rows.get("direct", {})
    lines = [
        "| target | router CPU ms/req (by process) | of which beyond idle | idle CPU ms/s | "
        "TTFT p50 / p99 ms | added over direct p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        procs = ", ".join(f"{k} {v:.2f}" for k, v in r["router_cpu_ms_per_request"].items())
        added = "-"
        if name != "direct" and base.get("ttft_p50_ms") and r.get("ttft_p50_ms"):
            added = (f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:+.2f} / "
                     f"{r['ttft_p99_ms'] - base['ttft_p99_ms']:+.2f}")  # fmt: skip
        total = f"{r['router_cpu_ms_total']:.2f}" + (f" ({procs})" if procs else "")
        lines.append(
            f"| {name} | {total} | {r['router_cpu_ms_per_request_beyond_idle']:.2f} | "
            f"{r['router_idle_cpu_ms_per_s']:.1f} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
            f"{added} | {sum(r['errors'].values())} |"
        )
    return "\n".join(lines)


def measure_ladder(
    name: str, fleet: SimFleetProcess, work: Path, args: argparse.Namespace, rates: list[float]
) -> list[dict[str, Any]]:
    prompts = workload(2000, args.prompt_words, seed=1)
    warm = workload(max(20, args.concurrency * 4), args.prompt_words, seed=2)
    stages = []
    with started(name, fleet, work, shlex.split(args.scheduler_args)) as target:
        asyncio.run(drive(target, warm, args.concurrency, args.output_tokens))
        for k, rate in enumerate(rates):
            before = {label: cpu_seconds(ps) for label, ps in target.router_pids.items()}
            engines_before = cpu_seconds([fleet.process.pid])
            row = asyncio.run(
                drive_rate(target, prompts, rate, args.stage_seconds, args.output_tokens, k)
            )
            n = max(1, row["sent"])
            row["router_cpu_ms_per_request"] = {
                label: round((cpu_seconds(ps) - before[label]) * 1000 / n, 3)
                for label, ps in target.router_pids.items()
            }
            row["router_cpu_cores"] = round(
                sum(cpu_seconds(ps) - before[label] for label, ps in target.router_pids.items())
                / row["wall_s"],
                3,
            )
            row["engines_cpu_ms_per_request"] = round(
                (cpu_seconds([fleet.process.pid]) - engines_before) * 1000 / n, 3
            )
            stages.append(row)
            print(f"  {rate:g} req/s: achieved {row['achieved_rate']}, ttft p50 "
                  f"{row['ttft_p50_ms']} p99 {row['ttft_p99_ms']} ms, errors {row['errors']}, "
                  f"router CPU {row['router_cpu_ms_per_request']} ms/req", flush=True)  # fmt: skip
            time.sleep(1.0)
    return stages


def sustained(
    ladders: dict[str, list[dict[str, Any]]], added_p99_ms: float
) -> dict[str, dict[str, Any]]:
    """Per target: the highest offered rate, climbing the ladder until the first stage that
    fails, with 0 errors, the client sending at >= 90% of it, >= 95% of what was sent completed
    per second, and (when `envoy-rr` ran) TTFT p99 within `added_p99_ms` of Envoy's at the
    same stage."""
    base = {s["offered_rate"]: s for s in ladders.get("envoy-rr", [])}
    out: dict[str, dict[str, Any]] = {}
    for name, stages in ladders.items():
        best: float | None = None
        failure: str | None = None
        for s in stages:
            rate = s["offered_rate"]
            problems = []
            if s["errors"]:
                problems.append(f"{sum(s['errors'].values())} errors")
            if (s["send_rate"] or 0) < 0.9 * rate:
                problems.append(f"the client sent only {s['send_rate']} req/s")
            if (s["achieved_rate"] or 0) < 0.95 * (s["send_rate"] or rate):
                problems.append(f"achieved {s['achieved_rate']} of {s['send_rate']} req/s sent")
            b = base.get(rate)
            added = None
            if b is not None and name != "envoy-rr" and s["ttft_p99_ms"] and b["ttft_p99_ms"]:
                added = round(s["ttft_p99_ms"] - b["ttft_p99_ms"], 2)
                if added > added_p99_ms:
                    problems.append(f"p99 {added:+.2f} ms over Envoy")
            s["added_p99_over_envoy_ms"] = added
            if failure is None:
                if problems:
                    failure = f"{rate:g} req/s: " + ", ".join(problems)
                else:
                    best = rate
        out[name] = {"highest_sustained_rate": best, "first_failure": failure}
    return out


def ladder_table(ladders: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| target | offered req/s | achieved | TTFT p50 / p99 ms | added p99 over Envoy ms | "
        "router CPU ms/req (by process) | router cores | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, stages in ladders.items():
        for s in stages:
            procs = ", ".join(f"{k} {v:.2f}" for k, v in s["router_cpu_ms_per_request"].items())
            added = s.get("added_p99_over_envoy_ms")
            lines.append(
                f"| {name} | {s['offered_rate']:g} | {s['achieved_rate']} | "
                f"{s['ttft_p50_ms']} / {s['ttft_p99_ms']} | "
                f"{'-' if added is None else f'{added:+.2f}'} | {procs or '-'} | "
                f"{s['router_cpu_cores']} | {sum(s['errors'].values())} |"
            )
    return "\n".join(lines)


def ladder_main(args: argparse.Namespace, targets: list[str], fleet: SimFleetProcess,
                work: Path) -> int:  # fmt: skip
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    ladders: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    try:
        for name in targets:
            print(f"{name}: rates {args.rates} ...", flush=True)
            try:
                ladders[name] = measure_ladder(name, fleet, work, args, rates)
            except PeerError as exc:
                skipped[name] = str(exc)[:300]
                print(f"  skipped: {skipped[name]}", flush=True)
    finally:
        fleet.stop()
    best = sustained(ladders, args.added_p99_ms)
    print(ladder_table(ladders))
    for name, b in best.items():
        failed = f" (first failure: {b['first_failure']})" if b["first_failure"] else ""
        print(f"{name}: highest sustained {b['highest_sustained_rate']} req/s{failed}")
    write_report(
        args.out,
        "gateway-overhead-rate-ladder",
        "uv run python benchmarks/gateway_overhead.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        stages=ladders,
        sustained=best,
        skipped=skipped,
        table=ladder_table(ladders),
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="requests per target (300)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens per answer (64)")
    p.add_argument("--prompt-words", type=int, default=600, help="system prompt words (600)")
    p.add_argument("--engines", type=int, default=4, help="simulated engines (4)")
    p.add_argument("--profile", default="instant", help="llmd-sim latency profile (instant)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle CPU window (3 s)")
    p.add_argument("--scheduler-args", default="", help="extra llmd-scheduler flags (llmd-*)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all targets, keep the medians")
    p.add_argument(
        "--sim-args",
        default="",
        help="extra llmd-sim flags, e.g. '--max-model-len 40000' for 32k-token prompts",
    )
    p.add_argument(
        "--rates",
        default="",
        help="comma list of offered req/s: run an open-loop rate ladder instead (see above)",
    )
    p.add_argument("--stage-seconds", type=float, default=10.0, help="per ladder stage (10 s)")
    p.add_argument(
        "--added-p99-ms",
        type=float,
        default=5.0,
        help="ladder pass mark: TTFT p99 over envoy-rr's at the same stage (5 ms)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/gateway-overhead.json"))
    args = p.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    fleet = SimFleetProcess.start(
        count=args.engines,
        block_size=16,
        profile=args.profile,
        work=work,
        extra_args=shlex.split(args.sim_args),
    )
    if args.rates:
        return ladder_main(args, targets, fleet, work)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    skipped: dict[str, str] = {}
    try:
        for rnd in range(args.rounds):
            for name in targets:
                if name in skipped:
                    continue
                print(f"round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
                try:
                    runs[name].append(measure(name, fleet, work, args))
                except PeerError as exc:
                    skipped[name] = str(exc)[:300]
                    print(f"  skipped: {skipped[name]}", flush=True)
                    continue
                r = runs[name][-1]
                print(f"  ttft p50 {r['ttft_p50_ms']} ms, p99 {r['ttft_p99_ms']} ms, "
                      f"router CPU {r['router_cpu_ms_per_request']} ms/req, "
                      f"errors {r['errors']}", flush=True)  # fmt: skip
    finally:
        fleet.stop()
    rows = {}
    for name, rs in runs.items():
        if not rs:
            continue
        mid = sorted(rs, key=lambda r: r["ttft_p50_ms"] or 0)[len(rs) // 2]
        rows[name] = mid
    print(table(rows))
    write_report(
        args.out,
        "gateway-overhead",
        "uv run python benchmarks/gateway_overhead.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        results=rows,
        all_rounds=runs,
        skipped=skipped,
        table=table(rows),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
