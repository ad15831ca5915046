"""A real Prometheus server for tests and the local stack: Debian's `prometheus` package,
installed with apt-get when missing (as root), run with a generated config that scrapes the
given targets every second, its data in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import yaml


class PrometheusStartError(RuntimeError):
    """Prometheus could not be installed or did not become ready; the message says why."""


def prometheus_binary() -> str:
    """The `prometheus` executable, installed with apt-get (Debian's package) when missing."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise PrometheusStartError("prometheus is not installed and this is not root: apt-get "
                                   "install prometheus")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise PrometheusStartError(f"apt-get install prometheus failed: {r.stderr[-1500:]}")
    # the package's own service is not wanted here (and cannot run without systemd anyway)
    return shutil.which("prometheus") or "/usr/bin/prometheus"


class PrometheusProcess:
    """`prometheus` scraping `targets` (host:port, /metrics) every `interval_s`."""

    def __init__(
        self, targets: Sequence[str], port: int, workdir: Path, interval_s: float = 1.0
    ) -> None:
        self.targets = list(targets)
        self.port = port
        self.workdir = workdir
        self.interval_s = interval_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> PrometheusProcess:
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        interval = f"{max(1, round(self.interval_s * 1000))}ms"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": interval, "scrape_timeout": interval},
                    "scrape_configs": [
                        {"job_name": "engines", "static_configs": [{"targets": self.targets}]}
                    ],
                }
            )
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusStartError(
                    f"prometheus exited ({self.process.returncode}): "
                    f"{self.log_path.read_text()[-1500:]}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusStartError(f"prometheus not ready after {timeout_s:.0f}s")

    def targets_up(self) -> int:
        """How many targets Prometheus has scraped successfully (up == 1)."""
        doc = httpx.get(f"{self.url}/api/v1/query", params={"query": "up"}, timeout=5).json()
        return sum(1 for r in doc["data"]["result"] if r["value"][1] == "1")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
