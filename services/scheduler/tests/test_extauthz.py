"""The ext_authz check server over a real socket: routing answers, rejections, health, framing
errors, and one connection carrying several checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from llmd.protocol import headers as hdr
from llmd.protocol.metrics import EngineSnapshot
from llmd.scheduler.extauthz import (
    CHECK_PREFIX,
    HEALTH_PATH,
    STATUS_HEADER,
    TOKEN_HEADER,
    WIRE_STATUS_5XX,
    CheckServer,
)
from llmd.scheduler.feedback import FeedbackBook, GatewayReport
from llmd.scheduler.flowcontrol import FlowController

from .conftest import make_director


def _request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: scheduler"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ")[1]), headers, body


@pytest.fixture
async def server() -> AsyncIterator[CheckServer]:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    srv = CheckServer(d, book, lambda: True, max_body_bytes=10_000)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop()


def _port(srv: CheckServer) -> int:
    assert srv.server is not None
    return int(srv.server.sockets[0].getsockname()[1])


BODY = json.dumps({"model": "m", "prompt": "route me somewhere good", "max_tokens": 4}).encode()


async def test_a_check_is_answered_with_the_route_and_the_feedback_token(
    server: CheckServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", BODY,
                          content_type="application/json",
                          x_gateway_destination_endpoint_subset="spoof",
                          x_llm_d_inference_objective="gold"))  # fmt: skip
    status, headers, body = await _read_answer(reader)
    assert status == 200
    assert body == b""
    assert headers[hdr.DESTINATION_ENDPOINT].startswith("127.0.0.1:900")
    token = headers[TOKEN_HEADER]
    removed = headers["x-envoy-auth-headers-to-remove"].split(",")
    assert set(removed) == {hdr.DESTINATION_ENDPOINT_SUBSET, hdr.INFERENCE_OBJECTIVE}
    d = server.director
    assert d.inflight == 1
    assert server.book.open == 1
    # a second check on the same connection
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", BODY))
    status, headers, _ = await _read_answer(reader)
    assert status == 200
    assert d.inflight == 2
    server.book.report(token, GatewayReport(200, "natural", 0.01, None))
    assert d.inflight == 1
    writer.close()


async def test_rejections_carry_status_reason_and_json(server: CheckServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", b'{"model": '))
    status, headers, body = await _read_answer(reader)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == 400
    writer.write(_request("POST", "/elsewhere", BODY))
    status, _, body = await _read_answer(reader)
    assert status == 404
    assert CHECK_PREFIX in json.loads(body)["error"]["message"]
    assert server.director.inflight == 0
    writer.close()


async def test_health_follows_readiness_and_draining(server: CheckServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    writer.write(_request("GET", HEALTH_PATH))
    assert (await _read_answer(reader))[0] == 200
    server.draining = True
    writer.write(_request("GET", HEALTH_PATH))
    assert (await _read_answer(reader))[0] == 503
    writer.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /llmd/check/v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
        (b"POST /llmd/check/v1/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400),
        (b"POST /llmd/check/v1/completions HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /llmd/check/v1/completions HTTP/1.1\r\ncontent-length: 99999\r\n\r\n", 413),
        (b"POST /x HTTP/1.1\r\n" + b"a: " + b"b" * 300_000, 431),
    ],
)
async def test_malformed_check_requests_get_an_error_and_a_closed_connection(
    server: CheckServer, raw: bytes, status: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    writer.write(raw)
    got, _, body = await _read_answer(reader)
    assert got == status
    assert json.loads(body)["error"]["code"] == status
    assert await reader.read() == b""  # closed
    assert server.director.inflight == 0
    writer.close()


async def test_a_5xx_rejection_travels_as_424_with_its_status_named(
    server: CheckServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    # a model rewrite needs a new body, which ext_authz cannot give: 500
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", BODY,
                          x_llm_d_model_name_rewrite="other"))  # fmt: skip
    status, headers, body = await _read_answer(reader)
    assert status == WIRE_STATUS_5XX  # Envoy would read a 500 as a failed check
    assert headers[STATUS_HEADER] == "500"
    error = json.loads(body)["error"]
    assert error["code"] == 500
    assert "ext_authz" in error["message"]
    assert server.director.inflight == 0
    assert server.book.open == 0
    writer.close()


async def test_non_ascii_header_values_are_read_as_utf8(server: CheckServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    raw = _request("POST", CHECK_PREFIX + "/v1/completions", BODY)
    raw = raw.replace(
        b"host: scheduler", "host: scheduler\r\nx-llm-d-inference-fairness-id: équipe".encode()
    )
    writer.write(raw)
    status, _, _ = await _read_answer(reader)
    assert status == 200
    decision = next(iter(server.book._open.values()))[1]
    assert decision.request.fairness_id == "équipe"
    writer.close()


async def test_checks_sent_back_to_back_are_answered_in_order(server: CheckServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
    # three requests in one write: a check, a health probe, a check for an unknown path
    writer.write(
        _request("POST", CHECK_PREFIX + "/v1/completions", BODY)
        + _request("GET", HEALTH_PATH)
        + _request("POST", "/elsewhere", BODY)
    )
    answers = [await _read_answer(reader) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 404]
    assert hdr.DESTINATION_ENDPOINT in answers[0][1]
    assert server.director.inflight == 1
    writer.close()


FLOW_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
"""


async def _until(condition: Callable[[], bool], seconds: float = 1.0) -> None:
    """Poll `condition` every 10 ms for up to `seconds`; the caller asserts what it expects."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


def _saturate(srv: CheckServer, waiting: int) -> None:
    ds = srv.director.datastore
    now = ds.clock()
    for e in ds.all():
        e.note_scrape(now, EngineSnapshot(waiting=waiting, running=4, kv_cache_usage=0.0,
                                          block_size=16, num_gpu_blocks=10_000), now)  # fmt: skip


@pytest.fixture
async def flow_server() -> AsyncIterator[CheckServer]:
    d, _, _ = make_director(2, FLOW_CONFIG)
    assert d.flow is not None
    d.flow.tick_s = 0.001
    d.flow.start()
    srv = CheckServer(d, FeedbackBook(d), lambda: True, max_body_bytes=10_000)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop()
    await d.flow.stop()


async def _connect_saturated(
    srv: CheckServer,
) -> tuple[FlowController, asyncio.StreamReader, asyncio.StreamWriter]:
    """Every endpoint reads as saturated (new checks queue); a connection to the check server."""
    flow = srv.director.flow
    assert flow is not None
    _saturate(srv, waiting=10)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(srv))
    return flow, reader, writer


async def test_a_queued_check_is_answered_when_admitted_and_the_next_one_follows(
    flow_server: CheckServer,
) -> None:
    srv = flow_server
    flow, reader, writer = await _connect_saturated(srv)
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", BODY)
                 + _request("POST", CHECK_PREFIX + "/v1/completions", BODY))  # fmt: skip
    await _until(lambda: flow.queued > 0)
    assert flow.queued == 1  # the first waits in the queue; the second is not read yet
    assert srv.director.inflight == 0
    _saturate(srv, waiting=0)
    flow.wake()
    first = await asyncio.wait_for(_read_answer(reader), 2)
    second = await asyncio.wait_for(_read_answer(reader), 2)
    assert (first[0], second[0]) == (200, 200)
    assert srv.director.inflight == 2
    assert flow.outcomes["Dispatched"] == 2
    writer.close()


async def test_a_check_whose_connection_closes_while_queued_is_dropped_and_counted(
    flow_server: CheckServer,
) -> None:
    srv = flow_server
    flow, _, writer = await _connect_saturated(srv)
    writer.write(_request("POST", CHECK_PREFIX + "/v1/completions", BODY))
    await _until(lambda: flow.queued > 0)
    assert flow.queued == 1
    writer.close()  # Envoy gave up on the check
    await _until(lambda: flow.queued == 0)
    assert flow.queued == 0
    assert flow.outcomes.get("EvictedContextCancelled") == 1
    assert srv.director.inflight == 0
    assert srv.book.open == 0
