"""What watching a pool costs the scheduler: its CPU per second, with no requests, while it
scrapes N simulated engines, for the default scrape budget and for none (every engine every
`--refresh-metrics-interval`, llm-d's behaviour), with and without the name filter (each engine
asked for only the samples the scheduler reads, `--metrics-name-filter`, the default), and at
each `--intervals` value of `--refresh-metrics-interval` (50ms, llm-d's, by default).

For each pool size: llmd-sim serves N engines from one process; llmd-scheduler (a process, the
default config) scrapes them; after a warm-up its user + system CPU is read from /proc over
`--seconds`. Reported: CPU ms per second, per engine per second, scrapes per second and the
interval each engine was scraped at (the scheduler's own `llmd_engine_scrape_interval_seconds`).

Usage: uv run python benchmarks/scrape_cost.py [--engines 4,16,64] [--seconds 5]
       [--filters on,off] [--intervals 50ms,200ms,1s] [--out FILE]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import cpu_seconds
from protocol_throughput import write_report

from llmd.dev.gateway import SchedulerProcess
from llmd.dev.sim_engines import SimFleetProcess

ROOT = Path(__file__).resolve().parent.parent


def scrapes(sched: SchedulerProcess) -> tuple[float, float, float]:
    total, interval, filtered = 0.0, 0.0, 0.0
    for line in sched.metrics_text().splitlines():
        if (
            line.startswith("llmd_engine_scrapes_total{")
            and 'source="metrics"' in line
            and 'outcome="ok"' in line
        ):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("llmd_engine_scrape_interval_seconds "):
            interval = float(line.rsplit(" ", 1)[1])
        elif line.startswith("llmd_engine_scrape_filtered_targets "):
            filtered = float(line.rsplit(" ", 1)[1])
    return total, interval, filtered


def measure(
    fleet: SimFleetProcess,
    work: Path,
    budget: str,
    name_filter: str,
    seconds: float,
    interval: str = "50ms",
) -> dict[str, Any]:
    args = ["--max-scrapes-per-second", budget] if budget != "default" else []
    args += ["--refresh-metrics-interval", interval]
    args.append("--metrics-name-filter" if name_filter == "on" else "--no-metrics-name-filter")
    sched = SchedulerProcess.start(fleet.endpoints_file, work, extra_args=args)
    try:
        time.sleep(2.0)  # every engine joined and scraped at least once
        pid = sched.process.pid
        n0, _, _ = scrapes(sched)
        c0, t0 = cpu_seconds([pid]), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds([pid]), time.monotonic()
        n1, effective, filtered = scrapes(sched)
    finally:
        sched.stop()
    wall = t1 - t0
    engines = len(fleet.engines)
    cpu_ms_per_s = (c1 - c0) * 1000 / wall
    return {
        "engines": engines,
        "budget_scrapes_per_s": budget,
        "name_filter": name_filter,
        "engines_filtered": int(filtered),
        "refresh_metrics_interval": interval,
        "scrape_interval_s": round(effective, 3),
        "scrapes_per_s": round((n1 - n0) / wall, 1),
        "cpu_ms_per_s": round(cpu_ms_per_s, 1),
        "cpu_ms_per_engine_per_s": round(cpu_ms_per_s / engines, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="4,16,64", help="pool sizes (comma list)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    p.add_argument("--budgets", default="default,100000", help="scrape budgets per second")
    p.add_argument(
        "--filters", default="on,off", help="name filter on/off, each case in this order"
    )
    p.add_argument(
        "--intervals", default="50ms", help="--refresh-metrics-interval values (comma list)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/scrape-cost.json"))
    args = p.parse_args()
    rows = []
    for n in (int(x) for x in args.engines.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"scrape-{n}-"))
        fleet = SimFleetProcess.start(count=n, block_size=16, profile="instant", work=work)
        try:
            for interval in args.intervals.split(","):
                for budget in args.budgets.split(","):
                    for name_filter in args.filters.split(","):
                        row = measure(fleet, work, budget, name_filter, args.seconds, interval)
                        print(row, flush=True)
                        rows.append(row)
        finally:
            fleet.stop()
    lines = [
        "| engines | scrape budget /s | name filter (engines using it) | configured interval | "
        "interval per engine | scrapes/s | scheduler CPU ms/s | per engine ms/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "200 (default)" if r["budget_scrapes_per_s"] == "default" else "none"
        lines.append(
            f"| {r['engines']} | {budget} | {r['name_filter']} ({r['engines_filtered']}) | "
            f"{r['refresh_metrics_interval']} | {r['scrape_interval_s'] * 1000:.0f} ms | "
            f"{r['scrapes_per_s']} | {r['cpu_ms_per_s']} | {r['cpu_ms_per_engine_per_s']} |"
        )
    table = "\n".join(lines)
    print(table)
    write_report(
        args.out,
        "scrape-cost",
        "uv run python benchmarks/scrape_cost.py " + shlex.join(sys.argv[1:]),
        results=rows,
        table=table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
