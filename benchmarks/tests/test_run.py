"""`llmd-bench run` end to end on a small simulated fleet: every target, valid reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmd.bench.cli import main
from llmd.bench.report import validate

pytestmark = pytest.mark.integration


def test_run_writes_a_valid_report_per_target(tmp_path: Path) -> None:
    out = tmp_path / "results"
    rc = main(
        [
            "run", "shared-prefix", "--quick", "--servers", "2",
            "--targets", "llmd,envoy-rr", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    for target in ("llmd", "envoy-rr"):
        doc = json.loads((out / f"{target}.json").read_text())
        validate(doc)
        agg = doc["results"]["request_performance"]["aggregate"]
        assert agg["requests"]["total"] > 10
        assert agg["requests"]["failures"] == 0
        assert agg["latency"]["time_to_first_token"]["p50"] > 0
        assert doc["llmd"]["command"].startswith("llmd-bench ")
    digests = {
        json.loads((out / f"{t}.json").read_text())["llmd"]["trace_digest"]
        for t in ("llmd", "envoy-rr")
    }
    assert len(digests) == 1  # the same trace for every target
    for png in ("ttft_vs_qps.png", "throughput_vs_qps.png", "ttft_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing-here")]) == 2
    summary = (out / "summary.md").read_text()
    assert "| llmd |" in summary
    assert "| envoy-rr |" in summary


def test_unknown_targets_and_scenarios_are_refused(tmp_path: Path) -> None:
    assert main(["run", "nope", "--out", str(tmp_path)]) == 2
    assert main(["run", "random", "--targets", "llmd,haproxy", "--out", str(tmp_path)]) == 2


def test_peer_routers_run_in_their_own_virtualenvs(tmp_path: Path) -> None:
    """sglang-router (cache_aware) and vllm-router from PyPI, against the same simulated fleet.
    Installing them needs the package index once per machine: without it this fails loudly."""
    out = tmp_path / "peers"
    rc = main(
        [
            "run", "random", "--quick", "--servers", "2",
            "--targets", "sglang-cache-aware,vllm-router", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    for target in ("sglang-cache-aware", "vllm-router"):
        doc = json.loads((out / f"{target}.json").read_text())
        validate(doc)
        assert doc["results"]["request_performance"]["aggregate"]["requests"]["failures"] == 0
        assert doc["scenario"]["stack"][1]["metadata"]["description"].endswith("cache_aware")


def test_guidellm_drives_the_same_trace(tmp_path: Path) -> None:
    """guidellm (PyPI, its own virtualenv with the CPU torch) replays the same trace at the same
    times; its report validates and counts the same prompts and outputs as llmd-bench's."""
    out = tmp_path / "gl"
    rc = main(
        [
            "run", "shared-prefix", "--quick", "--servers", "2", "--targets", "envoy-rr",
            "--loadgen", "llmd-bench,guidellm", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    ours = json.loads((out / "envoy-rr.json").read_text())
    theirs = json.loads((out / "envoy-rr.guidellm.json").read_text())
    validate(theirs)
    assert theirs["llmd"]["loadgen"] == "guidellm"
    assert theirs["llmd"]["versions"]["guidellm"] == "0.8.1"
    assert theirs["llmd"]["trace_digest"] == ours["llmd"]["trace_digest"]
    (figures,) = theirs["llmd"]["guidellm"]
    total = ours["llmd"]["trace_requests"]
    # guidellm 0.8.1's replay has been seen to leave out the file's last row (module docstring)
    assert total - 1 <= figures["successful"] <= total
    a = ours["results"]["request_performance"]["aggregate"]["requests"]
    b = theirs["results"]["request_performance"]["aggregate"]["requests"]
    assert a["failures"] == 0
    assert b["failures"] == 0
    assert a["output_length"]["min"] == b["output_length"]["max"] == 256
    if figures["successful"] == total:
        assert b["input_length"]["mean"] == a["input_length"]["mean"]
    assert figures["time_to_first_token"]["p50"] > 0
    summary = (out / "summary.md").read_text()
    assert "| envoy-rr (guidellm) |" in summary
    assert "its own figures" in summary
    # closed loop: one guidellm benchmark per stage, stages kept apart
    rc = main(
        [
            "run", "concurrency", "--quick", "--servers", "2", "--targets", "envoy-rr",
            "--loadgen", "guidellm", "--out", str(tmp_path / "closed"),
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "closed" / "envoy-rr.guidellm.json").read_text())
    assert len(doc["llmd"]["guidellm"]) == 2
    assert sorted(doc["llmd"]["stages"]) == ["0", "1"]
    assert doc["results"]["request_performance"]["aggregate"]["requests"]["total"] == 32
