"""The streaming proxy between a real client, a real proxy server and a real upstream on
loopback: streaming passthrough with usage, header hygiene, OpenAI-shaped upstream errors and
timeouts, and a client disconnect that cancels the upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from starlette.responses import StreamingResponse

from llmd.protocol.openai import usage_from_body
from llmd.runtime.lifecycle import http_server
from llmd.runtime.proxy import ProxyResult, ProxyTimeouts, StreamingProxy, forward_headers
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
         "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    got = forward_headers(
        [
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "5"),
            ("Host", "a"),
            ("Content-Length", "3"),
            ("Transfer-Encoding", "chunked"),
            ("X-Request-Id", "r1"),
            ("Authorization", "Bearer t"),
        ],
        drop=["authorization"],
    )
    assert got == [("x-request-id", "r1")]


def test_usage_is_read_from_a_stream_tail_or_a_body() -> None:
    sse = (
        b'data: {"choices": []}\n\ndata: {"choices": [], "usage": '
        + json.dumps(USAGE).encode()
        + b"}\n\ndata: [DONE]\n\n"
    )
    usage = usage_from_body(sse, stream=True)
    assert usage is not None
    assert (usage.prompt_tokens, usage.cached_tokens) == (7, 4)
    body = json.dumps({"choices": [], "usage": USAGE}).encode()
    assert usage_from_body(body, stream=False) == usage
    assert usage_from_body(b"not json", stream=False) is None


class Upstream:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.seen_headers: dict[str, str] = {}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            self.seen_headers = dict(request.headers)
            doc = json.loads(await request.body())
            if not doc.get("stream"):
                body = {"choices": [{"text": "hi"}], "usage": USAGE}
                return Response(json.dumps(body), media_type="application/json")
            delay = float(doc.get("delay", 0.01))

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    for i in range(int(doc.get("n", 3))):
                        yield f'data: {{"choices": [{{"text": "{i}"}}]}}\n\n'.encode()
                        await asyncio.sleep(delay)
                    yield b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\n"
                    yield b"data: [DONE]\n\n"
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise

            return StreamingResponse(
                chunks(), media_type="text/event-stream", headers={"connection": "x-internal",
                                                                   "x-internal": "1"}
            )  # fmt: skip

        @app.post("/hang")
        async def hang() -> Response:
            await asyncio.sleep(2.5)
            return Response("late")

        return app


async def _with_servers(
    body: Callable[[str, Upstream, list[ProxyResult]], Awaitable[None]],
) -> None:
    upstream = Upstream()
    up_port, proxy_port, dead_port = free_port(), free_port(), free_port()
    proxy = StreamingProxy(ProxyTimeouts(connect_s=1.0, read_s=1.0))
    results: list[ProxyResult] = []
    front = FastAPI()

    @front.post("/{path:path}")
    async def forward(path: str, request: Request) -> Response:
        port = dead_port if path == "dead" else up_port
        target = "v1/completions" if path == "dead" else path
        stream = bool(json.loads(await request.body() or b"{}").get("stream"))
        return await proxy.forward(
            request,
            f"http://127.0.0.1:{port}/{target}",
            stream=stream,
            headers={"x-forwarded-by": "llmd"},
            drop_headers=["authorization"],
            on_complete=results.append,
        )

    servers = [
        http_server(upstream.app(), "127.0.0.1", up_port),
        http_server(front, "127.0.0.1", proxy_port),
    ]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.01)
    try:
        await body(f"http://127.0.0.1:{proxy_port}", upstream, results)
    finally:
        await proxy.aclose()
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks)


def run(body: Callable[[str, Upstream, list[ProxyResult]], Awaitable[None]]) -> None:
    asyncio.run(_with_servers(body))


def test_streams_pass_through_with_usage_and_clean_headers() -> None:
    async def body(url: str, up: Upstream, results: list[ProxyResult]) -> None:
        async with httpx.AsyncClient() as client:
            chunks = []
            req = {"stream": True, "n": 3}
            headers = {"authorization": "Bearer secret", "x-request-id": "r-1"}
            async with client.stream(
                "POST", url + "/v1/completions", json=req, headers=headers
            ) as resp:
                assert resp.status_code == 200
                assert "x-internal" not in resp.headers  # named in Connection: hop-by-hop
                async for chunk in resp.aiter_raw():
                    chunks.append(chunk)
            text = b"".join(chunks)
            assert text.count(b"data: ") == 5
            assert up.seen_headers["x-request-id"] == "r-1"
            assert up.seen_headers["x-forwarded-by"] == "llmd"
            assert "authorization" not in up.seen_headers
            plain = await client.post(url + "/v1/completions", json={"stream": False})
            assert plain.json()["usage"] == USAGE
        await asyncio.sleep(0.05)
        assert [r.outcome for r in results] == ["ok", "ok"]
        assert all(r.usage is not None and r.usage.cached_tokens == 4 for r in results)
        assert results[0].first_byte_s is not None
        assert results[0].response_bytes == len(text)

    run(body)


def test_upstream_failures_are_openai_errors() -> None:
    async def body(url: str, up: Upstream, results: list[ProxyResult]) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            dead = await client.post(url + "/dead", json={})
            assert dead.status_code == 502
            assert dead.json()["error"]["type"] == "BadGatewayError"
            hung = await client.post(url + "/hang", json={})
            assert hung.status_code == 504
            assert hung.json()["error"]["code"] == 504
        assert [r.outcome for r in results] == ["upstream-error", "timeout"]

    run(body)


def test_client_disconnect_cancels_the_upstream() -> None:
    async def body(url: str, up: Upstream, results: list[ProxyResult]) -> None:
        async with httpx.AsyncClient() as client:
            req = {"stream": True, "n": 200, "delay": 0.05}
            async with client.stream("POST", url + "/v1/completions", json=req) as resp:
                async for _ in resp.aiter_raw():
                    break  # the client leaves after the first chunk
        await asyncio.wait_for(up.cancelled.wait(), timeout=5)
        for _ in range(50):
            if results:
                break
            await asyncio.sleep(0.05)
        assert [r.outcome for r in results] == ["client-disconnect"]
        assert results[0].usage is None

    run(body)
