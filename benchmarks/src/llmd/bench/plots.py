"""PNG plots from a results folder of llmd-bench reports (one `<target>.json` per target).

- `ttft_vs_qps.png`: TTFT p50 and p90 per stage against the stage's offered request rate.
- `throughput_vs_qps.png`: output tokens/s per stage against the offered rate.
- `ttft_cdf.png`: the CDF of every request's TTFT, one line per target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_reports(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("version", "").startswith("0.2"):
            out[doc["run"].get("cid") or path.stem] = doc
    return out


def _stage_points(doc: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    stages = doc.get("llmd", {}).get("stages", {})
    rates = doc.get("llmd", {}).get("stage_rates") or [
        st.get("rate") or st.get("concurrency")
        for st in doc.get("scenario", {})
        .get("load", {})
        .get("native", {})
        .get("config", {})
        .get("stages", [])
    ]
    points = []
    for key, st in sorted(stages.items(), key=lambda kv: int(kv[0])):
        i = int(key)
        rate = rates[i] if i < len(rates) and rates[i] else float(i + 1)
        points.append((float(rate), st["aggregate"]))
    return points


def plot_folder(folder: Path) -> list[Path]:
    """Write the plots next to the reports; returns their paths."""
    reports = load_reports(folder)
    if not reports:
        raise ValueError(f"no llmd-bench reports in {folder}")
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for target, doc in reports.items():
        pts = _stage_points(doc)
        xs = [x for x, _ in pts]
        p50 = [a["latency"]["time_to_first_token"].get("p50") for _, a in pts]
        p90 = [a["latency"]["time_to_first_token"].get("p90") for _, a in pts]
        (line,) = ax.plot(xs, p50, marker="o", label=f"{target} p50")
        ax.plot(xs, p90, marker="x", linestyle="--", color=line.get_color(), label=f"{target} p90")
    ax.set(xlabel="offered load (requests/s)", ylabel="TTFT (s)", yscale="log")
    ax.set_title("TTFT vs offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, folder / "ttft_vs_qps.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for target, doc in reports.items():
        pts = _stage_points(doc)
        ax.plot(
            [x for x, _ in pts],
            [a["throughput"]["output_token_rate"]["mean"] for _, a in pts],
            marker="o",
            label=target,
        )
    ax.set(xlabel="offered load (requests/s)", ylabel="output tokens/s")
    ax.set_title("Output throughput vs offered load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "throughput_vs_qps.png"))

    cdfs = {t: sorted(d.get("llmd", {}).get("ttft_s", [])) for t, d in reports.items()}
    if any(cdfs.values()):  # reports from before llmd-bench recorded per-request TTFTs have none
        fig, ax = plt.subplots(figsize=(8, 5))
        for target, ttfts in cdfs.items():
            if ttfts:
                n = len(ttfts)
                ax.plot(ttfts, [(i + 1) / n for i in range(n)], label=target)
        ax.set(xlabel="TTFT (s)", ylabel="fraction of requests", xscale="log")
        ax.set_title("TTFT CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, folder / "ttft_cdf.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
