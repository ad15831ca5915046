"""The lean response path's bookkeeping: accounting released when the stream ends, outcome
recorded exactly once from the access log, whatever arrives first or never."""

from __future__ import annotations

import asyncio

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from llmd.scheduler.director import Decision, Director
from llmd.scheduler.feedback import FeedbackBook, GatewayReport, parse_entry

from .conftest import completion, make_director

OK = GatewayReport(status=200, cause="natural", ttft_s=0.05, usage=None)


def routed(d: Director, book: FeedbackBook, prompt: str = "hello there") -> Decision:
    dec = d.schedule(completion(d, prompt))
    dec.token = book.token()
    return dec


def test_stream_end_releases_and_the_report_completes_once() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    dec = routed(d, book)
    assert d.inflight == 1
    book.ended(dec)
    assert d.inflight == 0  # released at once: the next decision sees the freed slot
    assert dec.released
    assert not dec.completed
    assert book.waiting == 1
    book.report(dec.token, OK)
    assert dec.completed
    assert book.waiting == 0
    assert dec.first_byte_at == dec.request.received_at + 0.05
    book.report(dec.token, OK)  # a duplicate entry changes nothing
    book.ended(dec)
    assert d.inflight == 0


def test_a_report_before_the_stream_ends_waits_for_it() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    dec = routed(d, book)
    book.report(dec.token, GatewayReport(503, "error", None, None))
    assert not dec.completed
    assert d.inflight == 1
    book.ended(dec)
    assert dec.completed
    assert d.inflight == 0
    assert dec.status == 503


def test_a_missing_report_completes_after_the_timeout() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d, timeout_s=5.0)
    dec = routed(d, book)
    book.ended(dec)
    book.sweep(now=dec.ended_at + 1.0)
    assert not dec.completed
    book.sweep(now=dec.ended_at + 6.0)
    assert dec.completed
    assert book.waiting == 0


def test_waiting_is_bounded() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d, max_waiting=3)
    decisions = [routed(d, book, f"prompt {i}") for i in range(5)]
    for dec in decisions:
        book.ended(dec)
    assert book.waiting == 3
    assert decisions[0].completed
    assert decisions[1].completed
    assert not decisions[4].completed
    assert d.inflight == 0


def test_reports_of_another_process_are_ignored() -> None:
    d, _, _ = make_director()
    book, other = FeedbackBook(d), FeedbackBook(d)
    dec = routed(d, book)
    book.report(other.token(), OK)  # a predecessor's entry: not kept as early
    book.ended(dec)
    assert not dec.completed
    book.flush()
    assert dec.completed


def _entry(
    fields: dict[str, object], status: int = 200, **flags: bool
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.response.response_code.value = status
    entry.common_properties.start_time.seconds = 1_000
    entry.common_properties.start_time.nanos = 500_000_000
    for flag, on in flags.items():
        setattr(entry.common_properties.response_flags, flag, on)
    meta = struct_pb2.Struct()
    meta.update(fields)
    entry.common_properties.metadata.filter_metadata["llmd"].CopyFrom(meta)
    return entry


def test_access_log_entries_are_read() -> None:
    entry = _entry({"pick": "ab-1", "first_us": "1000620000", "prompt_tokens": "121",
                    "completion_tokens": "8", "cached_tokens": "112"})  # fmt: skip
    token, report = parse_entry(entry) or ("", OK)
    assert token == "ab-1"
    assert report.status == 200
    assert report.cause == "natural"
    assert report.ttft_s is not None
    assert abs(report.ttft_s - 0.12) < 1e-9
    assert report.usage is not None
    assert (report.usage.prompt_tokens, report.usage.completion_tokens) == (121, 8)
    assert report.usage.prompt_tokens_details is not None
    assert report.usage.prompt_tokens_details.cached_tokens == 112
    _, gone = parse_entry(_entry({"pick": "ab-2"}, downstream_connection_termination=True)) or (
        "",
        OK,
    )
    assert gone.cause == "client-disconnect"
    assert gone.usage is None
    assert gone.ttft_s is None
    _, reset = parse_entry(_entry({"pick": "ab-3"}, status=503, upstream_remote_reset=True)) or (
        "",
        OK,
    )
    assert reset.cause == "error"
    assert parse_entry(_entry({"other": "x"})) is None  # not a request the scheduler routed
    bad = _entry({"pick": "ab-4", "prompt_tokens": "lots", "completion_tokens": -3})
    parsed = parse_entry(bad)
    assert parsed is not None
    assert parsed[1].usage is None


# --- the ext_authz path: no stream end, the access-log entry releases the request ----------


def test_a_dispatched_request_stays_in_flight_until_its_entry_arrives() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    dec = routed(d, book)
    book.dispatched(dec)
    assert d.inflight == 1
    assert book.open == 1
    assert dec.request.body == b""  # what waits stays small
    book.report(dec.token, GatewayReport(200, "natural", 0.02, None))
    assert dec.completed
    assert d.inflight == 0
    assert book.open == 0
    book.report(dec.token, OK)  # a duplicate changes nothing
    assert d.inflight == 0


def test_a_dispatched_request_with_no_entry_is_released_after_max_open() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d, max_open_s=60.0)
    dec = routed(d, book)
    book.dispatched(dec)
    start = dec.request.received_at
    book.sweep(now=start + 30.0)
    assert d.inflight == 1
    book.sweep(now=start + 3600.0)
    assert d.inflight == 0
    assert dec.completed
    assert book.open == 0


def test_dispatched_requests_are_bounded_and_flushed() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d, max_waiting=2)
    decisions = [routed(d, book, f"open {i}") for i in range(3)]
    for dec in decisions:
        book.dispatched(dec)
    assert book.open == 2
    assert decisions[0].completed
    assert d.inflight == 2
    book.flush()
    assert d.inflight == 0
    assert all(dec.completed for dec in decisions)


def test_an_ext_authz_entry_carries_its_token_in_the_filter_namespace() -> None:
    entry = _entry({"first_us": "1000620000", "prompt_tokens": "9", "completion_tokens": "2"})
    authz = struct_pb2.Struct()
    authz.update({"x-llmd-pick": "cd-7"})
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(authz)
    token, report = parse_entry(entry) or ("", OK)
    assert token == "cd-7"
    assert report.usage is not None
    assert report.usage.completion_tokens == 2
    bare = accesslog_pb2.HTTPAccessLogEntry()
    bare.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(authz)
    token, report = parse_entry(bare) or ("", OK)
    assert token == "cd-7"  # no Lua metadata (no body): still the request's entry
    assert report.usage is None


async def test_requests_of_a_gateway_that_went_away_are_released() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    book.orphan_grace_s = 0.05
    connections = 1
    book.check_connections = lambda: connections
    book.streams = 1
    decisions = [routed(d, book, f"orphan {i}") for i in range(3)]
    for dec in decisions:
        book.dispatched(dec)
    book.streams = 0
    book.detached()  # the access-log stream closed, a check connection is still open
    await asyncio.sleep(0.1)
    assert d.inflight == 3
    connections = 0
    book.detached()  # Envoy is gone: its buffered entries will never come
    await asyncio.sleep(0.1)
    assert d.inflight == 0
    assert all(dec.completed for dec in decisions)
    assert book.open == 0


async def test_a_gateway_that_comes_back_within_the_grace_keeps_its_requests() -> None:
    d, _, _ = make_director()
    book = FeedbackBook(d)
    book.orphan_grace_s = 0.05
    dec = routed(d, book)
    book.dispatched(dec)
    book.detached()
    book.streams = 1  # it reattached (a reconnected access-log stream)
    await asyncio.sleep(0.1)
    assert d.inflight == 1
    book.report(dec.token, OK)
    assert d.inflight == 0
