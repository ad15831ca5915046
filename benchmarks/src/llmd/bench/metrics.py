"""Per-request measurements and their statistics, with llm-d's definitions and names.

For one streamed request: TTFT = first content chunk - send; E2E = last byte - send;
ITL = gaps between consecutive content chunks; TPOT = (E2E - TTFT) / (output tokens - 1);
normalized time per output token = E2E / output tokens. Token counts and the prefix hit
(`prompt_tokens_details.cached_tokens`) come from the engine's own `usage`.

`Statistics` matches llm-d's report schema (mean, stddev, min, p0.1 ... p99.9, max, units);
percentiles interpolate linearly between order statistics (numpy's default), so they can be
checked by hand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES: dict[str, float] = {
    "p0p1": 0.1,
    "p1": 1,
    "p5": 5,
    "p10": 10,
    "p25": 25,
    "p50": 50,
    "p75": 75,
    "p90": 90,
    "p95": 95,
    "p99": 99,
    "p99p9": 99.9,
}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linear between order statistics."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def statistics(values: Sequence[float], units: str) -> dict[str, Any]:
    """llm-d's `Statistics` block; an empty sample gives only the units and a null mean."""
    if not values:
        return {"units": units, "mean": None}
    v = sorted(values)
    n = len(v)
    mean = sum(v) / n
    var = sum((x - mean) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
    out: dict[str, Any] = {"units": units, "mean": mean, "stddev": math.sqrt(var), "min": v[0]}
    for key, q in PERCENTILES.items():
        out[key] = percentile(v, q)
    out["max"] = v[-1]
    return out


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in seconds, monotonic clock)."""

    sent_at: float
    stage: int = 0
    status: int = 0
    error: str | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    target: str | None = None
    """The endpoint that served it, when the target says (response header)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done_at is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def e2e(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass(slots=True)
class Summary:
    """Aggregates over a set of records (one stage, or a whole run)."""

    records: list[RequestRecord]
    duration_s: float

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    def hit_rate(self) -> float | None:
        ok = [r for r in self.ok if r.prompt_tokens and r.cached_tokens is not None]
        prompt = sum(r.prompt_tokens or 0 for r in ok)
        return sum(r.cached_tokens or 0 for r in ok) / prompt if prompt else None

    def aggregate(self) -> dict[str, Any]:
        """llm-d's `results.request_performance.aggregate` block."""
        ok = self.ok
        d = self.duration_s if self.duration_s > 0 else math.nan
        out_tokens = sum(r.output_tokens or 0 for r in ok)
        in_tokens = sum(r.prompt_tokens or 0 for r in ok)
        itls = [x for r in ok for x in r.itls]
        return {
            "requests": {
                "total": len(self.records),
                "failures": len(self.records) - len(ok),
                "incomplete": sum(1 for r in self.records if r.done_at is None),
                "input_length": statistics([float(r.prompt_tokens or 0) for r in ok], "count"),
                "output_length": statistics([float(r.output_tokens or 0) for r in ok], "count"),
            },
            "latency": {
                "time_to_first_token": statistics([r.ttft for r in ok if r.ttft is not None], "s"),
                "normalized_time_per_output_token": statistics(
                    [r.e2e / r.output_tokens for r in ok if r.e2e and r.output_tokens], "s/token"
                ),
                "time_per_output_token": statistics(
                    [r.tpot for r in ok if r.tpot is not None], "s/token"
                ),
                "inter_token_latency": statistics(itls, "s/token"),
                "request_latency": statistics([r.e2e for r in ok if r.e2e is not None], "s"),
            },
            "throughput": {
                "input_token_rate": {"units": "tokens/s", "mean": in_tokens / d},
                "output_token_rate": {"units": "tokens/s", "mean": out_tokens / d},
                "total_token_rate": {"units": "tokens/s", "mean": (in_tokens + out_tokens) / d},
                "request_rate": {"units": "queries/s", "mean": len(ok) / d},
            },
        }
