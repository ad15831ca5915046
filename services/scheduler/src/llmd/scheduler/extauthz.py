"""Envoy's ext_authz HTTP check: a cheaper way for the gateway to ask where a request goes.

With `--extauthz-port`, the scheduler also answers Envoy's ext_authz filter (HTTP service). Per
request, Envoy sends one HTTP/1.1 request carrying the client's headers and its buffered body to
`/llmd/check<original path>`; the scheduler parses, admits (flow control), schedules and answers:

- 200 with `x-gateway-destination-endpoint` and the pre-request headers (P/D, encoders, data
  parallel), which Envoy copies onto the upstream request, and `x-llmd-pick`, the feedback token
  Envoy keeps as dynamic metadata for the access log;
- or the rejection: llm-d's status, `x-llm-d-request-dropped-reason` and an OpenAI-style JSON
  body, which Envoy sends to the client as they are (a 5xx travels as 424 plus `x-llmd-status`,
  since Envoy reads a 5xx check answer as a failed check; the gateway restores the status).

`GET /llmd/health` answers 200 while the scheduler is ready and not draining (Envoy's health
check), 503 otherwise.

What differs from the ext_proc lean path (`extproc.py`):
- There is no stream that lives as long as the request, so nothing ends at the request's end.
  The request stays in flight until Envoy's access log reports it (`FeedbackBook.dispatched`).
  When no gateway is attached any more (no access-log stream, no check connection: Envoy
  exited and dropped its buffered entries), the requests it had dispatched are released after
  2 s (`orphaned`); any other request with no entry within `FeedbackBook.max_open_s` is
  released and counted as missing.
- The answer cannot change the body: a request the scheduler would rewrite (model rewrites) is
  refused with 500 and a message saying so; use the ext_proc path for such pools.
- Flow control cannot evict a request once it is dispatched (there is no stream to end).

The HTTP/1.1 handling is deliberately small: Envoy is the only client, sends one request at a time
per connection with a Content-Length, and the scheduler never reads more than a request's body.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable

from llmd.protocol import headers as hdr
from llmd.scheduler.director import Decision, Director
from llmd.scheduler.extproc import (
    RESPONSE_HEADERS_FROM_METADATA,
    headers_to_remove,
    rejection_body,
)
from llmd.scheduler.feedback import FeedbackBook
from llmd.scheduler.framework import SchedulingError

log = logging.getLogger(__name__)

CHECK_PREFIX = hdr.EXTAUTHZ_CHECK_PREFIX
HEALTH_PATH = hdr.EXTAUTHZ_HEALTH_PATH
TOKEN_HEADER = hdr.EXTAUTHZ_TOKEN
STATUS_HEADER = hdr.EXTAUTHZ_STATUS
WIRE_STATUS_5XX = 424
"""What a 5xx rejection is sent as (its real status in `x-llmd-status`): Envoy would read a 5xx
check answer as a failed check and answer its own 503."""
MAX_HEAD_BYTES = 256 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    424: "Failed Dependency",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def rejection(status: int, message: str, dropped_reason: str | None = None) -> bytes:
    """A denial Envoy forwards to the client: OpenAI-style JSON, llm-d's reason header."""
    headers = [("content-type", "application/json")]
    if dropped_reason:
        headers.append((hdr.REQUEST_DROPPED_REASON, dropped_reason))
    wire = status
    if status >= 500:
        headers.append((STATUS_HEADER, str(status)))
        wire = WIRE_STATUS_5XX
    return _response(wire, headers, rejection_body(status, message))


def allowed(decision: Decision) -> bytes:
    """The 200 answer: the routing headers Envoy copies upstream, and the metadata headers."""
    req = decision.request
    out = [(hdr.DESTINATION_ENDPOINT, decision.primary)]
    out += list(decision.set_headers.items())
    remove = headers_to_remove(decision)
    if remove:
        out.append(("x-envoy-auth-headers-to-remove", ",".join(remove)))
    if decision.token:
        out.append((TOKEN_HEADER, decision.token))
    for name in RESPONSE_HEADERS_FROM_METADATA:
        extra = req.response_headers.get(name)
        if extra is not None:
            out.append((name, extra))
    return _response(200, out)


class CheckServer:
    """Answers Envoy's ext_authz checks with the Director's decisions."""

    def __init__(
        self,
        director: Director,
        book: FeedbackBook,
        is_ready: Callable[[], bool],
        max_body_bytes: int,
    ) -> None:
        self.director = director
        self.book = book
        self.is_ready = is_ready
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        # HTTP/1.1: every check in flight (queued in flow control too) holds one connection
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("open-file limit raised from %d to %d for ext_authz connections", soft, want)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _CheckProtocol(self), host, port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """One check (or health) request to its answer."""
        if path == HEALTH_PATH:
            ok = self.is_ready() and not self.draining
            return _response(200 if ok else 503, [])
        if not path.startswith(CHECK_PREFIX):
            return rejection(404, f"the scheduler's check endpoint is {CHECK_PREFIX}<path>")
        d = self.director
        headers[":method"] = method
        headers[":path"] = path[len(CHECK_PREFIX) :] or "/"
        req = d.new_request(headers, "")
        req.path = headers[":path"].split("?", 1)[0]
        t0 = time.perf_counter()
        try:
            if not body and method in ("GET", "HEAD"):
                decision = d.pick_any(req)
            else:
                req.body = body
                await d.admit(req)
                await d.prefetch(req, None)
                decision = d.schedule(req, None)
        except SchedulingError as exc:
            d.rejected(req, exc)
            log.info("request %s rejected: %d %s", req.request_id, exc.status, exc.message)
            return rejection(exc.status, exc.message, exc.dropped_reason)
        if decision.body is not None and decision.body != req.body:
            # Envoy's ext_authz cannot replace the body; never send the unrewritten one
            d.complete(decision, "rejected")
            refused = SchedulingError(
                500,
                "this request needs its body rewritten (a model rewrite), which the gateway's "
                "ext_authz path cannot do; route this pool through ext_proc",
            )
            d.rejected(req, refused)
            return rejection(refused.status, refused.message)
        decision.token = self.book.token()
        self.book.dispatched(decision)
        d.metrics.request_processing.observe(time.perf_counter() - t0)
        return allowed(decision)


class _CheckProtocol(asyncio.Protocol):
    """HTTP/1.1 framing for one Envoy connection: one request at a time, Content-Length bodies."""

    def __init__(self, server: CheckServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.task: asyncio.Future[None] | None = None
        self.failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1
        self.server.book.detached()
        if self.task is not None and not self.task.done():
            # Envoy gave up on the check (client gone, timeout): the task stops at its await
            # (flow control's queue or a prefetch); scheduling after those has no await, so a
            # check is never decided for a connection already gone
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return  # read and dropped, so closing does not reset the connection
        self.buf += data
        if not self.busy:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be framed, then close: the write side at once, the
        connection once the peer closes or after a second."""
        assert self.transport is not None
        self.failed = True
        self.buf.clear()
        self.transport.write(rejection(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, self.transport.close)

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                self._fail(431, "check request headers too large")
            return
        try:
            # header values as the ext_proc path reads them (UTF-8, bad bytes replaced)
            head = bytes(self.buf[:end]).decode("utf-8", "replace")
            request_line, *lines = head.split("\r\n")
            method, path, _version = request_line.split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(f"bad header line {line[:60]!r}")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", ""):
                raise ValueError("chunked check requests are not supported")
            length = int(headers.get("content-length", "0") or 0)
            if length < 0:
                raise ValueError("negative content-length")
        except ValueError as exc:
            self._fail(400, f"malformed check request: {exc}")
            return
        if length > self.server.max_body_bytes:
            self._fail(413, f"request body exceeds {self.server.max_body_bytes} bytes")
            return
        total = end + 4 + length
        if len(self.buf) < total:
            return
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        self.busy = True
        self.task = asyncio.ensure_future(self._serve(method, path, headers, body))
        self.task.add_done_callback(_log_failure)

    async def _serve(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        try:
            answer = await self.server.handle(method, path, headers, body)
        except Exception:
            log.exception("ext_authz check failed")
            answer = rejection(500, "the scheduler failed to route this request")
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.buf:
            self._next()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:  # pragma: no cover
        log.error("ext_authz connection task failed", exc_info=task.exception())
