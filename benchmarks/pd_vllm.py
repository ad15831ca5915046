"""P/D disaggregation on real vLLM 0.32 CPU engines (1 prefill + 1 decode, NixlConnector over
UCX TCP), through Envoy, llmd-scheduler (llm-d's P/D config) and an llmd-sidecar process.

For each NIXL progress-thread poll delay given (`--progress-delays`; 0 is NIXL 1.5.1 as shipped,
whose progress thread polls without sleeping) and each setting of vLLM's shared-memory queue
readers (`--shm`: `SPIN` seconds of spinning after a read with the harness's recheck,
`SPIN:RECHECK_MS`, or `vllm`: vLLM 0.32 as shipped, 1 s spin and 5 s recheck), the two engines
are started andmeasured:

- idle CPU of each engine's processes (cores busy while no request is running);
- `pd`: streamed completions of unique ~1.3k-token prompts through the gateway, disaggregated
  (the sidecar's prefill leg, KV pull and decode leg): client TTFT and end-to-end time, and the
  sidecar's own leg durations;
- `aggregated`: the same kind of request sent straight to the decode engine (no gateway, no
  P/D): what the engine alone takes;
- the engines' own figures: the decode engine's NIXL transfer time and the prompt tokens it
  took from the prefill engine (external prefix-cache hits).

Requests are sequential and the two paths alternate, so both see the same machine.

Usage: uv run python benchmarks/pd_vllm.py [--requests 12] [--progress-delays 1000,0]
    [--shm 0.001,0.001:5000,vllm] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pd_fleet import start_sidecar, stop_processes
from protocol_throughput import write_report

from llmd.dev.gateway import Gateway
from llmd.protocol import metrics as pm
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import (
    SHM_RECHECK_MS,
    SHM_SPIN_S,
    VllmServer,
    free_port,
    nixl_server_spec,
    start_servers,
)
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""


def pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def metric(url: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) on `url`'s /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for s in pm.parse_samples(text, {name}))


def idle_cores(servers: list[VllmServer], seconds: float = 3.0) -> dict[str, float]:
    before = {s.spec.pod: s.cpu_seconds() for s in servers}
    time.sleep(seconds)
    return {s.spec.pod: round((s.cpu_seconds() - before[s.spec.pod]) / seconds, 2) for s in servers}


def stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(TTFT, end-to-end) of one streamed completion, in seconds."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def sidecar_histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of the sidecar's leg histograms."""
    out: dict[str, tuple[float, float]] = {}
    for name in ("prefill_duration", "decode_duration", "true_ttft"):
        base = f"llmd_sidecar_{name}_seconds"
        out[name] = (metric(url, base + "_sum"), metric(url, base + "_count"))
    return out


def run_setting(
    delay_us: int,
    shm: tuple[float | None, int | None],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    specs = [
        nixl_server_spec(role, model, kv_role, cpu_core=core, progress_delay_us=delay_us,
                         shm_spin_s=shm[0], shm_recheck_ms=shm[1])
        for role, kv_role, core in (("prefill", "kv_producer", 0), ("decode", "kv_consumer", 1))
    ]  # fmt: skip
    t0 = time.monotonic()
    spin = "vLLM's 1 s / 5 s" if shm[0] is None else f"{shm[0]:g} s / {shm[1]} ms"
    print(f"[pd-vllm] NIXL delay {delay_us} us, queue spin/recheck {spin}: starting 2 vLLM NIXL "
          "engines", file=sys.stderr)  # fmt: skip
    tag = f"{delay_us}-{shm[0]}-{shm[1]}"
    prefill, decode = start_servers(env, specs, work / f"vllm-{tag}")
    started_s = time.monotonic() - t0
    sidecar_metrics = free_port()
    gateway = None
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        sidecar, sidecar_port = start_sidecar(
            decode.port, work / f"sidecar-{tag}.log", sidecar_metrics
        )
        endpoints = work / f"endpoints-{tag}.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": [
            {"name": "prefill", "address": "127.0.0.1", "port": str(prefill.port),
             "labels": {"llm-d.ai/role": "prefill"}},
            {"name": "decode", "address": "127.0.0.1", "port": str(sidecar_port),
             "labels": {"llm-d.ai/role": "decode"}},
        ]}))  # fmt: skip
        config = work / "pd.yaml"
        config.write_text(CONFIG)
        gateway = Gateway.start(endpoints, work / f"gw-{tag}", config_file=config)
        idle = idle_cores([prefill, decode])
        print(f"[pd-vllm] idle cores used: {idle}", file=sys.stderr)
        xfer = (metric(decode.url, "vllm:nixl_xfer_time_seconds_sum"),
                metric(decode.url, "vllm:nixl_xfer_time_seconds_count"))  # fmt: skip
        pulled0 = metric(decode.url, "vllm:external_prefix_cache_hits_total")
        results: dict[str, dict[str, list[float]]] = {
            "pd": {"ttft": [], "e2e": []},
            "aggregated": {"ttft": [], "e2e": []},
        }
        sidecar_url = f"http://127.0.0.1:{sidecar_metrics}"
        legs: dict[str, list[float]] = {"prefill_duration": [], "decode_duration": [],
                                        "true_ttft": []}  # fmt: skip
        with httpx.Client(timeout=300) as client:
            for i in range(args.requests):
                unique = f"{tag}-{i}-{time.time_ns()}"
                prompt = f"request {unique}: " + "the quick brown fox jumps over the lazy dog " * 48
                before = sidecar_histograms(sidecar_url)
                ttft, e2e = stream(client, gateway.url, prompt, args.max_tokens)
                after = sidecar_histograms(sidecar_url)
                for name in legs:
                    legs[name].append(after[name][0] - before[name][0])
                results["pd"]["ttft"].append(ttft)
                results["pd"]["e2e"].append(e2e)
                ttft, e2e = stream(client, decode.url, "aggregated " + prompt, args.max_tokens)
                results["aggregated"]["ttft"].append(ttft)
                results["aggregated"]["e2e"].append(e2e)
                print(f"[pd-vllm] {i + 1}/{args.requests}: pd TTFT "
                      f"{results['pd']['ttft'][-1] * 1000:.0f} ms, decode leg "
                      f"{legs['decode_duration'][-1] * 1000:.0f} ms", file=sys.stderr)  # fmt: skip
        transfers = metric(decode.url, "vllm:nixl_xfer_time_seconds_count") - xfer[1]
        xfer_s = metric(decode.url, "vllm:nixl_xfer_time_seconds_sum") - xfer[0]
        pulled = metric(decode.url, "vllm:external_prefix_cache_hits_total") - pulled0
        return {
            "progress_delay_us": delay_us,
            "shm_spin_s": shm[0] if shm[0] is not None else "vllm (1 s)",
            "shm_recheck_ms": shm[1] if shm[1] is not None else "vllm (5000)",
            "engines_start_s": round(started_s, 1),
            "idle_cores_per_engine": idle,
            "requests": args.requests,
            "paths": {
                path: {"ttft_ms": pcts(v["ttft"]), "e2e_ms": pcts(v["e2e"])}
                for path, v in results.items()
            },
            "sidecar_legs_ms": {name: pcts(v) for name, v in legs.items()},
            "decode_engine": {
                "nixl_transfers": transfers,
                "nixl_xfer_ms_mean": round(xfer_s / transfers * 1000, 1) if transfers else None,
                "pulled_tokens_per_request": round(pulled / args.requests, 1),
            },
        }
    finally:
        if gateway is not None:
            gateway.stop()
        if sidecar is not None:
            stop_processes([sidecar])
        prefill.stop()
        decode.stop()


def parse_shm(value: str) -> tuple[float | None, int | None]:
    """`vllm`, `SPIN` or `SPIN:RECHECK_MS` as (spin seconds, recheck ms); None: vLLM's own."""
    if value == "vllm":
        return None, None
    spin, _, recheck = value.partition(":")
    return float(spin), int(recheck) if recheck else SHM_RECHECK_MS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12, help="requests per path")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument(
        "--progress-delays",
        default="1000,0",
        help="NIXL progress-thread poll delays to run, microseconds (0: NIXL as shipped)",
    )
    parser.add_argument(
        "--shm",
        default=f"{SHM_SPIN_S:g}",
        help="settings of vLLM's shared-memory queue readers to run: SPIN seconds (with the "
        f"harness's {SHM_RECHECK_MS} ms recheck), SPIN:RECHECK_MS, or 'vllm' (1 s, 5,000 ms)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "pd-vllm.json"))
    args = parser.parse_args(argv)
    try:
        delays = [int(d) for d in args.progress_delays.split(",") if d.strip()]
        settings = [parse_shm(v.strip()) for v in args.shm.split(",") if v.strip()]
    except ValueError as exc:
        parser.error(
            f"--progress-delays takes whole microseconds, --shm SPIN[:RECHECK_MS] or 'vllm': {exc}"
        )
    runs = []
    with tempfile.TemporaryDirectory(prefix="pd-vllm-") as tmp:
        for delay in delays:
            for shm in settings:
                runs.append(run_setting(delay, shm, args, Path(tmp)))
                print(json.dumps(runs[-1], indent=1), file=sys.stderr)
    command = "uv run python benchmarks/pd_vllm.py " + shlex.join(sys.argv[1:])
    write_report(args.out, "pd_vllm", command.strip(), runs=runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
