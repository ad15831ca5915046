"""llm-d's standard benchmark report (schema v0.2): build, validate, summarize.

The models below follow llm-d-benchmark's `schema_v0_2.py` for the parts llmd fills: `run`
(ids, times, description), `scenario` (stack components and the load), `results.
request_performance.aggregate` (requests, latency, throughput as `Statistics` with units) and
the observability aggregate (prefix-cache hit rate). Extra keys are allowed where llm-d allows
them; each `Statistics` field must carry a unit of its category (time, time per token, tokens/s,
queries/s, count, fraction), as llm-d's validators demand.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "0.2"
UNITS = {
    "time": {"ms", "s"},
    "time_per_token": {"ms/token", "s/token"},
    "token_rate": {"tokens/s"},
    "query_rate": {"queries/s"},
    "count": {"count"},
    "ratio": {"percent", "fraction", "ratio"},
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Statistics(_Closed):
    units: str
    mean: float | None
    mode: float | None = None
    stddev: float | None = None
    min: float | None = None
    p0p1: float | None = None
    p1: float | None = None
    p5: float | None = None
    p10: float | None = None
    p25: float | None = None
    p50: float | None = None
    p75: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    p99p9: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Statistics:
        keys = ["min", "p0p1", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99"]
        values = [getattr(self, k) for k in [*keys, "p99p9", "max"]]
        present = [v for v in values if v is not None]
        if any(b < a - 1e-12 for a, b in itertools.pairwise(present)):
            raise ValueError(f"percentiles must not decrease: {present}")
        return self


def _stat(category: str) -> Any:
    allowed = UNITS[category]

    def check(v: Statistics) -> Statistics:
        if v.units not in allowed:
            raise ValueError(f"units {v.units!r} is not one of {sorted(allowed)}")
        return v

    return check


class Requests(_Open):
    total: int = Field(ge=0)
    failures: int = Field(ge=0)
    incomplete: int = Field(default=0, ge=0)
    input_length: Statistics
    output_length: Statistics

    _in = field_validator("input_length", "output_length")(_stat("count"))


class Latency(_Open):
    time_to_first_token: Statistics
    normalized_time_per_output_token: Statistics
    time_per_output_token: Statistics
    inter_token_latency: Statistics
    request_latency: Statistics

    _t = field_validator("time_to_first_token", "request_latency")(_stat("time"))
    _tt = field_validator(
        "normalized_time_per_output_token", "time_per_output_token", "inter_token_latency"
    )(_stat("time_per_token"))


class Throughput(_Open):
    input_token_rate: Statistics
    output_token_rate: Statistics
    total_token_rate: Statistics
    request_rate: Statistics

    _r = field_validator("input_token_rate", "output_token_rate", "total_token_rate")(
        _stat("token_rate")
    )
    _q = field_validator("request_rate")(_stat("query_rate"))


class Aggregate(_Open):
    requests: Requests
    latency: Latency
    throughput: Throughput


class RequestPerformance(_Open):
    aggregate: Aggregate


class Component(_Open):
    component_label: str
    aggregate: dict[str, Statistics] = Field(default_factory=dict)


class Observability(_Open):
    components: list[Component] = Field(default_factory=list)


class Results(_Open):
    request_performance: RequestPerformance
    observability: Observability | None = None


class RunTime(_Closed):
    start: str
    end: str
    duration: str


class Run(_Open):
    uid: str
    eid: str | None = None
    cid: str | None = None
    pid: str | None = None
    time: RunTime
    user: str | None = None
    description: str | None = None
    keywords: list[str] | None = None


class StackStandardized(_Open):
    kind: Literal["inference_engine", "generic"]
    tool: str
    tool_version: str | None = None
    role: Literal["replica", "prefill", "decode"] | None = None
    replicas: int | None = Field(default=None, ge=1)
    model: dict[str, Any] | None = None
    accelerator: dict[str, Any] | None = None


class StackComponent(_Open):
    metadata: dict[str, Any]
    standardized: StackStandardized
    native: dict[str, Any] = Field(default_factory=dict)


class LoadStandardized(_Open):
    tool: str
    tool_version: str | None = None
    parallelism: int = Field(default=1, ge=1)
    source: Literal["random", "sampled", "unknown"] = "random"
    stage: int = Field(default=0, ge=0)
    input_seq_len: dict[str, Any] | None = None
    output_seq_len: dict[str, Any] | None = None
    prefix: dict[str, Any] | None = None
    multi_turn: dict[str, Any] | None = None
    rate_qps: float | None = Field(default=None, gt=0)
    concurrency: float | None = Field(default=None, ge=1)


class Load(_Open):
    metadata: dict[str, Any] = Field(default_factory=dict)
    standardized: LoadStandardized
    native: dict[str, Any] = Field(default_factory=dict)


class Scenario(_Open):
    stack: list[StackComponent]
    load: Load


class BenchmarkReport(_Open):
    version: Literal["0.2", "0.2.1"]
    run: Run
    scenario: Scenario
    results: Results


def iso_duration(seconds: float) -> str:
    return f"PT{seconds:.2f}S"


def build_report(
    *,
    experiment: str,
    target: str,
    aggregate: dict[str, Any],
    started: dt.datetime,
    ended: dt.datetime,
    stack: list[dict[str, Any]],
    load: dict[str, Any],
    hit_rate: float | None,
    description: str,
    native: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A v0.2 report dict (validated before it is returned)."""
    eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmd-bench/{experiment}"))
    doc: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "run": {
            "uid": str(uuid.uuid4()),
            "eid": eid,
            "cid": target,
            "time": {
                "start": started.isoformat(),
                "end": ended.isoformat(),
                "duration": iso_duration((ended - started).total_seconds()),
            },
            "description": description,
        },
        "scenario": {"stack": stack, "load": load},
        "results": {
            "request_performance": {"aggregate": aggregate},
            "observability": {
                "components": [
                    {
                        "component_label": target,
                        "aggregate": {
                            "cache_hit_rate": {"units": "fraction", "mean": hit_rate},
                        },
                    }
                ]
            },
        },
    }
    if native:
        doc["llmd"] = native
    validate(doc)
    return doc


def validate(doc: dict[str, Any]) -> BenchmarkReport:
    """Pydantic validation against the v0.2 models; ValueError lists every problem."""
    from pydantic import ValidationError

    try:
        return BenchmarkReport.model_validate(doc)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError("invalid benchmark report:\n" + "\n".join(problems)) from None


def markdown_table(rows: list[tuple[str, dict[str, Any], float | None]]) -> str:
    """One line per target: TTFT p50/p90/p99, TPOT p50/p90, output tokens/s, hit rate, errors."""

    def ms(stat: dict[str, Any], key: str) -> str:
        v = stat.get(key)
        return "-" if v is None else f"{v * 1000:.0f} ms"

    lines = [
        "| target | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | output tok/s "
        "| hit rate | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, agg, hit in rows:
        lat = agg["latency"]
        ttft, tpot = lat["time_to_first_token"], lat["time_per_output_token"]
        out_rate = agg["throughput"]["output_token_rate"]["mean"]
        req = agg["requests"]
        lines.append(
            f"| {name} | {ms(ttft, 'p50')} | {ms(ttft, 'p90')} | {ms(ttft, 'p99')} | "
            f"{ms(tpot, 'p50')} | {ms(tpot, 'p90')} | {out_rate:.0f} | "
            f"{'-' if hit is None else f'{hit:.0%}'} | {req['failures']}/{req['total']} |"
        )
    return "\n".join(lines)
