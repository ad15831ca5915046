"""The fast metric classes export exactly what prometheus_client's own classes export."""

from __future__ import annotations

import math
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmd.runtime import fastmetrics

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
AMOUNTS = [0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 9.99, 10.0, 11.0, 1e9, math.inf, -math.inf, -3.0]


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition without the `_created` lines (their timestamps differ)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def exercise(mod: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    hist = mod.Histogram("h_seconds", "h", ["model", "port"], buckets=BUCKETS, registry=registry)
    plain = mod.Histogram("p_seconds", "p", buckets=BUCKETS, registry=registry)
    counter = mod.Counter("c", "c", ["code"], registry=registry)
    gauge = mod.Gauge("g", "g", ["endpoint"], registry=registry)
    for i, amount in enumerate(AMOUNTS):
        hist.labels("m", "8000").observe(amount)
        hist.labels("m", 8001).observe(amount)  # a non-string value: the slow path, same child
        hist.labels(model="k", port="1").observe(amount)
        plain.observe(amount)
        counter.labels(str(i % 3)).inc()
        counter.labels("0").inc(2.5)
        gauge.labels("a").set(amount if math.isfinite(amount) else 0)
        gauge.labels("b").inc(i)
    hist.labels("m", "8000").observe(math.nan)
    hist.labels("gone", "1").observe(1.0)
    hist.remove("gone", "1")
    hist.labels("gone", "1").observe(5.0)  # a removed set starts again from zero
    return registry


def test_the_exposition_equals_prometheus_clients() -> None:
    ours = exposition(exercise(fastmetrics))
    theirs = exposition(exercise(prometheus_client))
    assert ours == theirs
    assert any(
        line.startswith('h_seconds_bucket{le="0.01",model="m",port="8000"}') for line in ours
    )


def test_the_same_errors_as_prometheus_client() -> None:
    registry = CollectorRegistry()
    hist = fastmetrics.Histogram("h", "h", ["a"], registry=registry)
    counter = fastmetrics.Counter("c", "c", ["a"], registry=registry)
    with pytest.raises(ValueError, match="missing label values"):
        hist.observe(1.0)  # a labelled parent
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()
    with pytest.raises(ValueError, match="Incorrect label count"):
        hist.labels("x", "y")
    child = counter.labels("x")
    with pytest.raises(ValueError, match="non-negative"):
        child.inc(-1)
    assert counter.labels("x") is child
    assert isinstance(child, fastmetrics.Counter)
    assert isinstance(hist.labels("x"), fastmetrics.Histogram)
