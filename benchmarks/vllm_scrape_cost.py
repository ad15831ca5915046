"""What one scrape costs a real vLLM server and the scheduler: the whole `/metrics` page against
the name-filtered page the scheduler asks for (`/metrics/?name[]=...`).

One vLLM 0.32 CPU server (the tiny model) serves a few requests first, so that its histograms
hold samples as a busy engine's do. Then, in alternating rounds, `--scrapes` back-to-back GETs of
each page over one kept-alive connection (the scheduler's own scrape client). Reported per page:
its size, the GET's latency p50 / p99 as the client saw it, the vLLM API server process's CPU
per scrape (read from /proc), and the scheduler-side parse time per page
(`parse_engine_snapshot`, in this process).

Usage: uv run python benchmarks/vllm_scrape_cost.py [--scrapes 200] [--rounds 3] [--out FILE]
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
from gateway_overhead import cpu_seconds
from protocol_throughput import write_report

from llmd.protocol.metrics import VLLM, dialect_sample_names, parse_engine_snapshot, sample_names
from llmd.runtime.enginepool import filtered_path
from llmd.runtime.scrapeclient import ScrapeClient
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import VllmServerSpec, start_servers
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scrape_round(client: ScrapeClient, path: str, n: int, pid: int) -> dict[str, Any]:
    """`n` GETs of `path`: latencies, the server's CPU, the page, and its parse time."""
    latencies = []
    c0 = cpu_seconds([pid])
    page = b""
    for _ in range(n):
        t = time.perf_counter()
        page = await client.get(path)
        latencies.append((time.perf_counter() - t) * 1000)
    server_cpu_ms = (cpu_seconds([pid]) - c0) * 1000 / n
    text = page.decode()
    t = time.perf_counter()
    for _ in range(n):
        parse_engine_snapshot(text)
    parse_ms = (time.perf_counter() - t) * 1000 / n
    return {
        "bytes": len(page),
        "samples": len(sample_names(text)),
        "latency_ms": latencies,
        "server_cpu_ms": server_cpu_ms,
        "parse_ms": parse_ms,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scrapes", type=int, default=200, help="GETs per page and round (200)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the pages alternating (3)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/vllm-scrape-cost.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-scrape-cost-"))
    print("preparing the vLLM CPU environment and tiny model...", flush=True)
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    print(f"starting 1 vLLM server; log in {work}", flush=True)
    (server,) = start_servers(env, [VllmServerSpec(pod="vllm-0", model_dir=model)], work)
    try:
        assert server.process is not None
        pid = server.process.pid
        for i in range(8):  # samples in the latency histograms, as on a serving engine
            httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "tiny", "prompt": f"warm up {i} " * 20, "max_tokens": 8},
                timeout=120,
            ).raise_for_status()
        pages = {
            "whole": "/metrics",
            "filtered": filtered_path("/metrics", dialect_sample_names(VLLM)),
        }
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in pages}

        async def run() -> None:
            client = ScrapeClient("127.0.0.1", server.port, 5.0)
            try:
                await client.get("/metrics")  # connect
                for r in range(args.rounds):
                    for name, path in pages.items():
                        res = await scrape_round(client, path, args.scrapes, pid)
                        results[name].append(res)
                        print(
                            f"round {r + 1} {name}: {res['bytes']} B, server "
                            f"{res['server_cpu_ms']:.2f} ms CPU/scrape, p50 "
                            f"{statistics.median(res['latency_ms']):.2f} ms",
                            flush=True,
                        )
            finally:
                await client.close()

        asyncio.run(run())
    finally:
        server.stop()
    rows = []
    for name, rounds in results.items():
        lat = [x for r in rounds for x in r["latency_ms"]]
        rows.append(
            {
                "page": name,
                "bytes": rounds[-1]["bytes"],
                "samples": rounds[-1]["samples"],
                "get_p50_ms": round(pct(lat, 0.5), 2),
                "get_p99_ms": round(pct(lat, 0.99), 2),
                "server_cpu_ms_per_scrape": [round(r["server_cpu_ms"], 2) for r in rounds],
                "parse_ms": round(statistics.median(r["parse_ms"] for r in rounds), 3),
            }
        )
    lines = [
        "| page | bytes | samples | GET p50 / p99 | vLLM API server CPU per scrape, by round "
        "| scheduler parse |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = " / ".join(f"{c:.2f}" for c in r["server_cpu_ms_per_scrape"])
        lines.append(
            f"| {r['page']} | {r['bytes']:,} | {r['samples']} | {r['get_p50_ms']} / "
            f"{r['get_p99_ms']} ms | {cpu} ms | {r['parse_ms'] * 1000:.0f} µs |"
        )
    table = "\n".join(lines)
    print(table)
    write_report(
        args.out,
        "vllm-scrape-cost",
        "uv run python benchmarks/vllm_scrape_cost.py " + shlex.join(sys.argv[1:]),
        settings=vars(args),
        results=rows,
        table=table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
