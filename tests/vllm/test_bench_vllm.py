"""llmd-bench on real vLLM 0.32 CPU servers: the small real-fleet scenario runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmd.bench.cli import main
from llmd.bench.report import validate

pytestmark = pytest.mark.vllm


def test_bench_runs_against_two_real_vllm_servers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    rc = main(
        [
            "run", "vllm-shared-prefix", "--quick", "--fleet", "vllm", "--servers", "2",
            "--targets", "envoy-rr,llmd", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    for target in ("envoy-rr", "llmd"):
        doc = json.loads((out / f"{target}.json").read_text())
        validate(doc)
        agg = doc["results"]["request_performance"]["aggregate"]
        assert agg["requests"]["failures"] == 0
        assert agg["requests"]["output_length"]["mean"] == 32
        assert doc["scenario"]["stack"][0]["standardized"]["tool"] == "vllm"
        # vLLM's own cached_tokens: groups share ~1k-token system prompts
        hit = doc["results"]["observability"]["components"][0]["aggregate"]["cache_hit_rate"]
        assert hit["mean"] > 0.2
        # each target starts cold (prefix caches reset between targets): its first request
        # of every group misses, so the hit rate stays below 1
        assert hit["mean"] < 0.95
