"""A fleet of simulated engines for the local stack: one `llmd-sim --count N` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmd.dev.monitor import EngineAddress
from llmd.vllm_cpu.server import free_port, port_is_free

READY_TIMEOUT_S = 60.0


class SimStartError(RuntimeError):
    """llmd-sim exited or did not report ready in time."""


def free_run(count: int) -> int:
    """A base port with `count` free consecutive ports after it (best effort, loopback), from
    `free_port`, which looks below the ephemeral range first: after a load test, tens of
    thousands of client connections sit in TIME_WAIT there and a run is rarely whole."""
    for _ in range(100):
        base = free_port()
        if base + count < 65536 and all(
            port_is_free(p, reuse_address=True)  # the engines bind with SO_REUSEADDR
            for p in range(base, base + count)
        ):
            return base
    raise SimStartError(f"no run of {count} free ports found")


@dataclass
class SimFleetProcess:
    """The process, its engines' addresses and its discovery file."""

    process: subprocess.Popen[bytes]
    engines: list[EngineAddress]
    endpoints_file: Path
    log_path: Path

    @classmethod
    def start(
        cls,
        *,
        count: int,
        block_size: int,
        profile: str,
        work: Path,
        extra_args: Sequence[str] = (),
    ) -> SimFleetProcess:
        # One run for all four port kinds: separate probes could hand out overlapping runs,
        # since a probed port is released before the next probe.
        base = free_run(4 * count)
        http, events, replay, side = (base + k * count for k in range(4))
        endpoints_file = work / "endpoints.yaml"
        log_path = work / "llmd-sim.log"
        cmd = [
            sys.executable, "-m", "llmd.sim.cli",
            "--count", str(count), "--port", str(http), "--served-model-name", "tiny",
            "--block-size", str(block_size), "--profile", profile,
            "--enable-prompt-tokens-details", "--side-channel-port", str(side),
            "--kv-events-config", json.dumps({
                "enable_kv_cache_events": True,
                "endpoint": f"tcp://*:{events}",
                "replay_endpoint": f"tcp://*:{replay}",
            }),
            "--fleet-file", str(endpoints_file), *extra_args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SimStartError(
                    f"llmd-sim exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                )
            if endpoints_file.is_file() and "ready" in log_path.read_text():
                break
            time.sleep(0.1)
        else:
            proc.kill()
            raise SimStartError(f"llmd-sim not ready after {READY_TIMEOUT_S:.0f}s; log {log_path}")
        doc = yaml.safe_load(endpoints_file.read_text())
        engines = [
            EngineAddress(
                e["name"],
                f"http://{e['address']}:{e['port']}",
                e["labels"]["llmd.ai/kv-events-endpoint"],
            )
            for e in doc["endpoints"]
        ]
        return cls(proc, engines, endpoints_file, log_path)

    @classmethod
    def start_pd(
        cls, role: str, work: Path, profile: str = "h100-8b", *, ec_consumer: bool = False
    ) -> SimFleetProcess:
        """One engine with vLLM's NixlConnector in `role` (kv_producer for a prefill engine,
        kv_consumer for a decode one, kv_both), its work files under `work/role`; with
        `ec_consumer`, it also reads encoder outputs that requests' ec_transfer_params name."""
        sub = work / role
        sub.mkdir(parents=True, exist_ok=True)
        transfer = {"kv_connector": "NixlConnector", "kv_role": role}
        args = ["--kv-transfer-config", json.dumps(transfer)]
        if ec_consumer:
            ec = {"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer"}
            args += ["--ec-transfer-config", json.dumps(ec)]
        return cls.start(count=1, block_size=16, profile=profile, work=sub, extra_args=args)

    @classmethod
    def start_encoders(
        cls, work: Path, count: int = 1, profile: str = "h100-8b"
    ) -> SimFleetProcess:
        """`count` encode engines (an EC producer each: multimodal items answered with
        ec_transfer_params), their work files under `work/encode`."""
        sub = work / "encode"
        sub.mkdir(parents=True, exist_ok=True)
        ec = {"ec_connector": "ECExampleConnector", "ec_role": "ec_producer"}
        return cls.start(
            count=count, block_size=16, profile=profile, work=sub,
            extra_args=["--ec-transfer-config", json.dumps(ec)],
        )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
