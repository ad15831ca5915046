"""guidellm as a second, independent load generator for the same trace.

`llmd-bench run <scenario> --loadgen guidellm` hands each target the scenario's trace through
guidellm (PyPI, pinned, installed once per machine into its own virtualenv with the CPU torch
build it requires) instead of llmd-bench's own generator:

- open-loop stages: every request becomes a row `{prompt | messages, output_tokens_count,
  relative_timestamp}` and guidellm's `replay` profile sends it at the trace's own time
  (`schedule_turn=timestamp`), so both generators offer the same requests at the same moments;
- closed-loop stages: one guidellm benchmark per stage, `concurrent` with the stage's users and
  `max_requests` set to the stage's requests.

guidellm measures with its own clock, parser and statistics. `load_results` turns its JSON into
llmd-bench's records (so the same v0.2 report and plots come out) and keeps guidellm's own
summary figures next to them; `agreement_table` sets those figures beside llmd-bench's for the
same target. The metric names differ, the definitions match:

| llmd-bench (llm-d) | guidellm |
|---|---|
| time_to_first_token | time_to_first_token_ms |
| time_per_output_token ((E2E - TTFT)/(n - 1)) | inter_token_latency_ms |
| normalized_time_per_output_token (E2E/n) | time_per_output_token_ms |
| request_latency | request_latency |

Seen with guidellm 0.8.1 here: against a single simulator its `replay` profile sometimes left
out the file's last row (36 of 37, 4 of 5 requests; with the rows reordered all 5 went). The
report keeps how many requests guidellm completed and the agreement table prints it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmd.bench.metrics import RequestRecord
from llmd.bench.peers import Peer, ensure_env
from llmd.bench.workloads import Stage, TraceRequest

GUIDELLM = Peer("guidellm", "0.8.1", "guidellm", "", "guidellm", preinstall=("torch==2.13.0",))

# (llmd-bench aggregate latency key, guidellm metric, unit scale to seconds)
METRIC_PAIRS: tuple[tuple[str, str, float], ...] = (
    ("time_to_first_token", "time_to_first_token_ms", 1e-3),
    ("time_per_output_token", "inter_token_latency_ms", 1e-3),
    ("normalized_time_per_output_token", "time_per_output_token_ms", 1e-3),
    ("request_latency", "request_latency", 1.0),
)


class GuidellmError(RuntimeError):
    pass


def dataset_rows(trace: Sequence[TraceRequest], *, timestamps: bool) -> list[dict[str, Any]]:
    """guidellm dataset rows for `trace` (its generative column mapper's default names)."""
    rows = []
    for req in trace:
        row: dict[str, Any] = {"output_tokens_count": req.max_tokens}
        if req.messages is not None:
            row["messages"] = req.messages
        else:
            row["prompt"] = req.prompt
        if timestamps:
            row["relative_timestamp"] = req.t
        rows.append(row)
    return rows


def check_trace(trace: Sequence[TraceRequest], stages: Sequence[Stage]) -> str:
    """The request format guidellm will use for `trace`; GuidellmError if it cannot drive it."""
    if not trace:
        raise GuidellmError("the trace is empty")
    kinds = {req.path for req in trace}
    if len(kinds) > 1:
        raise GuidellmError(
            "guidellm sends one request format per run; this trace mixes completions and chat"
        )
    closed = [s.concurrency is not None for s in stages]
    if any(closed) and not all(closed):
        raise GuidellmError("a trace mixing open- and closed-loop stages is not supported")
    return kinds.pop()


def command(
    python: Path,
    *,
    url: str,
    model: str,
    tokenizer_dir: Path,
    data: Path,
    out: Path,
    request_format: str,
    stage: Stage | None,
    count: int,
) -> list[str]:
    """The `guidellm run` command line for one benchmark (a whole open-loop trace, or a stage)."""
    if stage is None or stage.concurrency is None:
        profile = ["--profile", "kind=replay,schedule_turn=timestamp"]
    else:
        profile = [
            "--profile", f"kind=concurrent,streams={stage.concurrency}",
            "--constraint", f"kind=max_requests,count={count}",
        ]  # fmt: skip
    return [
        str(python), "-m", "guidellm", "run",
        "--backend",
        f"kind=openai_http,target={url},model={model},request_format={request_format}",
        *profile,
        "--data", f"kind=json_file,path={data}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip


def run(
    url: str,
    trace: Sequence[TraceRequest],
    stages: Sequence[Stage],
    model: str,
    tokenizer_dir: Path,
    work: Path,
) -> list[tuple[int | None, Path]]:
    """Drive `trace` with guidellm; returns its JSON result files, each with the stage it ran
    (None: the whole open-loop trace in one replay)."""
    request_format = check_trace(trace, stages)
    python = ensure_env(GUIDELLM)
    work.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[int | None, list[TraceRequest]]]
    if stages[0].concurrency is not None:  # closed loop (check_trace: every stage is)
        parts = [(i, [r for r in trace if r.stage == i]) for i in range(len(stages))]
    else:
        parts = [(None, list(trace))]
    outputs: list[tuple[int | None, Path]] = []
    for i, (index, reqs) in enumerate(parts):
        if not reqs:
            continue
        stage = None if index is None else stages[index]
        data = work / f"guidellm-data-{i}.jsonl"
        with data.open("w") as fh:
            for row in dataset_rows(reqs, timestamps=stage is None):
                fh.write(json.dumps(row) + "\n")
        out = work / f"guidellm-{i}.json"
        cmd = command(
            python, url=url, model=model, tokenizer_dir=tokenizer_dir, data=data, out=out,
            request_format=request_format, stage=stage, count=len(reqs),
        )  # fmt: skip
        log = work / f"guidellm-{i}.log"
        what = "replaying" if stage is None else f"{stage.concurrency} users,"
        print(f"guidellm: {what} {len(reqs)} requests (log {log})", file=sys.stderr, flush=True)
        with log.open("wb") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise GuidellmError(f"guidellm exited with {proc.returncode}:\n{tail}")
        outputs.append((index, out))
    return outputs


def _records(doc: dict[str, Any], stage_of: Callable[[float | None], int]) -> list[RequestRecord]:
    """guidellm's per-request timings as llmd-bench records (wall-clock seconds).

    guidellm keeps no per-chunk times, so these records have no inter-token gaps: a report made
    from them leaves `inter_token_latency` empty and its TPOT comes from first/last token.
    """
    out = []
    requests = doc.get("requests") or {}
    for status in ("successful", "errored", "incomplete"):
        for item in requests.get(status) or ():
            info = item.get("info") or {}
            t = info.get("timings") or {}
            start = t.get("request_start") or t.get("scheduled_at")
            if start is None:
                continue
            inp = item.get("input_metrics") or {}
            outm = item.get("output_metrics") or {}
            done = t.get("request_end") if status == "successful" else None
            rel = (info.get("settings") or {}).get("relative_timestamp")
            rec = RequestRecord(
                sent_at=float(start),
                stage=stage_of(rel),
                status=200 if status == "successful" else 0,
                error=None if status == "successful" else (info.get("error") or status),
                first_token_at=t.get("first_token_iteration"),
                done_at=done,
                prompt_tokens=inp.get("text_tokens"),
                output_tokens=outm.get("text_tokens"),
                cached_tokens=inp.get("cached_tokens"),
            )
            out.append(rec)
    return out


def own_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """guidellm's own summary of one benchmark, in seconds, for the agreement table."""
    metrics = doc.get("metrics") or {}
    figures: dict[str, Any] = {}
    for ours, theirs, scale in METRIC_PAIRS:
        stat = (metrics.get(theirs) or {}).get("successful") or {}
        pct = stat.get("percentiles") or {}
        figures[ours] = {
            "mean": _scaled(stat.get("mean"), scale),
            "p50": _scaled(pct.get("p50"), scale),
            "p90": _scaled(pct.get("p90"), scale),
            "p99": _scaled(pct.get("p99"), scale),
        }
    out_tok = ((metrics.get("output_token_count") or {}).get("successful") or {}).get("total_sum")
    duration = doc.get("duration") or 0.0
    figures["output_token_rate"] = out_tok / duration if out_tok and duration else None
    totals = metrics.get("request_totals") or {}
    figures["requests"] = totals.get("total")
    figures["successful"] = totals.get("successful")
    figures["duration_s"] = duration
    return figures


def _scaled(v: Any, scale: float) -> float | None:
    return None if v is None else float(v) * scale


def stage_finder(stages: Sequence[Stage]) -> Callable[[float | None], int]:
    """Open loop: the stage a trace time falls in (stages run back to back)."""
    ends = list(itertools.accumulate(s.duration_s for s in stages))

    def stage_of(t: float | None) -> int:
        if t is None:
            return 0
        return min(bisect.bisect_right(ends, t), len(ends) - 1)

    return stage_of


def _constant(i: int) -> Callable[[float | None], int]:
    def stage_of(_t: float | None) -> int:
        return i

    return stage_of


def load_results(
    outputs: Sequence[tuple[int | None, Path]], stages: Sequence[Stage]
) -> tuple[list[RequestRecord], float, list[dict[str, Any]]]:
    """Records, wall time and guidellm's own figures (one entry per benchmark) from the files
    `run` returned: a replay of the whole trace (stage None), or one file per closed-loop stage.
    """
    records: list[RequestRecord] = []
    wall = 0.0
    figures = []
    for index, path in outputs:
        stage_of = stage_finder(stages) if index is None else _constant(index)
        try:
            doc = json.loads(path.read_text())
            benchmarks = doc["benchmarks"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GuidellmError(f"{path}: not a guidellm result file ({exc})") from None
        for bench in benchmarks:
            records += _records(bench, stage_of)
            wall += float(bench.get("duration") or 0.0)
            figures.append(own_figures(bench))
    return records, wall, figures


def agreement_rows(
    ours: dict[str, Any], theirs: dict[str, Any]
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, first run, other run, relative difference) from two `own_figures`-shaped dicts.

    Output tokens/s is over the first send to the last completion on both sides (guidellm's
    benchmark duration), not over the trace's whole schedule. `engine` (optional) holds the
    engines' own server-side means for the same run: they say whether the engines did the same
    work in both runs, so that what differs is the clients' measurement.
    """
    rows: list[tuple[str, float | None, float | None, float | None]] = []
    for key, _, _ in METRIC_PAIRS:
        for stat in ("p50", "p90", "p99", "mean"):
            a = (ours.get(key) or {}).get(stat)
            b = (theirs.get(key) or {}).get(stat)
            rows.append((f"{key} {stat}", a, b, _rel(a, b)))
    a, b = ours.get("output_token_rate"), theirs.get("output_token_rate")
    rows.append(("output tokens/s (first send to last end)", a, b, _rel(a, b)))
    for key, _, _ in METRIC_PAIRS:
        a = (ours.get("engine") or {}).get(key)
        b = (theirs.get("engine") or {}).get(key)
        if a is not None or b is not None:
            rows.append((f"engine's own {key} mean", a, b, _rel(a, b)))
    return rows


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a == 0:
        return None
    return (b - a) / a
