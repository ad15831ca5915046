"""The lean response path: responses flow through Envoy without visiting the scheduler, and
what the scheduler learns from them arrives on a side stream.

With `response_body_mode: NONE` the ext_proc stream carries only the request (routing); Envoy
keeps the stream open until the HTTP stream ends, so its end releases the in-flight accounting
at the right moment. Usage, time to first byte and how the response ended come afterwards from
Envoy's gRPC access log (`envoy.service.accesslog.v3.AccessLogService`), served on the same
port: a small Lua filter in Envoy notes the first body byte's time and the usage object in the
body's tail as dynamic metadata (`llmd.*`), and each access-log entry carries that metadata, the
token the scheduler put there when it routed the request, the status and the response flags.

`FeedbackBook` joins the two: a request whose stream ended waits (bounded in count and time) for
its entry, and an entry that arrives first waits for its stream. Each request is completed
exactly once: with its entry, or without one after `timeout_s` (counted as `missing`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from llmd.protocol import headers as hdr
from llmd.protocol.openai import PromptTokensDetails, Usage
from llmd.runtime.tasks import cancel_tasks
from llmd.scheduler.director import Decision, Director

log = logging.getLogger(__name__)

NAMESPACE = "llmd"
"""The dynamic-metadata namespace the scheduler and the Lua filter write."""
TOKEN_KEY = "pick"


@dataclass(frozen=True, slots=True)
class GatewayReport:
    """What the gateway saw of one response."""

    status: int
    cause: str
    """natural, client-disconnect or error."""
    ttft_s: float | None
    usage: Usage | None
    response_bytes: int | None = None
    served: str | None = None
    """The upstream host:port Envoy finally sent the request to."""
    stream_events: int | None = None
    """Server-sent events that carried data (not `[DONE]`): a stream's output tokens when it
    has no usage chunk (one event per token, after a chat stream's role-only first event)."""


class FeedbackBook:
    """Ended requests waiting for their access-log entry, and entries waiting for their
    request's stream to end; both bounded by `max_waiting` and `timeout_s`."""

    def __init__(
        self,
        director: Director,
        timeout_s: float = 10.0,
        max_waiting: int = 65_536,
        max_open_s: float = 3600.0,
    ):
        self.director = director
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.max_open_s = max_open_s
        """ext_authz path: how long a dispatched request may stay in flight with no access-log
        entry (the gateway's longest request: Envoy's max stream duration) before it is
        released and counted as missing."""
        self._open: OrderedDict[str, tuple[float, Decision]] = OrderedDict()
        self._nonce = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self._waiting: OrderedDict[str, tuple[float, Decision]] = OrderedDict()
        self._early: OrderedDict[str, tuple[float, GatewayReport]] = OrderedDict()
        self.streams = 0
        """Open access-log streams (Envoy opens one on its first entry)."""
        self.check_connections: Callable[[], int] = lambda: 0
        """ext_authz path: Envoy's open check connections (set by the app)."""
        self.orphan_grace_s = 2.0
        self._task: asyncio.Task[None] | None = None
        m = director.metrics
        self._counts = {
            o: m.gateway_feedback.labels(o)
            for o in ("observed", "early", "missing", "evicted", "unobserved", "orphaned")
        }
        self._gauge = m.gateway_feedback_waiting

    def token(self) -> str:
        """A token unique to this process and request (a restarted scheduler never matches an
        entry meant for its predecessor)."""
        return f"{self._nonce}-{next(self._ids)}"

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def ended(self, decision: Decision) -> None:
        """The request's stream ended at the gateway: release its accounting now, record its
        outcome when the gateway reports it."""
        self.director.release(decision)
        decision.request.body = b""  # what waits must stay small
        early = self._early.pop(decision.token, None)
        if early is not None:
            self._counts["early"].inc()
            self._apply(decision, early[1])
            return
        if not decision.token:
            self._counts["unobserved"].inc()
            self.director.complete(decision, "unobserved")
            return
        self._add(self._waiting, decision, self.timeout_s)
        self._gauge.set(len(self._waiting))

    def dispatched(self, decision: Decision) -> None:
        """ext_authz path: the request was routed and nothing will say when its stream ends but
        its access-log entry; it stays in flight until that arrives (or `max_open_s`)."""
        decision.request.body = b""
        early = self._early.pop(decision.token, None)
        if early is not None:
            self._counts["early"].inc()
            self._apply(decision, early[1])
            return
        self._add(self._open, decision, self.max_open_s)

    def _add(
        self, entries: OrderedDict[str, tuple[float, Decision]], decision: Decision, ttl: float
    ) -> None:
        """Keep `decision` for `ttl` seconds; past `max_waiting`, the oldest is completed."""
        entries[decision.token] = (time.monotonic() + ttl, decision)
        while len(entries) > self.max_waiting:
            _, (_, old) = entries.popitem(last=False)
            self._counts["evicted"].inc()
            self.director.complete(old, "unobserved")

    def detached(self) -> None:
        """An access-log stream or a check connection closed. With none of either left, no
        gateway is attached: the entries of the requests it had dispatched will never come
        (Envoy drops its buffered entries when it exits). Unless a gateway attaches again
        within `orphan_grace_s`, those requests are released and counted as `orphaned`."""
        if self.streams or self.check_connections() or not self._open:
            return
        since = time.monotonic()
        asyncio.get_running_loop().call_later(self.orphan_grace_s, self._release_orphans, since)

    def _release_orphans(self, since: float) -> None:
        if self.streams or self.check_connections():
            return
        for token, (deadline, decision) in list(self._open.items()):
            if deadline - self.max_open_s <= since:
                del self._open[token]
                self._counts["orphaned"].inc()
                self.director.complete(decision, "unobserved")
        if self._open:
            log.warning("%d dispatched requests still wait for access-log entries", len(self._open))

    @property
    def open(self) -> int:
        """ext_authz path: requests in flight waiting for their access-log entry."""
        return len(self._open)

    def report(self, token: str, report: GatewayReport) -> None:
        opened = self._open.pop(token, None)
        if opened is not None:
            self._counts["observed"].inc()
            self._apply(opened[1], report)
            return
        item = self._waiting.pop(token, None)
        if item is None:
            if token.startswith(self._nonce):  # its stream has not ended yet
                self._early[token] = (time.monotonic() + self.timeout_s, report)
                while len(self._early) > self.max_waiting:
                    self._early.popitem(last=False)
            return
        self._gauge.set(len(self._waiting))
        self._counts["observed"].inc()
        self._apply(item[1], report)

    def _apply(self, decision: Decision, report: GatewayReport) -> None:
        d = self.director
        d.response_headers(decision, report.status)
        if report.ttft_s is not None and report.status < 400:
            d.first_byte(decision, report.ttft_s)
        d.complete(
            decision,
            report.cause,
            report.usage,
            response_bytes=report.response_bytes,
            served=report.served,
            stream_events=report.stream_events,
        )

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for decision in [*_expired(self._waiting, now), *_expired(self._open, now)]:
            self._counts["missing"].inc()
            self.director.complete(decision, "unobserved")
        _expired(self._early, now)
        self._gauge.set(len(self._waiting))

    def flush(self) -> None:
        """Complete everything still waiting (shutdown): nothing stays accounted."""
        for _, decision in [*self._waiting.values(), *self._open.values()]:
            self.director.complete(decision, "unobserved")
        self._waiting.clear()
        self._open.clear()
        self._early.clear()
        self._gauge.set(0)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            self.sweep()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sweeper(), name="feedback-sweeper")

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        self.flush()


def _expired(entries: OrderedDict[str, tuple[float, Any]], now: float) -> list[Any]:
    """Remove the entries (oldest first, in deadline order) whose deadline has passed; their
    values."""
    out = []
    while entries:
        token, (deadline, value) = next(iter(entries.items()))
        if deadline > now:
            break
        del entries[token]
        out.append(value)
    return out


def _number(fields: Any, key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    try:
        if kind == "number_value":
            return int(value.number_value)
        if kind == "string_value":
            return int(value.string_value)
    except (ValueError, OverflowError):
        return None
    return None


def _cause(entry: accesslog_pb2.HTTPAccessLogEntry, status: int) -> str:
    flags = entry.common_properties.response_flags
    if flags.downstream_connection_termination or flags.downstream_remote_reset:
        return "client-disconnect"
    upstream_trouble = (
        flags.upstream_connection_failure
        or flags.upstream_connection_termination
        or flags.upstream_remote_reset
        or flags.upstream_request_timeout
        or flags.stream_idle_timeout
        or flags.local_reset
        or flags.no_healthy_upstream
        or flags.upstream_overflow
    )
    if upstream_trouble or status == 0 or status >= 500:
        return "error"
    return "natural"


def parse_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, GatewayReport] | None:
    """The token and the report in one access-log entry (None: not a request we routed)."""
    common = entry.common_properties
    namespaces = common.metadata.filter_metadata
    meta = namespaces.get(NAMESPACE)
    token_value = meta.fields.get(TOKEN_KEY) if meta is not None else None
    if token_value is None:
        authz = namespaces.get(hdr.EXTAUTHZ_NAMESPACE)
        token_value = authz.fields.get(hdr.EXTAUTHZ_TOKEN) if authz is not None else None
    if token_value is None or not token_value.string_value:
        return None
    fields = meta.fields if meta is not None else {}
    status = entry.response.response_code.value
    ttft_s = None
    first_us = _number(fields, "first_us")
    if first_us is not None and common.HasField("start_time"):
        start_us = common.start_time.seconds * 1_000_000 + common.start_time.nanos // 1000
        if first_us >= start_us:
            ttft_s = (first_us - start_us) / 1e6
    usage = None
    prompt, completion = _number(fields, "prompt_tokens"), _number(fields, "completion_tokens")
    if prompt is not None and completion is not None and prompt >= 0 and completion >= 0:
        cached = _number(fields, "cached_tokens")
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)
            if cached is not None
            else None,
        )
    served = None
    upstream = common.upstream_remote_address.socket_address
    if upstream.address and upstream.port_value:
        host = f"[{upstream.address}]" if ":" in upstream.address else upstream.address
        served = f"{host}:{upstream.port_value}"
    size = entry.response.response_body_bytes if entry.HasField("response") else None
    events = _number(fields, "events")
    report = GatewayReport(
        status,
        _cause(entry, status),
        ttft_s,
        usage,
        size,
        served,
        events if events is not None and events >= 0 else None,
    )
    return token_value.string_value, report


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's gRPC access-log sink: each HTTP entry becomes a `GatewayReport`."""

    def __init__(self, book: FeedbackBook) -> None:
        self.book = book
        self.entries = 0
        self.bad_entries = 0

    async def StreamAccessLogs(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        self.book.streams += 1
        try:
            async for message in request_iterator:
                for entry in message.http_logs.log_entry:
                    self.entries += 1
                    try:
                        parsed = parse_entry(entry)
                    except Exception:  # a malformed entry must not end the stream
                        self.bad_entries += 1
                        log.exception("unreadable access-log entry")
                        continue
                    if parsed is not None:
                        self.book.report(*parsed)
        finally:
            self.book.streams -= 1
            self.book.detached()
        return als_pb2.StreamAccessLogsResponse()
