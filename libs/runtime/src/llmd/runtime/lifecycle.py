"""Liveness/readiness state, the HTTP routes that expose it, and graceful asyncio shutdown.

A service is an async `main(stop)` that runs until `stop` is set. `run_service` sets `stop` on
SIGTERM/SIGINT, first marking the service not ready (so load balancers drain it), then runs the
registered shutdown hooks newest-first within a deadline and cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from prometheus_client import CollectorRegistry, Gauge

from llmd.runtime.observability import render_metrics
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

ShutdownHook = Callable[[], Awaitable[None]]


@dataclass
class CheckState:
    ok: bool
    reason: str = ""
    since: float = field(default_factory=time.time)


class Health:
    """Named readiness checks plus a liveness flag; ready only when every check is ok."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._checks: dict[str, CheckState] = {}
        self.alive = True
        self.draining = False
        self._gauge = (
            Gauge(
                "llmd_readiness_check",
                "1 when the named readiness check passes",
                ["check"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    def set(self, check: str, ok: bool, reason: str = "") -> None:
        current = self._checks.get(check)
        if current is None or current.ok != ok or current.reason != reason:
            self._checks[check] = CheckState(ok, reason)
            if current is not None and current.ok != ok:
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "readiness check %s is now %s",
                    check,
                    "ok" if ok else "failing",
                    extra={"check": check, "reason": reason},
                )
        if self._gauge is not None:
            self._gauge.labels(check).set(1 if ok else 0)

    @property
    def ready(self) -> bool:
        return self.alive and not self.draining and all(c.ok for c in self._checks.values())

    def report(self) -> dict[str, object]:
        return {
            "alive": self.alive,
            "ready": self.ready,
            "draining": self.draining,
            "checks": {k: {"ok": v.ok, "reason": v.reason} for k, v in self._checks.items()},
        }


def health_router(health: Health, registry: CollectorRegistry) -> APIRouter:
    """`/healthz` (liveness), `/readyz` (readiness, 503 with reasons) and `/metrics`."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> Response:
        return Response(status_code=200 if health.alive else 503)

    @router.get("/readyz")
    async def readyz() -> Response:
        body = json.dumps(health.report())
        return Response(
            body, status_code=200 if health.ready else 503, media_type="application/json"
        )

    @router.get("/metrics")
    async def metrics() -> Response:
        # off the event loop: a large registry must not stall the service's requests
        payload, content_type = await asyncio.to_thread(render_metrics, registry)
        return Response(payload, media_type=content_type)

    return router


class BodyTooLargeError(Exception):
    """A request body over the route's limit (answered 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read no further than `limit` bytes (BodyTooLargeError past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body is over {limit} bytes")
    out = bytearray()
    async for chunk in request.stream():
        out += chunk
        if len(out) > limit:
            raise BodyTooLargeError(f"request body is over {limit} bytes")
    return bytes(out)


def require_token(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: with a token configured, requests must carry
    `Authorization: Bearer <token>` (401 otherwise); without one, it lets everything through."""

    async def check(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    return check


class ServiceRunner:
    """Runs one service's main coroutine and its orderly shutdown."""

    def __init__(self, name: str, health: Health, shutdown_timeout_s: float = 15.0) -> None:
        self.name = name
        self.health = health
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stop = asyncio.Event()
        self._hooks: list[tuple[str, ShutdownHook]] = []

    def on_shutdown(self, name: str, hook: ShutdownHook) -> None:
        """Register cleanup; hooks run newest-first (last started, first stopped)."""
        self._hooks.append((name, hook))

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            log.info("%s stopping: %s", self.name, reason)
            self.health.draining = True
            self.stop.set()

    async def _shutdown(self) -> bool:
        clean = True
        deadline = time.monotonic() + self.shutdown_timeout_s
        for name, hook in reversed(self._hooks):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(hook(), timeout=remaining)
            except TimeoutError:
                log.error(
                    "shutdown hook %s exceeded the %.1fs deadline", name, self.shutdown_timeout_s
                )
                clean = False
            except Exception:
                log.exception("shutdown hook %s failed", name)
                clean = False
        return clean

    async def run(self, main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
        """Run `main(stop)` until it returns or a signal arrives; 0 on a clean shutdown."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        task = asyncio.create_task(main(self.stop), name=f"{self.name}-main")
        stopper = asyncio.create_task(self.stop.wait(), name=f"{self.name}-stop-wait")
        failed = False
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task in done and task.exception() is not None:
                log.error("%s main task failed", self.name, exc_info=task.exception())
                failed = True
            self.request_stop("main task finished" if task in done else "stop requested")
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=self.shutdown_timeout_s)
                except TimeoutError:
                    log.error("%s main task did not stop in time; cancelling", self.name)
                    failed = True
                except Exception:
                    log.exception("%s main task failed while stopping", self.name)
                    failed = True
            clean = await self._shutdown()
        finally:
            # normally both are done here; when `run` itself is cancelled they are not, and
            # neither may outlive it (a main task that has finished was already reported)
            await cancel_tasks(stopper, None if task.done() else task)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self.health.alive = False
        return 0 if clean and not failed else 1


def run_service(
    name: str,
    main: Callable[[ServiceRunner], Callable[[asyncio.Event], Coroutine[Any, Any, None]]],
    *,
    health: Health | None = None,
    shutdown_timeout_s: float = 15.0,
) -> int:
    """Entry point helper: build the runner, let `main` wire components to it, run to the end."""

    async def _run() -> int:
        runner = ServiceRunner(name, health or Health(), shutdown_timeout_s)
        return await runner.run(main(runner))

    return asyncio.run(_run())


class QuietHttpServer(uvicorn.Server):
    """uvicorn without its own signal handling (the ServiceRunner owns SIGTERM/SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def http_server(
    app: FastAPI, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> QuietHttpServer:
    """A service's HTTP side (metrics, health, debug): quiet logs, no lifespan, no signals.
    Run it with `asyncio.create_task(server.serve())`; set `should_exit` to stop it. With
    `ssl_context` it serves HTTPS with that context (which the caller may reload)."""
    return QuietHttpServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ssl_context_factory=None if ssl_context is None else (lambda _c, _d: ssl_context),
        )
    )


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address or name (what only this machine can reach)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; OSError names the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # inherited by every accepted connection: without it a streamed (chunked) answer's small
    # last write waits for the client's delayed ACK, ~40 ms on every proxied response
    # (benchmarks/sidecar_overhead.py measured 44 ms added at p50 before, see its report)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def serve_http(
    app: FastAPI,
    host: str,
    port: int,
    name: str = "http",
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[QuietHttpServer, asyncio.Task[None]]:
    """Bind first (a taken port is an OSError now, not a log line later), then serve `app`
    (HTTPS with `ssl_context`)."""
    sock = listen_socket(host, port)
    server = http_server(app, host, port, ssl_context=ssl_context)
    return server, asyncio.create_task(server.serve(sockets=[sock]), name=name)


def grpc_listen(server: Any, address: str, credentials: Any = None) -> int:
    """Add a port to a grpc.aio server; OSError when it cannot be bound (grpc raises
    RuntimeError or returns 0, depending on the version)."""
    try:
        if credentials is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port
