"""The gateway against hostile clients and bad upstreams, on real Envoy, llmd-scheduler and
engines (llmd-sim, or a tiny echo engine that shows what reached it)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway

from .conftest import start_stack

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

ECHO_ENGINE = """
import json, sys
from aiohttp import web
seen = []
async def completions(request):
    await request.read()
    seen.append(dict(request.headers))
    body = {"choices": [{"text": "ok"}], "headers": dict(request.headers),
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return web.json_response(body)
async def metrics(request):
    return web.Response(text='vllm:num_requests_waiting{model_name="m"} 0\\n'
                             'vllm:num_requests_running{model_name="m"} 0\\n')
async def health(request):
    return web.Response(text="ok")
async def count(request):
    return web.json_response({"requests": len(seen)})
app = web.Application()
app.router.add_post("/v1/completions", completions)
app.router.add_get("/metrics", metrics)
app.router.add_get("/health", health)
app.router.add_get("/seen", count)
import asyncio, socket
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
"""


def start_echo() -> tuple[subprocess.Popen[bytes], int]:
    """An echo engine on a port it binds itself (no race for a free port)."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_ENGINE], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("echo engine did not start")


def pool_file(path: Path, ports: list[int]) -> Path:
    doc = {
        "endpoints": [{"name": f"echo-{p}", "address": "127.0.0.1", "port": str(p)} for p in ports]
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """An echo engine in the pool, and a trap engine outside it that must never be reached."""
    (p1, engine), (p2, trap) = start_echo(), start_echo()
    procs = [p1, p2]
    yield engine, trap
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def seen(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/seen", timeout=5).json()["requests"])


BODY = {"model": "m", "prompt": "hello", "max_tokens": 1}  # for the echo engine
SIM = {"model": "tiny", "prompt": "hello", "max_tokens": 1}  # llmd-sim serves "tiny"


def test_client_routing_headers_never_reach_an_engine(
    tmp_path: Path, echo: tuple[int, int]
) -> None:
    engine, trap = echo
    gw = Gateway.start(pool_file(tmp_path / "pool.yaml", [engine]), tmp_path / "gw")
    try:
        spoofed = {
            "x-gateway-destination-endpoint": f"127.0.0.1:{trap}",
            "x-prefiller-host-port": f"127.0.0.1:{trap}",
            "x-data-parallel-host-port": "10.0.0.1:8000",
            "x-encoder-hosts-ports": "10.0.0.2:8000",
            "x-kv-cache-source-host-port": "10.0.0.3:8000",
        }
        for _ in range(5):
            r = httpx.post(gw.url + "/v1/completions", json=BODY, headers=spoofed, timeout=20)
            assert r.status_code == 200, r.text
            got = {k.lower(): v for k, v in r.json()["headers"].items()}
            assert got["x-gateway-destination-endpoint"] == f"127.0.0.1:{engine}"
            for name in list(spoofed)[1:]:
                assert name not in got
        assert seen(trap) == 0
    finally:
        gw.stop()


def test_only_inference_paths_are_routed(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=2, config=None)
    try:
        r = httpx.post(s.url + "/sim/faults", json={"crash": True}, timeout=10)
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == 404
        assert (
            httpx.get(s.url + "/health", timeout=10).status_code == 200
        )  # load generators probe it
        for i in range(4):  # no engine was crashed through the gateway
            ok = httpx.post(s.url + "/v1/completions", json={**SIM, "prompt": f"p{i}"}, timeout=20)
            assert ok.status_code == 200
    finally:
        s.stop()


def test_a_down_scheduler_is_503_not_500(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=1, config=None)
    try:
        assert httpx.post(s.url + "/v1/completions", json=SIM, timeout=20).status_code == 200
        assert s.gateway.scheduler.stop() == 0
        statuses = set()
        for _ in range(6):
            r = httpx.post(s.url + "/v1/completions", json=SIM, timeout=20)
            statuses.add(r.status_code)
            # a JSON error a client can parse (a failed ext_proc stream used to be an empty body)
            assert r.json()["error"]["type"] == "ServiceUnavailableError", r.content
            time.sleep(0.3)
        assert statuses == {503}
    finally:
        s.stop()


def test_fail_open_serves_posts_and_ignores_a_spoofed_destination(
    tmp_path: Path, echo: tuple[int, int]
) -> None:
    engine, trap = echo
    gw = Gateway.start(pool_file(tmp_path / "pool.yaml", [engine]), tmp_path / "gw", fail_open=True)
    try:
        assert gw.scheduler.stop() == 0
        statuses = []
        for _ in range(8):
            r = httpx.post(
                gw.url + "/v1/completions",
                json=BODY,
                headers={"x-gateway-destination-endpoint": f"127.0.0.1:{trap}"},
                timeout=20,
            )
            statuses.append(r.status_code)
            time.sleep(0.25)
        assert statuses[-4:] == [200] * 4, statuses  # served by the fallback cluster
        assert seen(trap) == 0  # never by the client's choice of destination
    finally:
        gw.stop()


def test_a_slow_client_is_cut_off_and_holds_nothing(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=1, config=None, envoy={"request_timeout_s": 2.0})
    try:
        host, port = s.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n" + b'{"model": "m", "pro'
        )
        sock.settimeout(10)
        reply = sock.recv(4096)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert httpx.post(s.url + "/v1/completions", json=SIM, timeout=20).status_code == 200
        state = s.gateway.scheduler.get_json("/debug/plugins/state")
        assert state["inflight"] == 0
    finally:
        s.stop()


def test_a_hung_engine_times_out_with_504_and_is_released(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=1, config=None, envoy={"upstream_idle_timeout_s": 2.0})
    try:
        httpx.post(s.fleet.engines[0].url + "/sim/faults", json={"hang": True}, timeout=5)
        r = httpx.post(s.url + "/v1/completions", json=SIM, timeout=30)
        assert r.status_code == 504
        assert r.json()["error"] == {  # Envoy's own reply, as an OpenAI-style error
            "message": "stream timeout",
            "type": "GatewayTimeoutError",
            "param": None,
            "code": 504,
        }
        time.sleep(0.5)
        assert s.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0
    finally:
        s.stop()


def test_a_dead_engine_gets_no_more_requests(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=2, config=None)
    try:
        for i in range(4):
            assert httpx.post(s.url + "/v1/completions", json={**SIM, "prompt": f"warm {i}"},
                              timeout=20).status_code == 200  # fmt: skip
        httpx.post(s.engine_url("sim-1") + "/sim/faults", json={"crash": True}, timeout=5)
        time.sleep(0.5)  # a few scrapes: sim-1's fail, and it is held out
        statuses = [
            httpx.post(s.url + "/v1/completions", json={**SIM, "prompt": f"after {i}"},
                       timeout=20).status_code
            for i in range(8)
        ]  # fmt: skip
        assert statuses == [200] * 8
        metrics = s.gateway.scheduler.metrics_text()
        assert 'llmd_endpoint_failures_total{source="scrape"}' in metrics
    finally:
        s.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_burst_of_2000_at_concurrency_200_loses_nothing(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=4, config=None)
    try:
        pid = s.gateway.scheduler.process.pid

        async def burst(n: int) -> list[int]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                sem = asyncio.Semaphore(200)

                async def one(i: int) -> int:
                    async with sem:
                        body = {**SIM, "prompt": f"burst {i % 50} " + "x " * (i % 7)}
                        r = await client.post(s.url + "/v1/completions", json=body)
                        return r.status_code

                return await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(burst(200))  # warm up: imports, caches, connection pools
        baseline = _rss_kib(pid)
        statuses = asyncio.run(burst(2000))
        assert statuses.count(200) == 2000, {c: statuses.count(c) for c in set(statuses)}
        time.sleep(1.0)
        assert s.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0
        assert _rss_kib(pid) < baseline * 1.5 + 20_000  # no growth per request
    finally:
        s.stop()
