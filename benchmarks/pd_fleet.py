"""P/D disaggregation on a simulated fleet: aggregated serving against three P/D deciders.

The same seeded, prefill-heavy trace (llm-d's P/D guide shape, scaled down: half the requests
carry a long new prompt, half are short chats, all ask for the same number of output tokens;
Poisson arrivals in a rate sweep) is sent through Envoy + llmd-scheduler to:

- `aggregated`: `--prefill + --decode` simulated engines, each prefilling and decoding
  (the scheduler's default config);
- `pd-always`, `pd-prefix`, `pd-llmd`: `--prefill` prefill engines and `--decode` decode
  engines (vLLM's NixlConnector contract: the decode engine pulls the prefill's KV), an
  `llmd-sidecar` process in front of each decode engine, and the P/D config with llm-d's
  `always-disagg-pd-decider`, llm-d's `prefix-based-pd-decider` (`nonCachedTokens` 256) or
  llmd's `llmd-cost-pd-decider`.

Each target gets a fresh fleet. Reported per rate: TTFT, TPOT and ITL p50/p90/p99 and output
token throughput from the client, the engines' own mean TTFT and TPOT, and the share of
requests each P/D decider disaggregated.

    uv run python benchmarks/pd_fleet.py [--prefill 1 --decode 3] [--rates 2,4,8] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.bench.cli import engine_means, engine_scrape
from llmd.bench.loadgen import run_trace
from llmd.bench.metrics import Summary
from llmd.bench.workloads import Stage, TraceRequest
from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.vllm_cpu.server import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
WORDS_PER_TOKEN = 1 / 5.5  # the tiny tokenizer makes ~5.5 tokens of one synthetic word

PD_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: 16}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
{decider}
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: {name}}}}}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: max-score-picker}},
            {{pluginRef: queue-scorer, weight: 2}}, {{pluginRef: prefix-cache-scorer, weight: 1}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: max-score-picker}},
            {{pluginRef: prefix-cache-scorer, weight: 3}}, {{pluginRef: queue-scorer, weight: 2}},
            {{pluginRef: kv-cache-utilization-scorer, weight: 2}}]
"""
DECIDERS = {
    "pd-always": ("always-disagg-pd-decider", "- type: always-disagg-pd-decider"),
    "pd-prefix": (
        "prefix-based-pd-decider",
        "- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 256}",
    ),
    "pd-llmd": ("llmd-cost-pd-decider", "- type: llmd-cost-pd-decider"),
}
TARGETS = ("aggregated", *DECIDERS)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(n))


def build_trace(args: argparse.Namespace) -> tuple[list[TraceRequest], list[Stage]]:
    """Poisson arrivals per rate; half long new prompts, half short chats."""
    rng = random.Random(args.seed)
    stages = [Stage(rate=r, duration_s=args.seconds) for r in args.rate_list]
    out: list[TraceRequest] = []
    t0 = 0.0
    for i, stage in enumerate(stages):
        assert stage.rate is not None
        t = t0
        while True:
            t += rng.expovariate(stage.rate)
            if t >= t0 + stage.duration_s:
                break
            long_prompt = rng.random() < args.long_share
            n = args.long_tokens if long_prompt else args.short_tokens
            prompt = words(rng, max(1, int(n * WORDS_PER_TOKEN)))
            out.append(TraceRequest(t, args.output_tokens, prompt=prompt, stage=i))
        t0 += stage.duration_s
    return out, stages


@contextmanager
def aggregated_fleet(args: argparse.Namespace, work: Path) -> Iterator[tuple[Path, list[str]]]:
    fleet = SimFleetProcess.start(
        count=args.prefill + args.decode,
        block_size=16,
        profile=args.profile,
        work=work,
        extra_args=["--max-num-seqs", str(args.max_num_seqs)],
    )
    try:
        yield fleet.endpoints_file, [e.url for e in fleet.engines]
    finally:
        fleet.stop()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmd-sidecar exited ({proc.returncode}) before {url} answered")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llmd-sidecar at {url} did not answer in {timeout_s:.0f} s")


def start_sidecar(
    model_server_port: int | str, log_path: Path, metrics_port: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """An llmd-sidecar process in front of the engine on `model_server_port`, once healthy:
    (the process, its port)."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llmd.sidecar.cli", "--host", "127.0.0.1",
                "--port", str(port), "--model-server-port", str(model_server_port),
                "--metrics-port", str(metrics_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
    except BaseException:
        stop_processes([proc])
        raise
    return proc, port


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM all, then wait for each (10 s before SIGKILL)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def stage_rows(records: list[Any], stages: list[Stage]) -> list[dict[str, Any]]:
    """Client figures per stage of a trace: TTFT, TPOT, ITL p50/p90/p99 and output tokens/s."""
    rows = []
    for i, stage in enumerate(stages):
        recs = [r for r in records if r.stage == i]
        span = max((r.done_at or r.sent_at) for r in recs) - min(r.sent_at for r in recs)
        agg = Summary(recs, span).aggregate()
        lat = agg["latency"]
        rows.append(
            {
                "rate": stage.rate,
                "requests": agg["requests"]["total"],
                "failures": agg["requests"]["failures"],
                "ttft_ms": {k: pct(lat["time_to_first_token"], k) for k in ("p50", "p90", "p99")},
                "tpot_ms": {k: pct(lat["time_per_output_token"], k) for k in ("p50", "p90", "p99")},
                "itl_ms": {k: pct(lat["inter_token_latency"], k) for k in ("p50", "p90", "p99")},
                "output_tokens_per_s": round(agg["throughput"]["output_token_rate"]["mean"], 1),
            }
        )
    return rows


@contextmanager
def pd_fleet(args: argparse.Namespace, work: Path) -> Iterator[tuple[Path, list[str]]]:
    """Prefill engines, decode engines, and a sidecar process in front of each decode one."""
    fleets: list[SimFleetProcess] = []
    sidecars: list[subprocess.Popen[bytes]] = []
    try:
        for role, count in (("kv_producer", args.prefill), ("kv_consumer", args.decode)):
            sub = work / role
            sub.mkdir(parents=True, exist_ok=True)
            transfer = json.dumps({"kv_connector": "NixlConnector", "kv_role": role})
            fleets.append(
                SimFleetProcess.start(
                    count=count,
                    block_size=16,
                    profile=args.profile,
                    work=sub,
                    extra_args=[
                        "--kv-transfer-config",
                        transfer,
                        "--max-num-seqs",
                        str(args.max_num_seqs),
                    ],
                )
            )
        prefill, decode = fleets
        entries: list[dict[str, Any]] = []
        for i, e in enumerate(prefill.engines):
            entries.append(
                {
                    "name": f"prefill-{i}",
                    "address": "127.0.0.1",
                    "port": e.url.rsplit(":", 1)[1],
                    "labels": {"llm-d.ai/role": "prefill"},
                }
            )
        for i, e in enumerate(decode.engines):
            proc, port = start_sidecar(e.url.rsplit(":", 1)[1], work / f"sidecar-{i}.log")
            sidecars.append(proc)
            entries.append(
                {
                    "name": f"decode-{i}",
                    "address": "127.0.0.1",
                    "port": str(port),
                    "labels": {"llm-d.ai/role": "decode"},
                }
            )
        endpoints = work / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
        yield endpoints, [e.url for f in fleets for e in f.engines]
    finally:
        stop_processes(sidecars)
        for f in fleets:
            f.stop()


def pd_decisions(scheduler_metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in scheduler_metrics.splitlines():
        if line.startswith("llm_d_epp_disagg_decision_total{"):
            kind = line.split('decision_type="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def pct(stats: dict[str, Any], key: str) -> float | None:
    v = stats.get(key)
    return None if v is None else round(float(v) * 1000, 1)


def run_target(target: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    trace, stages = build_trace(args)
    work.mkdir(parents=True, exist_ok=True)
    fleet = aggregated_fleet if target == "aggregated" else pd_fleet
    with fleet(args, work) as (endpoints, urls):
        config = None
        if target in DECIDERS:
            name, decider = DECIDERS[target]
            config = work / "epp.yaml"
            config.write_text(PD_CONFIG.format(decider=decider, name=name))
        gw = Gateway.start(endpoints, work / "gateway", config_file=config)
        try:
            print(f"== {target}: {len(trace)} requests", file=sys.stderr, flush=True)
            before = engine_scrape(urls)
            records, wall = asyncio.run(run_trace(gw.url, trace, stages, MODEL))
            means = engine_means(before, engine_scrape(urls))
            decisions = pd_decisions(gw.scheduler.metrics_text())
        finally:
            gw.stop()
    rows = stage_rows(records, stages)

    def mean(kind: str) -> float | None:
        v = means[kind]
        return None if v is None else round(1000 * v, 1)

    total = sum(decisions.values())
    return {
        "target": target,
        "wall_s": round(wall, 1),
        "stages": rows,
        "engine_ttft_mean_ms": mean("time_to_first_token"),
        "engine_tpot_mean_ms": mean("time_per_output_token"),
        "disaggregated_share": round(decisions.get("prefill-decode", 0) / total, 3)
        if total
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {TARGETS}")
    p.add_argument("--prefill", type=int, default=1, help="prefill engines (P/D targets)")
    p.add_argument("--decode", type=int, default=3, help="decode engines (P/D targets)")
    p.add_argument("--profile", default="h100-32b-tp2", help="llmd-sim latency profile")
    p.add_argument("--rates", default="2,4,8", help="Poisson request rates, comma-separated")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per rate")
    p.add_argument("--long-tokens", type=int, default=3000, help="tokens of a long prompt")
    p.add_argument("--short-tokens", type=int, default=200, help="tokens of a short chat")
    p.add_argument("--long-share", type=float, default=0.5, help="share of long prompts")
    p.add_argument("--output-tokens", type=int, default=150, help="output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "pd-fleet.json"))
    return run_benchmark(
        p,
        argv,
        "pd-fleet",
        run_target,
        lambda r: (
            f"engines: TTFT mean {r['engine_ttft_mean_ms']} ms, TPOT mean "
            f"{r['engine_tpot_mean_ms']} ms; disaggregated {r['disaggregated_share']}"
        ),
    )


def run_benchmark(
    p: argparse.ArgumentParser,
    argv: list[str] | None,
    name: str,
    run_target: Callable[[str, argparse.Namespace, Path], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> int:
    """The P/D benchmarks' common main: parse `p` (which has --targets, --rates and --out),
    run each target on a fresh work folder, print every stage and `summary` of each target,
    write the report as `benchmarks/<name with _>.py` ran it."""
    args = p.parse_args(argv)
    args.rate_list = [float(r) for r in args.rates.split(",")]
    known = p.get_default("targets").split(",")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in known]
    if unknown:
        p.error(f"unknown target(s) {unknown}: choose from {known}")
    results = []
    with tempfile.TemporaryDirectory(prefix=f"llmd-{name}-") as tmp:
        for target in targets:
            r = run_target(target, args, Path(tmp) / target)
            results.append(r)
            for s in r["stages"]:
                print(
                    f"{target:>12} {s['rate']:>5g} req/s: TTFT p50/p90/p99 {s['ttft_ms']['p50']}/"
                    f"{s['ttft_ms']['p90']}/{s['ttft_ms']['p99']} ms, TPOT p50/p90 "
                    f"{s['tpot_ms']['p50']}/{s['tpot_ms']['p90']} ms, "
                    f"{s['output_tokens_per_s']} tok/s, {s['failures']} failed",
                    flush=True,
                )
            print(f"{target:>12} {summary(r)}", flush=True)
    script = name.replace("-", "_")
    command = f"uv run python benchmarks/{script}.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "rate_list")}
    write_report(args.out, name, command.strip(), settings=settings, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
