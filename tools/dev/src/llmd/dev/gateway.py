"""The gateway half of the local stack: llmd-scheduler and a real Envoy in front of it.

`Gateway.start(endpoints_file, work)` starts the scheduler as a process (static discovery on the
engines' file), waits until it is ready, generates the Envoy config and starts Envoy, then waits
until Envoy sees the scheduler healthy. Requests to `gateway.url` take the production path:
Envoy -> ext_proc -> scheduler -> Envoy ORIGINAL_DST -> the picked engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from llmd.dev.envoy import EnvoyProcess, EnvoySettings
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.vllm_cpu.server import free_port

READY_TIMEOUT_S = 60.0


class GatewayStartError(RuntimeError):
    """The scheduler or Envoy did not come up."""


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    resp = httpx.get(url, timeout=timeout)
    return resp.status_code, resp.content


@dataclass
class SchedulerProcess:
    """`llmd-scheduler` as a child process."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    health_port: int
    metrics_port: int
    log_path: Path
    debug_port: int = 0

    @property
    def url(self) -> str:
        """Health, readiness and /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def debug_url(self) -> str:
        """/debug/decisions, /debug/explain, /debug/plugins/state, /debug/hot-prompts (loopback
        only)."""
        return f"http://127.0.0.1:{self.debug_port}"

    @classmethod
    def start(
        cls,
        endpoints_file: Path,
        work: Path,
        *,
        config_file: Path | None = None,
        extra_args: Sequence[str] = (),
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> SchedulerProcess:
        """Start the scheduler (chosen ports, or free ones) and wait until it is ready."""
        grpc_port = grpc_port or free_port()
        metrics_port = metrics_port or free_port()
        health_port, debug_port = free_port(), free_port()
        log_path = work / "llmd-scheduler.log"
        cmd = [
            sys.executable, "-m", "llmd.scheduler.cli",
            "--endpoints-file", str(endpoints_file), "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
            "--metrics-port", str(metrics_port), "--drain-timeout", "5s",
            "--debug-port", str(debug_port),
        ]  # fmt: skip
        if config_file is not None:
            cmd += ["--config-file", str(config_file)]
        cmd += list(extra_args)
        env = {**os.environ, "LLMD_LOG_FORMAT": "json"}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sched = cls(proc, grpc_port, health_port, metrics_port, log_path, debug_port)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayStartError(
                    f"llmd-scheduler exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if _get(f"{sched.url}/readyz", 1.0)[0] == 200:
                    return sched
            time.sleep(0.1)
        sched.stop()
        raise GatewayStartError(f"llmd-scheduler not ready after {READY_TIMEOUT_S:.0f}s")

    def get_json(self, path: str) -> Any:
        base = self.debug_url if path.startswith("/debug/") else self.url
        status, body = _get(base + path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def metrics_text(self) -> str:
        return _get(self.url + "/metrics")[1].decode()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


@dataclass(frozen=True)
class GatewayTLS:
    """TLS between Envoy and the scheduler: the scheduler's certificate directory (`tls.crt`,
    `tls.key`, and `ca.crt` to require client certificates), the CA Envoy trusts, and Envoy's
    client certificate for mutual TLS."""

    cert_path: Path
    ca: Path
    server_name: str = "localhost"
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass
class Gateway:
    """Envoy on `listen_port` in front of an llmd-scheduler."""

    scheduler: SchedulerProcess
    envoy: EnvoyProcess
    restart_args: dict[str, Any] = field(default_factory=dict)
    """How the scheduler was started (`restart_scheduler` starts it the same way)."""

    @property
    def url(self) -> str:
        return self.envoy.url

    def restart_scheduler(self, down_s: float = 0.0) -> SchedulerProcess:
        """Stop the scheduler gracefully (SIGTERM: it drains), stay down `down_s`, and start it
        again on the same ports; Envoy keeps running and finds it by health checks."""
        self.scheduler.stop()
        time.sleep(down_s)
        self.scheduler = SchedulerProcess.start(
            grpc_port=self.scheduler.grpc_port,
            metrics_port=self.scheduler.metrics_port,
            **self.restart_args,
        )
        return self.scheduler

    @classmethod
    def start(
        cls,
        endpoints_file: Path,
        work: Path,
        *,
        listen_port: int | None = None,
        config_file: Path | None = None,
        fail_open: bool = False,
        scheduler_args: Sequence[str] = (),
        admin_port: int | None = None,
        scheduler_grpc_port: int | None = None,
        scheduler_metrics_port: int | None = None,
        envoy_overrides: dict[str, Any] | None = None,
        tls: GatewayTLS | None = None,
        scheduler_api: Literal["ext_proc", "ext_authz"] = "ext_proc",
    ) -> Gateway:
        """`tls`: the scheduler serves ext_proc over TLS from `tls.cert_path` and Envoy trusts
        `tls.ca` (with a client certificate when the scheduler requires one). `scheduler_api`
        `ext_authz`: Envoy asks the scheduler's HTTP check port instead of ext_proc."""
        work.mkdir(parents=True, exist_ok=True)
        authz_args: list[str] = []
        authz_settings: dict[str, Any] = {}
        if scheduler_api == "ext_authz":
            if tls is not None:
                raise ValueError("the ext_authz gateway path has no TLS to the scheduler")
            port = free_port()
            authz_args = ["--extauthz-port", str(port)]
            authz_settings = {"scheduler_api": "ext_authz", "extauthz_port": port}
        tls_args: list[str] = []
        tls_settings: dict[str, Any] = {}
        if tls is not None:
            tls_args = ["--secure-serving", "--cert-path", str(tls.cert_path)]
            tls_settings = {
                "extproc_tls_ca": str(tls.ca),
                "extproc_tls_server_name": tls.server_name,
                "extproc_tls_client_cert": str(tls.client_cert) if tls.client_cert else None,
                "extproc_tls_client_key": str(tls.client_key) if tls.client_key else None,
            }
        restart_args: dict[str, Any] = {
            "endpoints_file": endpoints_file,
            "work": work,
            "config_file": config_file,
            "extra_args": [*tls_args, *authz_args, *scheduler_args],
        }
        scheduler = SchedulerProcess.start(
            grpc_port=scheduler_grpc_port, metrics_port=scheduler_metrics_port, **restart_args
        )
        fallback = [(e.address, e.port) for e in StaticFileDiscovery(endpoints_file).load()]
        settings = EnvoySettings(
            listen_port=listen_port or free_port(),
            admin_port=admin_port or free_port(),
            extproc_port=scheduler.grpc_port,
            listen_address="127.0.0.1" if listen_port is None else "0.0.0.0",
            fail_open=fail_open,
            fallback_endpoints=fallback,
            **{**tls_settings, **authz_settings, **(envoy_overrides or {})},
        )
        envoy = EnvoyProcess(settings, work / "envoy")
        try:
            envoy.start()
            deadline = time.monotonic() + 20
            clusters = ["llmd_scheduler"] + (["llmd_scheduler_http"] if authz_args else [])
            while time.monotonic() < deadline:
                stats = envoy.stats("cluster.llmd_scheduler")
                if all(stats.get(f"cluster.{c}.health_check.healthy", 0) >= 1 for c in clusters):
                    break
                time.sleep(0.1)
            else:
                raise GatewayStartError("envoy never saw the scheduler healthy")
        except Exception:
            envoy.stop()
            scheduler.stop()
            raise
        return cls(scheduler, envoy, restart_args)

    def stop(self) -> None:
        self.envoy.stop()
        self.scheduler.stop()
