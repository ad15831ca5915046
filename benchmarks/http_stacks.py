"""Which HTTP library where: CPU per request of aiohttp and httpx clients, and of aiohttp's and
uvicorn/Starlette's servers, measured in one run on this machine.

llmd's services and libraries make HTTP calls on hot paths: the engine-pool scraper (each
engine's /metrics every 50 ms), the streaming proxy (every token chunk of every response), the
indexer and render clients (per request). This benchmark decides their client library, and
the simulator's server library (one process serves many simulated engines, so its CPU per
request bounds how many engines one core simulates).

Setup: a server process answers `POST /stream` with 17 SSE chunks (16 tokens and a usage
chunk, like a 16-token streamed completion) and `GET /metrics` with a 12 KB body (like a vLLM
scrape). Server CPU per request is read from /proc for the server process; client CPU per
request is this process's CPU (one thread): streams run 16 in flight, scrapes one after another.
Each client runs against the aiohttp server; each server is driven by the aiohttp client.

Usage: uv run python benchmarks/http_stacks.py [--requests N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

ROOT = Path(__file__).resolve().parent.parent
CHUNK = b'data: {"choices": [{"index": 0, "text": " tok"}]}\n\n'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 16}}\n\n'

AIOHTTP_SERVER = """
import sys
from aiohttp import web
CHUNK, USAGE = {chunk!r}, {usage!r}
async def stream(request):
    await request.read()
    resp = web.StreamResponse(headers={{"content-type": "text/event-stream"}})
    await resp.prepare(request)
    for _ in range(16):
        await resp.write(CHUNK)
    await resp.write(USAGE)
    await resp.write_eof()
    return resp
app = web.Application()
app.router.add_post("/stream", stream)
BODY = b"x" * 12000
async def metrics(request):
    return web.Response(body=BODY)
app.router.add_get("/metrics", metrics)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

UVICORN_SERVER = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
CHUNK, USAGE = {chunk!r}, {usage!r}
async def stream(request):
    await request.body()
    async def body():
        for _ in range(16):
            yield CHUNK
        yield USAGE
    return StreamingResponse(body(), media_type="text/event-stream")
app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


ClientRun = Callable[[str, int, int], Coroutine[Any, Any, None]]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(source: str, port: int) -> subprocess.Popen[bytes]:
    code = source.format(chunk=CHUNK, usage=USAGE)
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/stream", content=b"{}", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def aiohttp_client(url: str, n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with sem, session.post(url, data=b"{}") as resp:
                async for _ in resp.content.iter_any():
                    pass

        await asyncio.gather(*(one() for _ in range(n)))


async def httpx_client(url: str, n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> None:
            async with sem, client.stream("POST", url, content=b"{}") as resp:
                async for _ in resp.aiter_raw():
                    pass

        await asyncio.gather(*(one() for _ in range(n)))


async def aiohttp_get(url: str, n: int, concurrency: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(n):
            async with session.get(url) as resp:
                await resp.read()


async def httpx_get(url: str, n: int, concurrency: int) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(n):
            (await client.get(url)).read()


def measure(
    server: subprocess.Popen[bytes],
    client: ClientRun,
    url: str,
    n: int,
) -> dict[str, Any]:
    asyncio.run(client(url, 50, 16))  # warm-up: connections, imports, JIT-free caches
    s0, c0, w0 = proc_cpu_s(server.pid), time.process_time(), time.perf_counter()
    asyncio.run(client(url, n, 16))
    s1, c1, w1 = proc_cpu_s(server.pid), time.process_time(), time.perf_counter()
    return {
        "requests": n,
        "server_cpu_ms_per_request": round((s1 - s0) * 1000 / n, 3),
        "client_cpu_ms_per_request": round((c1 - c0) * 1000 / n, 3),
        "requests_per_s": round(n / (w1 - w0), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="requests per measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/http-stacks.json"))
    args = p.parse_args()
    from llmd.vllm_cpu.server import free_port

    rows = []
    for server_name, source in (("aiohttp", AIOHTTP_SERVER), ("uvicorn+starlette", UVICORN_SERVER)):
        port = free_port()
        server = start_server(source, port)
        url = f"http://127.0.0.1:{port}/stream"
        try:
            clients: list[tuple[str, str, ClientRun]] = [("stream", "aiohttp", aiohttp_client)]
            if server_name == "aiohttp":
                clients += [
                    ("stream", "httpx", httpx_client),
                    ("scrape", "aiohttp", aiohttp_get),
                    ("scrape", "httpx", httpx_get),
                ]
            for kind, client_name, client in clients:
                target = url if kind == "stream" else url.replace("/stream", "/metrics")
                row = {"request": kind, "server": server_name, "client": client_name}
                row |= measure(server, client, target, args.requests)
                rows.append(row)
                print(row, flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
    write_report(
        args.out,
        "http-stacks",
        f"uv run python benchmarks/http_stacks.py --requests {args.requests}",
        workload="stream: POST, 17 SSE chunks back (16 tokens + usage), 16 in flight; "
        "scrape: GET of a 12 KB body, one at a time; loopback",
        rows=rows,
    )
    print("\n| request | server | client | server CPU / req | client CPU / req | req/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['request']} | {r['server']} | {r['client']} | "
            f"{r['server_cpu_ms_per_request']} ms | "
            f"{r['client_cpu_ms_per_request']} ms | {r['requests_per_s']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
