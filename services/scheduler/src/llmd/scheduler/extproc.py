"""Envoy's ExternalProcessor, and llm-d's gRPC health service.

Two gateway shapes are served; the first message's `protocol_config` says which.

Full path (llm-d's reference Envoy config, every body mode FULL_DUPLEX_STREAMED), per stream:
  request_headers  -> remember them (a bodiless request is routed at once, to a random endpoint)
  request_body*    -> buffer to end of stream (bounded), then schedule and reply with
                      HeadersResponse (x-gateway-destination-endpoint + envoy.lb metadata,
                      clear_route_cache) followed by the body in chunks of at most 62,000 bytes
  response_headers -> status, streaming or not; reply at once
  response_body*   -> passed straight back chunk by chunk; usage read from the tail
  end of stream    -> the Director releases the request's accounting exactly once, whatever
                      ended it (natural end, client gone, upstream reset, our own error)

Lean path (llmd's generated config: request body BUFFERED, response body NONE):
  request_headers  -> an empty reply (Envoy sends the body without waiting for it)
  request_body     -> the whole body in one message: schedule, reply with the routing header
                      mutation (the body goes back only if the scheduler changed it) and a
                      feedback token in the `llmd` metadata namespace
  end of stream    -> Envoy keeps the stream open until the HTTP stream ends: its end releases
                      the accounting; usage, time to first byte and how the response ended
                      arrive from Envoy's access log (`feedback.py`)

Errors before routing become ImmediateResponse with llm-d's status codes and
`x-llm-d-request-dropped-reason`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmd.protocol import headers as hdr
from llmd.protocol.openai import UsageTail, error_body
from llmd.scheduler.director import Decision, Director
from llmd.scheduler.feedback import NAMESPACE, TOKEN_KEY, FeedbackBook
from llmd.scheduler.framework import LLMRequest, SchedulingError

log = logging.getLogger(__name__)

BODY_CHUNK_BYTES = 62_000
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _MODES.FULL_DUPLEX_STREAMED
BUFFERED = _MODES.BUFFERED
NONE = _MODES.NONE
HEALTH_SERVICES = ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


def _header_value(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def read_headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def rejection_body(status: int, message: str) -> bytes:
    """The OpenAI-style JSON body of a request the scheduler answers itself."""
    kind = "BadRequestError" if status < 500 else "ServiceUnavailableError"
    return error_body(message, kind=kind, code=status)


def headers_to_remove(decision: Decision) -> list[str]:
    """Client headers that must not reach the engine: those only the scheduler reads
    (objectives, fairness, SLOs, the subset) and scheduler-owned ones it did not set."""
    req = decision.request
    return [
        h
        for h in req.headers
        if (h in hdr.SYSTEM_OWNED and h != "content-length")
        or (h in hdr.SCHEDULER_OWNED and h not in decision.set_headers)
    ]


def immediate(
    status: int, message: str, dropped_reason: str | None = None
) -> pb.ProcessingResponse:
    """An error reply sent by Envoy on our behalf, with an OpenAI-style JSON body."""
    body = rejection_body(status, message)
    headers = [_header_value("content-type", "application/json")]
    if dropped_reason:
        headers.append(_header_value(hdr.REQUEST_DROPPED_REASON, dropped_reason))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=body,
            # Envoy's response-code details: marks the reply as the scheduler's own (the
            # gateway's JSON error mapping leaves it alone) and names the reason in access logs
            details=f"llmd_{dropped_reason or 'rejected'}".replace(" ", "_"),
        )
    )


def _routing(
    decision: Decision, director: Director, body_len: int | None
) -> tuple[pb.CommonResponse, struct_pb2.Struct]:
    """The header mutation that routes a request, and the dynamic metadata that goes with it
    (`envoy.lb` for the load balancer; `llmd` for the lean response path's feedback)."""
    dest = decision.destination
    primary = decision.primary
    req = decision.request
    set_headers = [_header_value(hdr.DESTINATION_ENDPOINT, primary)]
    for key, value in req.headers.items():
        if key.startswith(":") or key in hdr.SYSTEM_OWNED or key == "host":
            continue
        if key == hdr.REQUEST_ID:
            set_headers.append(_header_value(key, value))
    for key, value in decision.set_headers.items():
        set_headers.append(_header_value(key, value))
    if body_len is not None:
        set_headers.append(_header_value("content-length", str(body_len)))
    common = pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=set_headers, remove_headers=headers_to_remove(decision)
        ),
        clear_route_cache=True,
    )
    lb: dict[str, Any] = {hdr.DESTINATION_ENDPOINT: dest}
    scores = director.endpoint_scores(decision)
    if scores is not None:
        lb[hdr.DESTINATION_ENDPOINT_SCORES] = scores
    doc: dict[str, Any] = {hdr.ENVOY_LB_NAMESPACE: lb}
    llmd: dict[str, Any] = {}
    if decision.token:
        llmd[TOKEN_KEY] = decision.token
        if req.target_model and req.target_model != req.model:
            llmd["model_from"] = req.target_model  # the Lua filter rewrites it back
            llmd["model_to"] = req.model
    for name in RESPONSE_HEADERS_FROM_METADATA:
        extra = req.response_headers.get(name)
        if extra is not None:
            llmd[name] = extra  # Envoy's route adds it to the response
    if llmd:
        doc[NAMESPACE] = llmd
    metadata = struct_pb2.Struct()
    metadata.update(doc)
    return common, metadata


def _routing_reply(
    decision: Decision, director: Director, body_len: int | None
) -> pb.ProcessingResponse:
    """Routing in the reply to the request headers (full-duplex and bodiless requests)."""
    common, metadata = _routing(decision, director, body_len)
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
    )


def _buffered_routing_reply(
    decision: Decision, director: Director, original: bytes
) -> pb.ProcessingResponse:
    """Routing in the reply to a buffered request body: the body goes back only if the
    scheduler changed it."""
    body = decision.body
    changed = body is not None and body != original
    common, metadata = _routing(decision, director, len(body) if changed and body else None)
    if changed and body is not None:
        common.body_mutation.body = body
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata
    )


def _body_replies(body: bytes, request: bool) -> list[pb.ProcessingResponse]:
    out = []
    n = max(1, (len(body) + BODY_CHUNK_BYTES - 1) // BODY_CHUNK_BYTES)
    for i in range(n):
        chunk = body[i * BODY_CHUNK_BYTES : (i + 1) * BODY_CHUNK_BYTES]
        mutation = pb.BodyMutation(
            streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=i == n - 1)
        )
        reply = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
        out.append(
            pb.ProcessingResponse(request_body=reply)
            if request
            else pb.ProcessingResponse(response_body=reply)
        )
    return out


def _subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    if not msg.HasField("metadata_context"):
        return None
    ns = msg.metadata_context.filter_metadata.get(hdr.ENVOY_LB_SUBSET_HINT)
    if ns is None or hdr.DESTINATION_ENDPOINT_SUBSET not in ns.fields:
        return None
    value = ns.fields[hdr.DESTINATION_ENDPOINT_SUBSET]
    return [str(v.string_value) for v in value.list_value.values]


RESPONSE_HEADERS_FROM_METADATA = (hdr.SESSION_TOKEN,)
"""Response headers plugins may set: the scheduler puts them in the `llmd` dynamic metadata and
the gateway's route adds them to the response (`%DYNAMIC_METADATA(llmd:<name>)%`), on the lean
and the full response path alike."""


def served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    """`envoy.lb` -> `x-gateway-destination-endpoint-served` in the message's metadata: the
    endpoint the gateway actually used (it differs from the pick after a retry to a
    fallback), or None when the gateway does not report it."""
    if not msg.HasField("metadata_context"):
        return None
    ns = msg.metadata_context.filter_metadata.get(hdr.ENVOY_LB_NAMESPACE)
    if ns is None:
        return None
    value = ns.fields.get(hdr.DESTINATION_ENDPOINT_SERVED)
    if value is None or not value.string_value:
        return None
    return str(value.string_value)


class _Stream:
    """One request's state across its ext_proc messages."""

    __slots__ = (
        "body",
        "decision",
        "done_request",
        "model_back",
        "next_message",
        "request",
        "request_mode",
        "response_bytes",
        "response_mode",
        "revoked",
        "saw_response",
        "served",
        "stream",
        "subset",
        "tail",
    )

    def __init__(self) -> None:
        self.request_mode: int = FULL_DUPLEX
        self.response_mode: int = FULL_DUPLEX
        self.saw_response = False
        self.response_bytes = 0
        self.served: str | None = None
        self.request: LLMRequest | None = None
        self.body = bytearray()
        self.decision: Decision | None = None
        self.done_request = False
        self.stream = False
        self.subset: list[str] | None = None
        self.tail: UsageTail | None = None
        self.model_back: tuple[bytes, bytes, bytes, bytes] | None = None
        self.revoked: asyncio.Future[str] | None = None
        """Set while flow control may revoke this dispatched request (in-flight eviction)."""
        self.next_message: asyncio.Task[pb.ProcessingRequest] | None = None


_END = object()


async def _next_or_revoked(it: AsyncIterator[pb.ProcessingRequest], s: _Stream) -> Any:
    """The stream's next message, `_END` at its end, or None when flow control revoked the
    request first (the read in progress is kept for the next call, or cancelled on revoke)."""
    assert s.revoked is not None
    if s.next_message is None:
        s.next_message = asyncio.ensure_future(it.__anext__())
    await asyncio.wait((s.next_message, s.revoked), return_when=asyncio.FIRST_COMPLETED)
    if s.next_message.done() or s.revoked.cancelled():
        if s.revoked.cancelled():  # no longer revocable (its accounting was released)
            s.revoked = None
        task, s.next_message = s.next_message, None
        try:
            return await task
        except StopAsyncIteration:
            return _END
    s.next_message.cancel()
    s.next_message = None
    return None


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """The ext_proc service; all policy lives in the Director."""

    def __init__(
        self, director: Director, max_body_bytes: int, book: FeedbackBook | None = None
    ) -> None:
        self.director = director
        self.max_body_bytes = max_body_bytes
        self.book = book
        """The lean response path's feedback (None: every response must come through here)."""

    def _lean(self, s: _Stream) -> bool:
        """Envoy sends no response to this stream; the access log reports on it instead."""
        return self.book is not None and s.response_mode == NONE and not s.saw_response

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        metrics = self.director.metrics
        metrics.streams_inflight.inc()
        s = _Stream()
        cause = "client-disconnect"
        it = request_iterator.__aiter__()
        try:
            while True:
                if s.revoked is None:
                    try:
                        msg = await it.__anext__()
                    except StopAsyncIteration:
                        break
                else:
                    got = await _next_or_revoked(it, s)
                    if got is _END:
                        break
                    if got is None:
                        # revoked by flow control: Envoy answers 429 if the response has not
                        # started, else resets it; the engine sees the client go and aborts
                        cause = "evicted"
                        yield immediate(429, "request evicted by flow control", s.revoked.result())
                        return
                    msg = got
                kind = msg.WhichOneof("request")
                if msg.HasField("protocol_config"):  # the first message: Envoy's body modes
                    s.request_mode = msg.protocol_config.request_body_mode
                    s.response_mode = msg.protocol_config.response_body_mode
                if kind == "request_headers":
                    s.request = self.director.new_request(read_headers(msg.request_headers), "")
                    s.request.path = s.request.headers.get(":path", "/").split("?", 1)[0]
                    s.subset = _subset_hint(msg)
                    if msg.request_headers.end_of_stream:
                        s.done_request = True
                        try:
                            s.decision = self.director.pick_any(s.request)
                        except SchedulingError as exc:
                            cause = "rejected"
                            self.director.rejected(s.request, exc)
                            yield immediate(exc.status, exc.message, exc.dropped_reason)
                            return
                        if self._lean(s):
                            s.decision.token = self.book.token() if self.book else ""
                        yield _routing_reply(s.decision, self.director, None)
                    elif s.request_mode == BUFFERED:
                        # the body follows in one message; routing goes in the reply to it
                        yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                    elif s.request_mode != FULL_DUPLEX:
                        cause = "rejected"
                        mode = _MODES.BodySendMode.Name(s.request_mode)
                        self.director.rejected(
                            s.request, SchedulingError(500, "unsupported request_body_mode")
                        )
                        yield immediate(
                            500,
                            f"the gateway's ext_proc request_body_mode is {mode}; llmd-scheduler "
                            "routes with FULL_DUPLEX_STREAMED or BUFFERED",
                        )
                        return
                elif kind == "request_body" or kind == "request_trailers":
                    if s.done_request or s.request is None:
                        if kind == "request_trailers":
                            yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                        continue
                    eos = kind == "request_trailers"
                    if kind == "request_body":
                        s.body += msg.request_body.body
                        eos = msg.request_body.end_of_stream
                        if len(s.body) > self.max_body_bytes:
                            cause = "rejected"
                            self.director.rejected(
                                s.request, SchedulingError(413, "request body too large")
                            )
                            yield immediate(
                                413, f"request body exceeds {self.max_body_bytes} bytes"
                            )
                            return
                    if not eos:
                        continue
                    s.done_request = True
                    t0 = time.perf_counter()
                    s.request.body = bytes(s.body)
                    s.body = bytearray()
                    try:
                        await self.director.admit(s.request)
                        await self.director.prefetch(s.request, s.subset)
                        s.decision = self.director.schedule(s.request, s.subset)
                    except SchedulingError as exc:
                        cause = "rejected"
                        self.director.rejected(s.request, exc)
                        log.info(
                            "request %s rejected: %d %s",
                            s.request.request_id,
                            exc.status,
                            exc.message,
                        )
                        yield immediate(exc.status, exc.message, exc.dropped_reason)
                        return
                    if self._lean(s) and self.book is not None:
                        s.decision.token = self.book.token()
                    if s.request_mode == BUFFERED:
                        replies = [
                            _buffered_routing_reply(s.decision, self.director, s.request.body)
                        ]
                    else:
                        body = s.decision.body if s.decision.body is not None else s.request.body
                        replies = [_routing_reply(s.decision, self.director, len(body))]
                        replies += _body_replies(body, request=True)
                    req = s.request
                    if req.target_model and req.target_model != req.model and not s.decision.token:
                        s.model_back = (
                            f'"model":"{req.target_model}"'.encode(),
                            f'"model":"{req.model}"'.encode(),
                            f'"model": "{req.target_model}"'.encode(),
                            f'"model": "{req.model}"'.encode(),
                        )
                    metrics.request_processing.observe(time.perf_counter() - t0)
                    s.revoked = self.director.evictable(s.request)
                    for reply in replies:
                        yield reply
                    if kind == "request_trailers":
                        yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    s.saw_response = True
                    hdrs = read_headers(msg.response_headers)
                    status = int(hdrs.get(":status", "0") or 0)
                    s.stream = "text/event-stream" in hdrs.get("content-type", "")
                    s.tail = UsageTail(s.stream)
                    s.served = served_endpoint(msg) or s.served
                    if s.decision is not None:
                        self.director.response_headers(s.decision, status)
                    yield pb.ProcessingResponse(
                        response_headers=pb.HeadersResponse(response=pb.CommonResponse())
                    )
                    if msg.response_headers.end_of_stream:
                        cause = "natural"
                        self._finish(s, cause)
                elif kind == "response_body":
                    s.saw_response = True
                    chunk = msg.response_body.body
                    if s.decision is not None and chunk:
                        self.director.first_byte(s.decision)
                    if s.model_back is not None and chunk:
                        a, b, c, d = s.model_back
                        chunk = chunk.replace(a, b).replace(c, d)
                    self._keep(s, chunk)
                    mutation = pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(
                            body=chunk, end_of_stream=msg.response_body.end_of_stream
                        )
                    )
                    yield pb.ProcessingResponse(
                        response_body=pb.BodyResponse(
                            response=pb.CommonResponse(body_mutation=mutation)
                        )
                    )
                    if msg.response_body.end_of_stream:
                        cause = "natural"
                        self._finish(s, cause)
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                    cause = "natural"
                    self._finish(s, cause)
            if s.decision is not None and not s.decision.completed and not self._lean(s):
                # Envoy closed the stream before the response ended: upstream reset or
                # the client went away. Either way the accounting must be released.
                cause = "error" if s.decision.status == 0 or s.decision.status >= 500 else cause
            elif s.decision is not None and not s.decision.completed:
                cause = "ended"  # the access log says how
        except Exception:
            cause = "error"
            log.exception("ext_proc stream failed")
            raise
        finally:
            if s.next_message is not None:
                s.next_message.cancel()
            if s.decision is not None and not s.decision.completed:
                if self.book is not None and self._lean(s) and cause != "error":
                    self.book.ended(s.decision)  # accounting released now, outcome reported
                else:
                    self._finish(s, cause)
            metrics.streams_inflight.dec()
            metrics.streams_total.labels(cause).inc()

    def _keep(self, s: _Stream, chunk: bytes) -> None:
        s.response_bytes += len(chunk)
        if s.tail is not None:
            s.tail.add(chunk)

    def _finish(self, s: _Stream, cause: str) -> None:
        """Release the request's accounting; nothing in the response can prevent it."""
        if s.decision is None or s.decision.completed:
            return
        try:
            usage = s.tail.usage() if s.tail is not None else None
        except Exception:  # usage_from_body never raises; this guards the accounting anyway
            log.exception("reading usage of %s failed", s.decision.request.request_id)
            usage = None
        self.director.complete(
            s.decision,
            cause,
            usage,
            response_bytes=s.response_bytes if s.saw_response else None,
            served=s.served,
        )


class HealthService(health_pb2_grpc.HealthServicer):
    """gRPC health with llm-d's service names: SERVING when the pool has synced and the
    scheduler is not draining; `liveness` stays SERVING while draining."""

    def __init__(self, is_ready: Any) -> None:
        self.is_ready = is_ready
        self.draining = False

    def status(self, service: str) -> int:
        if service not in HEALTH_SERVICES:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if service == "liveness":
            return int(health_pb2.HealthCheckResponse.SERVING)
        ok = self.is_ready() and not self.draining
        return int(
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        code = self.status(request.service)
        if code == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=code)
