"""Time outside the engines, one request at a time, on 2 real vLLM CPU servers.

The question: how much of a request's TTFT does the path in front of vLLM add, with llmd (ext_proc,
and `llmd-authz`: Envoy asking through ext_authz) against Envoy round-robin and against calling
one engine directly? "Outside" = the client's mean TTFT
minus the engines' own mean TTFT (`vllm:time_to_first_token_seconds`, which starts once the
engine's front end has rendered and tokenized the request). Requests go one at a time, so
no queueing and no routing imbalance enters the figure: what is left is the path plus vLLM's
front end, and this machine's noise.

The servers run with niceness `--nice` (10), so that they do not starve the router processes
that share this 2-core machine, and their shared-memory queue readers spin for `--shm-spin`
after each read (the harness's 1 ms, with a 10 ms recheck; `vllm` keeps vLLM's own 1 s and
5 s). Each round runs every target once on the same servers, with the prefix caches emptied
before each target.

Usage: uv run python benchmarks/vllm_path_probe.py [--requests 48] [--rounds 2] [--nice 10]
    [--shm-spin 0.001[:10]|vllm] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pd_vllm import parse_shm
from protocol_throughput import write_report

from llmd.bench.cli import engine_means, engine_scrape
from llmd.dev.cli import write_endpoints_file
from llmd.dev.envoy import EnvoyProcess, EnvoySettings
from llmd.dev.gateway import Gateway
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import (
    SHM_SPIN_S,
    VllmServerSpec,
    free_port,
    start_servers,
)
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def workload(n: int) -> list[tuple[str, str]]:
    """8 ~1k-token system prompts in turn, each with a ~100-token question."""
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)]
    systems = [" ".join(rng.choice(vocab) for _ in range(180)) for _ in range(8)]
    return [(systems[i % 8], " ".join(rng.choice(vocab) for _ in range(18))) for i in range(n)]


def probe(url: str, engines: list[str], reqs: list[tuple[str, str]]) -> dict[str, Any]:
    for u in engines:
        httpx.post(u + "/reset_prefix_cache", timeout=30).raise_for_status()
    before = engine_scrape(engines)
    ttfts: list[float] = []
    with httpx.Client(timeout=60) as c:
        for system, question in reqs:
            body = {"model": "tiny", "max_tokens": 8, "stream": True,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": question}]}  # fmt: skip
            t0 = time.perf_counter()
            first = None
            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {") and '"content"' in line:
                        first = time.perf_counter() - t0
            if first is None:
                raise RuntimeError(f"{url}: a streamed answer without content")
            ttfts.append(first)
            time.sleep(0.05)
    engine = engine_means(before, engine_scrape(engines))["time_to_first_token"]
    mean = statistics.mean(ttfts)
    return {
        "client_ttft_mean_ms": round(mean * 1000, 1),
        "client_ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "engine_ttft_mean_ms": round(engine * 1000, 1) if engine else None,
        "outside_ms": round((mean - engine) * 1000, 1) if engine else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests per target and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all targets (2)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the vLLM servers (10)")
    p.add_argument(
        "--shm-spin",
        default=f"{SHM_SPIN_S:g}",
        help="vLLM's shared-memory queue readers: SPIN seconds (with the harness's recheck), "
        "SPIN:RECHECK_MS, or 'vllm' for vLLM's own 1 s spin and 5 s recheck",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/vllm-path-probe.json"))
    args = p.parse_args()
    try:
        spin, recheck = parse_shm(args.shm_spin)
    except ValueError:
        p.error(f"--shm-spin takes SPIN[:RECHECK_MS] or 'vllm', not {args.shm_spin!r}")
    work = Path(tempfile.mkdtemp(prefix="vllm-path-probe-"))
    print("preparing the vLLM CPU environment and tiny model...", flush=True)
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    specs = [
        VllmServerSpec(
            pod=f"vllm-{i}",
            model_dir=model,
            cpu_core=i,
            nice=args.nice,
            shm_spin_s=spin,
            shm_recheck_ms=recheck,
            env={"VLLM_SERVER_DEV_MODE": "1"},
        )
        for i in range(2)
    ]
    print(f"starting 2 vLLM servers; logs in {work}", flush=True)
    servers = start_servers(env, specs, work)
    endpoints = work / "endpoints.yaml"
    write_endpoints_file(servers, endpoints)
    engines = [s.url for s in servers]
    reqs = workload(args.requests)
    rows: list[dict[str, Any]] = []
    try:
        fallback = [(e.address, e.port) for e in StaticFileDiscovery(endpoints).load()]
        envoy = EnvoyProcess(
            EnvoySettings(listen_port=free_port(), admin_port=free_port(),
                          listen_address="127.0.0.1", round_robin_only=True,
                          fallback_endpoints=fallback),
            work / "envoy",
        )  # fmt: skip
        envoy.start()
        gateway = Gateway.start(endpoints, work / "gateway")
        authz = Gateway.start(endpoints, work / "gateway-authz", scheduler_api="ext_authz")
        try:
            targets = {
                "envoy-rr": envoy.url,
                "llmd": gateway.url,
                "llmd-authz": authz.url,
                "direct (engine 0)": engines[0],
            }
            for rnd in range(args.rounds):
                for name, url in targets.items():
                    row = {"round": rnd + 1, "target": name, **probe(url, engines, reqs)}
                    rows.append(row)
                    print(row, flush=True)
        finally:
            authz.stop()
            gateway.stop()
            envoy.stop()
    finally:
        for s in servers:
            s.stop()
    write_report(
        args.out,
        "vllm-path-probe",
        "uv run python benchmarks/vllm_path_probe.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        results=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
