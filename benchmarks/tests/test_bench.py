"""llmd-bench: traces are deterministic, metrics match hand-computed values, reports validate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from llmd.bench.cli import SCENARIOS, main, quick
from llmd.bench.metrics import RequestRecord, Summary, percentile, statistics
from llmd.bench.report import build_report, markdown_table, validate
from llmd.bench.workloads import (
    SharedPrefix,
    Stage,
    WorkloadSpec,
    build_trace,
    dump_jsonl,
    load_jsonl,
    trace_digest,
)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_trace_is_deterministic_and_seeded(name: str) -> None:
    spec = quick(SCENARIOS[name][1])
    a, b = build_trace(spec), build_trace(spec)
    assert a
    assert trace_digest(a) == trace_digest(b)
    other = build_trace(dataclasses.replace(spec, seed=spec.seed + 1))
    assert trace_digest(other) != trace_digest(a)


def test_shared_prefix_groups_share_their_system_prompt() -> None:
    spec = WorkloadSpec(
        kind="shared_prefix",
        stages=(Stage(rate=50, duration_s=4),),
        shared_prefix=SharedPrefix(3, 4, 50, 5, 16),
    )
    trace = build_trace(spec)
    by_group: dict[int, set[str]] = {}
    for r in trace:
        assert r.prompt is not None
        assert r.group is not None
        by_group.setdefault(r.group, set()).add(r.prompt.split("\n")[0])
    assert sorted(by_group) == [0, 1, 2]
    assert all(len(prefixes) == 1 for prefixes in by_group.values())
    assert len({p for s in by_group.values() for p in s}) == 3
    assert all(0 < r.t < 4 for r in trace)
    assert 120 < len(trace) < 280  # Poisson at 50/s for 4 s


def test_constant_rate_arrivals_are_evenly_spaced_across_stages() -> None:
    spec = WorkloadSpec(
        kind="random",
        stages=(
            Stage(rate=2, duration_s=2, arrival="constant"),
            Stage(rate=4, duration_s=1, arrival="constant"),
        ),
        input_len=3,
    )
    assert [r.t for r in build_trace(spec)] == [0.5, 1.0, 1.5, 2.25, 2.5, 2.75]
    assert [r.stage for r in build_trace(spec)] == [0, 0, 0, 1, 1, 1]


def test_multi_turn_sessions_grow_their_conversation() -> None:
    spec = WorkloadSpec(
        kind="multi_turn", stages=(Stage(rate=20, duration_s=3),), sessions=2, turns=3
    )
    trace = build_trace(spec)
    s0 = [r for r in trace if r.session == "s0"]
    assert s0[1].messages is not None
    assert s0[0].messages is not None
    assert s0[1].messages[: len(s0[0].messages)] == s0[0].messages
    assert all(len(r.messages or []) <= 2 * 3 for r in trace)


def test_jsonl_round_trip_and_clear_errors(tmp_path: Path) -> None:
    trace = build_trace(quick(SCENARIOS["multi-turn"][1]))
    f = tmp_path / "t.jsonl"
    dump_jsonl(trace, f)
    assert trace_digest(load_jsonl(f)) == trace_digest(trace)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "prompt": "x"}\n[1, 2]\n{"t": 2}\nnot json\n')
    with pytest.raises(ValueError) as exc:
        load_jsonl(bad)
    text = str(exc.value)
    assert "bad.jsonl:2: not an object" in text
    assert "bad.jsonl:3: give exactly one of 'prompt' and 'messages'" in text
    assert "bad.jsonl:4:" in text


def test_stages_are_checked() -> None:
    with pytest.raises(ValueError, match="either a rate"):
        Stage()
    with pytest.raises(ValueError, match="positive"):
        Stage(rate=-1)
    with pytest.raises(ValueError, match="mixing"):
        build_trace(WorkloadSpec(kind="random", stages=(Stage(rate=1), Stage(concurrency=2))))


def test_percentiles_and_statistics_by_hand() -> None:
    v = [1.0, 2.0, 3.0, 4.0]
    assert percentile(v, 50) == 2.5  # halfway between the 2nd and 3rd values
    assert percentile(v, 90) == pytest.approx(3.7)  # (4-1)*0.9 = 2.7 -> 3 + 0.7*(4-3)
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    s = statistics(v, "s")
    assert s["mean"] == 2.5
    assert s["stddev"] == pytest.approx(1.2909944)  # sample std of 1..4
    assert (s["min"], s["max"], s["units"]) == (1.0, 4.0, "s")
    assert statistics([], "s") == {"units": "s", "mean": None}


def record(sent: float, chunks: list[float], out: int, prompt: int, cached: int) -> RequestRecord:
    return RequestRecord(
        sent_at=sent,
        status=200,
        first_token_at=chunks[0],
        done_at=chunks[-1],
        chunk_times=chunks,
        prompt_tokens=prompt,
        output_tokens=out,
        cached_tokens=cached,
    )


def test_request_metrics_by_hand() -> None:
    r = record(10.0, [10.5, 10.6, 10.8, 11.1], out=4, prompt=100, cached=64)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx(0.2)  # (1.1 - 0.5) / (4 - 1)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    failed = RequestRecord(sent_at=0.0, status=503, error="no endpoints", done_at=0.1)
    s = Summary([r, record(11.0, [11.2, 11.4], out=2, prompt=50, cached=0), failed], 2.0)
    agg = s.aggregate()
    assert agg["requests"]["total"] == 3
    assert agg["requests"]["failures"] == 1
    assert agg["throughput"]["output_token_rate"]["mean"] == 3.0  # 6 tokens / 2 s
    assert agg["throughput"]["request_rate"]["mean"] == 1.0
    assert agg["latency"]["time_to_first_token"]["p50"] == pytest.approx(0.35)
    assert s.hit_rate() == pytest.approx(64 / 150)


def report_for(agg: dict) -> dict:  # type: ignore[type-arg]
    now = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    return build_report(
        experiment="unit",
        target="llmd",
        aggregate=agg,
        started=now,
        ended=now + dt.timedelta(seconds=12.5),
        stack=[
            {
                "metadata": {"label": "sim"},
                "standardized": {"kind": "inference_engine", "tool": "llmd-sim", "replicas": 2},
            }
        ],
        load={"standardized": {"tool": "llmd-bench", "rate_qps": 4.0}},
        hit_rate=0.5,
        description="unit test",
    )


def test_reports_follow_the_v0_2_schema() -> None:
    r = record(10.0, [10.5, 10.6, 10.8, 11.1], out=4, prompt=100, cached=64)
    agg = Summary([r], 1.0).aggregate()
    doc = report_for(agg)
    assert doc["version"] == "0.2"
    assert doc["run"]["time"]["duration"] == "PT12.50S"
    validate(json.loads(json.dumps(doc)))
    broken = json.loads(json.dumps(doc))
    broken["results"]["request_performance"]["aggregate"]["latency"]["time_to_first_token"][
        "units"
    ] = "tokens/s"
    del broken["run"]["uid"]
    with pytest.raises(ValueError) as exc:
        validate(broken)
    assert "run.uid" in str(exc.value)
    assert "time_to_first_token" in str(exc.value)
    table = markdown_table([("llmd", agg, 0.5)])
    assert "| llmd | 500 ms | 500 ms | 500 ms | 200 ms | 200 ms | 4 | 50% | 0/1 |" in table


def test_cli_lists_scenarios_and_writes_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scenarios"]) == 0
    assert "shared-prefix" in capsys.readouterr().out
    out = tmp_path / "t.jsonl"
    assert main(["trace", "random", "--out", str(out)]) == 0
    assert len(load_jsonl(out)) > 100
    assert main(["trace", "nope", "--out", str(out)]) == 2


def _gl_request(rel: float, start: float, first: float, end: float, prompt: int) -> dict:
    return {
        "info": {
            "settings": {"relative_timestamp": rel},
            "timings": {
                "request_start": start,
                "first_token_iteration": first,
                "last_token_iteration": end,
                "request_end": end,
            },
        },
        "input_metrics": {"text_tokens": prompt, "cached_tokens": prompt // 2},
        "output_metrics": {"text_tokens": 11},
    }


def test_guidellm_dataset_and_command_line() -> None:
    from llmd.bench import guidellm

    trace = build_trace(quick(SCENARIOS["shared-prefix"][1]))
    rows = guidellm.dataset_rows(trace[:2], timestamps=True)
    assert rows[0] == {
        "output_tokens_count": trace[0].max_tokens,
        "prompt": trace[0].prompt,
        "relative_timestamp": trace[0].t,
    }
    chat = build_trace(quick(SCENARIOS["multi-turn"][1]))
    assert guidellm.dataset_rows(chat[:1], timestamps=False)[0]["messages"] == chat[0].messages
    assert guidellm.check_trace(trace, [Stage(rate=1)]) == "/v1/completions"
    assert guidellm.check_trace(chat, [Stage(rate=1)]) == "/v1/chat/completions"
    with pytest.raises(guidellm.GuidellmError, match="mixes completions and chat"):
        guidellm.check_trace([trace[0], chat[0]], [Stage(rate=1)])
    with pytest.raises(guidellm.GuidellmError, match="open- and closed-loop"):
        guidellm.check_trace(trace, [Stage(rate=1), Stage(concurrency=2)])

    def cmd(stage: Stage | None, count: int) -> list[str]:
        return guidellm.command(
            Path("py"), url="http://h:1", model="tiny", tokenizer_dir=Path("/tok"),
            data=Path("/d.jsonl"), out=Path("/o.json"), request_format="/v1/completions",
            stage=stage, count=count,
        )  # fmt: skip

    replay = cmd(None, 5)
    assert replay[:4] == ["py", "-m", "guidellm", "run"]
    assert "kind=replay,schedule_turn=timestamp" in replay
    assert "kind=openai_http,target=http://h:1,model=tiny,request_format=/v1/completions" in replay
    closed = cmd(Stage(concurrency=8), 64)
    assert "kind=concurrent,streams=8" in closed
    assert "kind=max_requests,count=64" in closed


def test_guidellm_results_become_records_and_figures(tmp_path: Path) -> None:
    from llmd.bench import guidellm

    stat = {"mean": 20.0, "percentiles": {"p50": 10.0, "p90": 30.0, "p99": 40.0}}
    bench = {
        "duration": 4.0,
        "requests": {
            "successful": [
                _gl_request(0.5, 100.0, 100.1, 101.0, 40),  # stage 0 (0-2 s)
                _gl_request(2.5, 102.0, 102.3, 103.0, 60),  # stage 1 (2-4 s)
            ],
            "errored": [{"info": {"timings": {"request_start": 103.5}, "error": "boom"}}],
        },
        "metrics": {
            "time_to_first_token_ms": {"successful": stat},
            "request_latency": {"successful": stat},
            "output_token_count": {"successful": {"total_sum": 22}},
            "request_totals": {"successful": 2, "errored": 1, "total": 3},
        },
    }
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"benchmarks": [bench]}))
    stages = [Stage(rate=1, duration_s=2), Stage(rate=2, duration_s=2)]
    records, wall, figures = guidellm.load_results([(None, path)], stages)
    assert wall == 4.0
    ok = [r for r in records if r.ok]
    assert [r.stage for r in ok] == [0, 1]
    assert ok[0].ttft == pytest.approx(0.1)
    assert ok[1].e2e == pytest.approx(1.0)
    assert ok[1].cached_tokens == 30
    assert [r.error for r in records if not r.ok] == ["boom"]
    summary = Summary(records, wall)
    assert summary.hit_rate() == pytest.approx(50 / 100)
    (fig,) = figures
    assert fig["time_to_first_token"] == {"mean": 0.02, "p50": 0.01, "p90": 0.03, "p99": 0.04}
    assert fig["request_latency"]["p90"] == 30.0  # guidellm reports this one in seconds
    assert fig["output_token_rate"] == 22 / 4.0
    assert fig["requests"] == 3
    rows = {name: (a, b, rel) for name, a, b, rel in guidellm.agreement_rows(fig, fig)}
    assert rows["time_to_first_token p50"] == (0.01, 0.01, 0.0)
    halved = dict(fig, output_token_rate=fig["output_token_rate"] / 2)
    rows = {name: rel for name, _, _, rel in guidellm.agreement_rows(fig, halved)}
    assert rows["output tokens/s (first send to last end)"] == pytest.approx(-0.5)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(guidellm.GuidellmError, match="not a guidellm result file"):
        guidellm.load_results([(None, bad)], stages)


def test_runs_name_every_generator_and_repeat() -> None:
    from llmd.bench.cli import _runs

    runs = _runs(["llmd"], ["llmd-bench", "guidellm", "llmd-bench"])
    assert [(lg, label, stem) for _, lg, label, stem in runs] == [
        ("llmd-bench", "llmd", "llmd"),
        ("guidellm", "llmd (guidellm)", "llmd.guidellm"),
        ("llmd-bench", "llmd (llmd-bench-2)", "llmd.llmd-bench-2"),
    ]
    assert main(["run", "random", "--loadgen", "locust"]) == 2


def test_engine_side_means_are_deltas_of_the_engines_histograms() -> None:
    from llmd.bench.cli import engine_means

    ttft, tpot, e2e = (
        "vllm:time_to_first_token_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
    )
    before = {
        "a": {ttft + "_sum": 1.0, ttft + "_count": 10.0, tpot + "_sum": 0.5, tpot + "_count": 10.0},
        "b": {},
    }
    after = {
        "a": {ttft + "_sum": 1.4, ttft + "_count": 12.0, tpot + "_sum": 0.5, tpot + "_count": 10.0},
        "b": {ttft + "_sum": 0.2, ttft + "_count": 1.0, e2e + "_sum": 4.0, e2e + "_count": 2.0},
    }
    assert engine_means(before, after) == {
        "time_to_first_token": pytest.approx(0.2),  # (0.4 + 0.2) / (2 + 1)
        "time_per_output_token": None,  # nothing observed in between
        "request_latency": 2.0,
    }


def test_llmd_configs_are_named_and_checked_before_any_fleet(tmp_path: Path) -> None:
    from llmd.bench.cli import _llmd_configs

    good = tmp_path / "mine.yaml"
    good.write_text(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n"
        "  plugins:\n  - {pluginRef: queue-scorer, weight: 1}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n- type: no-such-plugin\n")
    assert _llmd_configs([f"mine={good}"]) == {"mine": good.resolve()}
    with pytest.raises(ValueError, match="NAME=FILE"):
        _llmd_configs(["mine"])
    with pytest.raises(ValueError, match="already a target"):
        _llmd_configs([f"llmd={good}"])
    with pytest.raises(ValueError, match="no such file"):
        _llmd_configs([f"mine={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ValueError, match="unknown plugin type 'no-such-plugin'"):
        _llmd_configs([f"mine={bad}"])
    assert main(["run", "random", "--llmd-config", f"mine={bad}", "--targets", "mine"]) == 2


def test_requests_per_engine_from_scrapes() -> None:
    from llmd.bench.cli import requests_per_engine

    name = "vllm:e2e_request_latency_seconds"
    before = {"a": {name + "_count": 2.0, name + "_sum": 1.0}, "b": {}}
    after = {"a": {name + "_count": 5.0, name + "_sum": 4.0}, "b": {name + "_count": 1.0}}
    assert requests_per_engine(before, after) == {"a": 3, "b": 1}
