"""The gateway benchmark's rate ladder: which stage a target sustains, worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway_overhead import sustained


def stage(rate: float, p99: float, *, sent: float | None = None, done: float | None = None,
          errors: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "offered_rate": rate,
        "send_rate": rate if sent is None else sent,
        "achieved_rate": rate if done is None else done,
        "errors": errors or {},
        "ttft_p99_ms": p99,
    }


def test_the_ladder_stops_at_the_first_stage_that_fails() -> None:
    ladders = {
        "envoy-rr": [stage(100, 4.0), stage(200, 4.0), stage(300, 4.0), stage(400, 4.0)],
        "llmd-lean": [stage(100, 8.0), stage(200, 9.5), stage(300, 8.0), stage(400, 8.0)],
        "slow": [stage(100, 5.0, done=90.0), stage(200, 5.0)],
        "lossy": [stage(100, 5.0, errors={"503": 1})],
        "starved-client": [stage(100, 5.0, sent=80.0)],
    }
    out = sustained(ladders, added_p99_ms=5.0)
    assert out["envoy-rr"] == {"highest_sustained_rate": 400, "first_failure": None}
    # 200 is 5.5 ms over Envoy: the later passing stages do not count
    assert out["llmd-lean"]["highest_sustained_rate"] == 100
    assert out["llmd-lean"]["first_failure"] == "200 req/s: p99 +5.50 ms over Envoy"
    assert ladders["llmd-lean"][0]["added_p99_over_envoy_ms"] == 4.0
    assert out["slow"]["highest_sustained_rate"] is None
    assert "achieved 90.0 of 100 req/s sent" in out["slow"]["first_failure"]
    assert out["lossy"]["first_failure"] == "100 req/s: 1 errors"
    assert "the client sent only 80.0 req/s" in out["starved-client"]["first_failure"]


def test_without_envoy_only_errors_and_rate_count() -> None:
    out = sustained({"llmd-lean": [stage(100, 80.0), stage(200, 90.0)]}, added_p99_ms=5.0)
    assert out["llmd-lean"] == {"highest_sustained_rate": 200, "first_failure": None}
