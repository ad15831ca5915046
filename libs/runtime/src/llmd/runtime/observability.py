"""Structured logging, OpenTelemetry tracing from the standard OTEL_* variables, Prometheus text.

Each service builds its own `CollectorRegistry` in its composition root (no process-global
registry mutated at import time) and exposes it with `render_metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, service, and any `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "service": self.service,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = f"{span.trace_id:032x}"
            out["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Readable one-line logs for terminals: time level logger: msg key=value..."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    service: str, level: str | None = None, fmt: str | None = None, stream: Any = None
) -> None:
    """Configure the root logger. Level/format default to LLMD_LOG_LEVEL / LLMD_LOG_FORMAT
    (`json` or `text`; text when attached to a terminal)."""
    level = (level or os.environ.get("LLMD_LOG_LEVEL") or "INFO").upper()
    out = stream or sys.stderr
    fmt = fmt or os.environ.get("LLMD_LOG_FORMAT") or ("text" if out.isatty() else "json")
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _otlp_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT/HEADERS/TIMEOUT


def setup_tracing(
    service: str, env: Mapping[str, str] | None = None, *, synchronous: bool = False
) -> TracerProvider | None:
    """Build a TracerProvider from the standard OpenTelemetry environment variables.

    Tracing is on when OTEL_TRACES_EXPORTER names `otlp` or `console`, or when an OTLP endpoint
    is set; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off. Sampling
    (OTEL_TRACES_SAMPLER[_ARG]) and resource attributes (OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES) are read by the SDK itself. Returns None when off.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if not exporters:
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        exporters = ["otlp"] if has_endpoint else []
    exporters = [e for e in exporters if e != "none"]
    if not exporters:
        return None
    attributes: dict[str, str] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "otlp":
            exporter: SpanExporter = _otlp_exporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported (otlp, console, none)"
            )
        processor = SimpleSpanProcessor(exporter) if synchronous else BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
    return provider


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Prometheus text exposition of `registry` and its content type."""
    return generate_latest(registry), METRICS_CONTENT_TYPE


class LabelBudget:
    """Bounds the values a metric label set may take, whoever supplies them (model names come
    from clients): at most `max_sets` distinct sets, each value at most `max_length`
    characters. A set past either bound is reported as `overflow` in every position and counted
    in `llmd_metric_label_overflow_total{budget}`, so a hostile client cannot grow `/metrics`."""

    def __init__(
        self,
        name: str,
        *,
        max_sets: int = 1000,
        max_length: int = 128,
        overflow: str = "other",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.max_sets = max_sets
        self.max_length = max_length
        self.overflow = overflow
        self._seen: set[tuple[str, ...]] = set()
        self._overflows = (
            Counter(
                "llmd_metric_label_overflow",
                "Label sets reported as the overflow value (too many, or a value too long)",
                ["budget"],
                registry=registry,
            ).labels(name)
            if registry is not None
            else None
        )

    def __call__(self, *values: str) -> tuple[str, ...]:
        if values in self._seen:
            return values
        if len(self._seen) < self.max_sets and all(len(v) <= self.max_length for v in values):
            self._seen.add(values)
            return values
        if self._overflows is not None:
            self._overflows.inc()
        return (self.overflow,) * len(values)
