"""Cache-source routing on a simulated fleet: a busy pod's hot prefix pulled by an idle pod,
against recomputing it there.

`--engines` simulated engines run vLLM 0.32's NixlConnector as `kv_both` (each can prefill for
another and pull from another), each behind an `llmd-sidecar` process, all labelled role `both`.
The same seeded trace goes through Envoy + llmd-scheduler to each target, on a fresh fleet:

- `aggregated`: prefix-cache (weight 1), queue (1) and active-request (2) scorers, a mix that
  spreads load before it keeps affinity, no P/D: when a prefix's holder has more requests in
  flight than the others, the request goes elsewhere and the prefix is computed again there;
- `cache-source`: the same scorers for the decode pick, plus `disagg-profile-handler` with
  `llmd-cache-source-pd-decider`: the holder prefills (from its cache) and the chosen pod pulls
  the blocks, when that is predicted to be faster than recomputing.

The trace: `--prefixes` long shared prefixes (`--prefix-tokens` each) with Zipf popularity, each
request one of them plus a short new question, `--output-tokens` out, Poisson arrivals in a
rate sweep. Reported per rate: client TTFT / TPOT p50/p90/p99 and output tokens/s; per run the
engines' prompt tokens by source (computed, local cache hit, pulled over NIXL) and the share of
requests that pulled.

    uv run python benchmarks/cache_source.py [--rates 4,8] [--seconds 20] [--engines 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pd_fleet import (
    WORDS_PER_TOKEN,
    pd_decisions,
    run_benchmark,
    stage_rows,
    start_sidecar,
    stop_processes,
    words,
)

from llmd.bench.loadgen import run_trace
from llmd.bench.workloads import Stage, TraceRequest
from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol import metrics as pm

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
SCORERS = """- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16}
- type: prefix-cache-scorer
- type: queue-scorer
- type: active-request-scorer
- type: max-score-picker"""
DECODE = """[{pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 1},
            {pluginRef: queue-scorer, weight: 1},
            {pluginRef: active-request-scorer, weight: 2}]"""
CONFIGS = {
    "aggregated": f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{SCORERS}
schedulingProfiles:
- name: default
  plugins: {DECODE}
""",
    "cache-source": f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{SCORERS}
- type: prefill-filter
- type: decode-filter
- type: llmd-cache-source-pd-decider
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: llmd-cache-source-pd-decider}}}}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: max-score-picker}},
            {{pluginRef: prefix-cache-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {DECODE[1:]}
""",
}
TARGETS = tuple(CONFIGS)
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


def build_trace(args: argparse.Namespace) -> tuple[list[TraceRequest], list[Stage]]:
    rng = random.Random(args.seed)
    n_words = max(1, int(args.prefix_tokens * WORDS_PER_TOKEN))
    prefixes = [f"shared context {k}: " + words(rng, n_words) for k in range(args.prefixes)]
    weights = [1 / (k + 1) ** args.zipf for k in range(args.prefixes)]
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
            (prefix,) = rng.choices(prefixes, weights)
            prompt = prefix + " question: " + words(rng, 8)
            out.append(TraceRequest(t, args.output_tokens, prompt=prompt, stage=i))
        t0 += stage.duration_s
    return out, stages


@contextmanager
def both_fleet(args: argparse.Namespace, work: Path) -> Iterator[tuple[Path, list[str]]]:
    """`kv_both` engines, each behind an llmd-sidecar process; endpoints are the sidecars."""
    transfer = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    fleet = SimFleetProcess.start(
        count=args.engines,
        block_size=16,
        profile=args.profile,
        work=work,
        extra_args=["--kv-transfer-config", transfer, "--max-num-seqs", str(args.max_num_seqs),
                    "--num-gpu-blocks-override", str(args.gpu_blocks)],
    )  # fmt: skip
    sidecars: list[subprocess.Popen[bytes]] = []
    try:
        entries = []
        for i, e in enumerate(fleet.engines):
            proc, port = start_sidecar(e.url.rsplit(":", 1)[1], work / f"sidecar-{i}.log")
            sidecars.append(proc)
            entries.append({"name": f"pod-{i}", "address": "127.0.0.1", "port": str(port),
                            "labels": {"llm-d.ai/role": "both"}})  # fmt: skip
        endpoints = work / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
        yield endpoints, [e.url for e in fleet.engines]
    finally:
        stop_processes(sidecars)
        fleet.stop()


def tokens_by_source(urls: list[str]) -> dict[str, float]:
    """The fleet's prompt tokens by source (computed, local cache hit, pulled)."""
    out = dict.fromkeys(SOURCES, 0.0)
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for sample in pm.parse_samples(text, {pm.PROMPT_TOKENS_BY_SOURCE}):
            source = sample.labels.get("source", "")
            if source in out:
                out[source] += sample.value
    return out


def run_target(target: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    trace, stages = build_trace(args)
    work.mkdir(parents=True, exist_ok=True)
    with both_fleet(args, work) as (endpoints, urls):
        config = work / "epp.yaml"
        config.write_text(CONFIGS[target])
        gw = Gateway.start(endpoints, work / "gateway", config_file=config)
        try:
            print(f"== {target}: {len(trace)} requests", file=sys.stderr, flush=True)
            before = tokens_by_source(urls)
            records, wall = asyncio.run(run_trace(gw.url, trace, stages, MODEL))
            after = tokens_by_source(urls)
            decisions = pd_decisions(gw.scheduler.metrics_text())
        finally:
            gw.stop()
    rows = stage_rows(records, stages)
    total = sum(decisions.values())
    return {
        "target": target,
        "wall_s": round(wall, 1),
        "stages": rows,
        "prompt_tokens_by_source": {k: round(after[k] - before[k]) for k in SOURCES},
        "pulled_share": round(decisions.get("prefill-decode", 0) / total, 3) if total else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {TARGETS}")
    p.add_argument("--engines", type=int, default=4, help="kv_both engines")
    p.add_argument("--profile", default="h100-32b-tp2", help="llmd-sim latency profile")
    p.add_argument("--rates", default="4,8", help="Poisson request rates, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per rate")
    p.add_argument("--prefixes", type=int, default=16, help="shared prefixes")
    p.add_argument("--prefix-tokens", type=int, default=6000, help="tokens of a shared prefix")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of their popularity")
    p.add_argument("--output-tokens", type=int, default=100, help="output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--gpu-blocks", type=int, default=4000, help="KV blocks per engine (16 tok)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "cache-source.json"))
    return run_benchmark(
        p,
        argv,
        "cache-source",
        run_target,
        lambda r: (
            f"prompt tokens by source {r['prompt_tokens_by_source']}; pulled {r['pulled_share']}"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
