"""What llmd-sidecar adds to a request: latency over calling the decode engine directly.

A prefill and a decode `llmd-sim` engine (vLLM 0.32's NixlConnector contract) and the sidecar in
front of the decode one, in this process. Measured, sequentially and interleaved so that all see
the same machine: a 1-token completion sent to the decode engine directly, through the sidecar
without a prefill header (decode-only: the proxy alone), and through the sidecar with one (the
whole P/D flow: prefill leg, KV pull, decode leg). Reported: client latency p50/p90 per path, the
sidecar's added p50, and the engines' own figures beside them (requests they served).

Usage: uv run python benchmarks/sidecar_overhead.py [--requests 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.dev.sim_engines import SimFleetProcess
from llmd.sidecar.app import SidecarApp, SidecarConfig
from llmd.vllm_cpu.server import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "tiny", "prompt": "the quick brown fox " * 16, "max_tokens": 1}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def engine_requests(c: httpx.AsyncClient, url: str) -> float:
    text = (await c.get(f"{url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


async def run(requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        prefill = SimFleetProcess.start_pd("kv_producer", Path(tmp))
        decode = SimFleetProcess.start_pd("kv_consumer", Path(tmp))
        decode_url = decode.engines[0].url
        sidecar = SidecarApp(
            SidecarConfig(
                host="127.0.0.1",
                port=free_port(),
                model_server_port=int(decode_url.rsplit(":", 1)[1]),
                metrics_port=0,
                log_level="WARNING",
            )
        )
        await sidecar.start()
        via = f"http://127.0.0.1:{sidecar.config.port}"
        pd_header = {"x-prefiller-host-port": prefill.engines[0].url.removeprefix("http://")}
        paths = {
            "direct": (decode_url, {}),
            "sidecar-decode-only": (via, {}),
            "sidecar-pd": (via, pd_header),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        try:
            async with httpx.AsyncClient(timeout=30) as c:
                for _ in range(20):  # warm-up: connections, caches
                    for url, headers in paths.values():
                        await c.post(f"{url}/v1/completions", json=BODY, headers=headers)
                for i in range(requests):
                    for name, (url, headers) in paths.items():
                        body = {**BODY, "prompt": f"{i} {name} " + str(BODY["prompt"])}
                        t0 = time.perf_counter()
                        r = await c.post(f"{url}/v1/completions", json=body, headers=headers)
                        times[name].append(time.perf_counter() - t0)
                        if r.status_code != 200:
                            raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                served = {
                    "prefill_engine_requests": await engine_requests(c, prefill.engines[0].url),
                    "decode_engine_requests": await engine_requests(c, decode_url),
                }
        finally:
            await sidecar.stop()
            prefill.stop()
            decode.stop()
    rows = {
        name: {
            "p50_ms": round(statistics.median(v) * 1000, 3),
            "p90_ms": round(pct(v, 0.9) * 1000, 3),
        }
        for name, v in times.items()
    }
    direct = rows["direct"]["p50_ms"]
    for row in rows.values():
        row["added_p50_ms"] = round(row["p50_ms"] - direct, 3)
    return {"requests_per_path": requests, "paths": rows, "engines": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "sidecar.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args.requests))
    for name, row in result["paths"].items():
        print(f"{name:<22} p50 {row['p50_ms']:8.3f} ms  p90 {row['p90_ms']:8.3f} ms  "
              f"added p50 {row['added_p50_ms']:7.3f} ms")  # fmt: skip
    print(f"engines: {result['engines']}")
    command = "uv run python benchmarks/sidecar_overhead.py " + shlex.join(sys.argv[1:])
    write_report(args.out, "sidecar_overhead", command.strip(), **result)


if __name__ == "__main__":
    main()
