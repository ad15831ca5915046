"""Logging format, OTEL_* driven tracing (exported over real HTTP) and metrics exposition."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter

from llmd.runtime.observability import render_metrics, setup_logging, setup_tracing


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_extras_and_the_active_trace(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("svc", level="info", fmt="json", stream=out)
    provider = setup_tracing("svc", env={"OTEL_TRACES_EXPORTER": "console"}, synchronous=True)
    assert provider is not None
    with provider.get_tracer("t").start_as_current_span("work"):
        logging.getLogger("x").info("picked %s", "pod-a", extra={"endpoint": "10.0.0.1:8000"})
    logging.getLogger("x").debug("hidden")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    rec = lines[0]
    assert (rec["msg"], rec["service"], rec["level"], rec["endpoint"]) == (
        "picked pod-a",
        "svc",
        "info",
        "10.0.0.1:8000",
    )
    assert len(rec["trace_id"]) == 32
    provider.shutdown()


def test_text_logs_are_one_readable_line(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("svc", level="debug", fmt="text", stream=out)
    logging.getLogger("x").warning("slow scrape", extra={"ms": 12})
    assert out.getvalue().rstrip().endswith("WARNING x: slow scrape  ms=12")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_unless_the_environment_asks(env: dict[str, str]) -> None:
    assert setup_tracing("svc", env=env) is None


def test_unknown_exporter_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="jaeger"):
        setup_tracing("svc", env={"OTEL_TRACES_EXPORTER": "jaeger"})


@pytest.mark.integration
def test_otlp_spans_reach_the_configured_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "llmd-test")
        provider = setup_tracing("fallback-name", synchronous=True)
        assert provider is not None
        with provider.get_tracer("t").start_as_current_span("schedule"):
            pass
        provider.force_flush()
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert received
    path, content_type, body = received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert b"schedule" in body
    assert b"llmd-test" in body


def test_metrics_render_from_a_service_registry() -> None:
    registry = CollectorRegistry()
    Counter("llmd_things", "things", registry=registry).inc(3)
    payload, content_type = render_metrics(registry)
    assert b"llmd_things_total 3.0" in payload
    assert content_type.startswith("text/plain")
