"""The scrape client against a real socket server that answers with scripted bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmd.runtime.scrapeclient import ScrapeClient, ScrapeError

Reply = Callable[[int], bytes | None]
"""The n-th request's answer (None: close the connection without answering)."""


async def serve(reply: Reply) -> tuple[asyncio.Server, int, list[int]]:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answer = reply(sum(connections) * 1000 + len(connections))
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += b"%x\r\n" % len(p) + p + b"\r\n"
    return out + b"0\r\n\r\n"


def test_content_length_chunked_and_reuse() -> None:
    async def run() -> None:
        answers = iter([ok(b"first"), chunked(b"sec", b"ond"), ok(b"")])
        server, port, connections = await serve(lambda _: next(answers))
        client = ScrapeClient("127.0.0.1", port)
        try:
            assert await client.get("/metrics") == b"first"
            assert await client.get("/metrics") == b"second"
            assert await client.get("/metrics") == b""
            assert len(connections) == 1  # one kept-alive connection for all three
        finally:
            await client.close()
            server.close()

    asyncio.run(run())


def test_an_idle_connection_closed_by_the_engine_is_reopened() -> None:
    async def run() -> None:
        calls = []

        def reply(_: int) -> bytes | None:
            calls.append(1)
            return ok(b"x") if len(calls) != 2 else None  # the 2nd: engine closes the socket

        server, port, connections = await serve(reply)
        client = ScrapeClient("127.0.0.1", port)
        try:
            assert await client.get("/m") == b"x"
            assert await client.get("/m") == b"x"  # retried once on a new connection
            assert len(connections) == 2
        finally:
            await client.close()
            server.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "HTTP 500"),
        (b"SMTP ready\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "out of bounds"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "out of bounds"),
        (b"HTTP/1.1 200 OK\r\n\r\nbody", "without Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        # a short body with the connection left open: the deadline ends it
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "no answer within"),
    ],
)
def test_bad_answers_are_scrape_errors(answer: bytes, message: str) -> None:
    async def run() -> None:
        def reply(_: int) -> bytes | None:
            return answer

        server, port, _ = await serve(reply)
        client = ScrapeClient("127.0.0.1", port, timeout_s=0.5)
        try:
            with pytest.raises(ScrapeError, match=message):
                await client.get("/m")
        finally:
            await client.close()
            server.close()

    asyncio.run(run())


def test_a_silent_engine_is_a_timeout_and_nothing_is_kept() -> None:
    async def run() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ScrapeClient("127.0.0.1", port, timeout_s=0.2)
        try:
            with pytest.raises(ScrapeError, match=r"no answer within 0\.2s"):
                await client.get("/m")
            assert client._conn is None
        finally:
            await client.close()
            server.close()

    asyncio.run(run())


@pytest.mark.reliability
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=400))
def test_any_answer_is_a_body_or_a_scrape_error(answer: bytes) -> None:
    async def run() -> None:
        def reply(_: int) -> bytes | None:
            return answer

        server, port, _ = await serve(reply)
        client = ScrapeClient("127.0.0.1", port, timeout_s=0.05)
        try:
            body = await client.get("/m")
            assert isinstance(body, bytes)
        except ScrapeError:
            pass
        finally:
            await client.close()
            server.close()

    asyncio.run(run())
