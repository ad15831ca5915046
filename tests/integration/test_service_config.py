"""Every llmd service reads one config model three ways: a YAML file (--config), LLMD_<SERVICE>_*
variables and flags. Each way starts the real service process, which serves on the ports it was
given and prints the same effective config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.sim.tokenizer import default_tokenizer_dir
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

Settings = dict[str, object]


def scheduler_settings(work: Path) -> tuple[Settings, str]:
    pool = work / "pool.yaml"
    pool.write_text("endpoints: []\n")
    return {
        "host": "127.0.0.1",
        "endpoints_file": str(pool),
        "grpc_port": free_port(),
        "grpc_health_port": free_port(),
        "metrics_port": free_port(),
        "refresh_metrics_interval": 0.2,
        "pool_name": "three-ways",
        "drain_timeout": 1.0,
    }, "metrics_port"


def indexer_settings(work: Path) -> tuple[Settings, str]:
    return {
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": free_port(),
        "tokenizer_dir": str(default_tokenizer_dir()),
        "block_size": 32,
        "hash_seed": "42",
        "speculative_ttl": 0.5,
        "drain_timeout": 1.0,
    }, "http_port"


def as_file(settings: Settings, work: Path) -> tuple[list[str], dict[str, str]]:
    path = work / "service.yaml"
    path.write_text(yaml.safe_dump(settings))
    return ["--config", str(path)], {}


def as_env(prefix: str) -> Callable[[Settings, Path], tuple[list[str], dict[str, str]]]:
    def build(settings: Settings, work: Path) -> tuple[list[str], dict[str, str]]:
        return [], {f"{prefix}{k.upper()}": str(v) for k, v in settings.items()}

    return build


def as_flags(settings: Settings, work: Path) -> tuple[list[str], dict[str, str]]:
    args: list[str] = []
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args, {}


SERVICES = {
    "llmd-scheduler": ("llmd.scheduler.cli", "LLMD_SCHEDULER_", scheduler_settings),
    "llmd-indexer": ("llmd.indexer.cli", "LLMD_INDEXER_", indexer_settings),
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_starts_identically_from_file_env_and_flags(service: str, tmp_path: Path) -> None:
    module, prefix, make = SERVICES[service]
    printed: dict[str, dict[str, object]] = {}
    for how, source in (("file", as_file), ("env", as_env(prefix)), ("flags", as_flags)):
        work = tmp_path / how
        work.mkdir()
        settings, http_key = make(work)
        args, extra_env = source(settings, work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)} | extra_env
        shown = subprocess.run(
            [sys.executable, "-m", module, *args, "--print-config"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        effective = yaml.safe_load(shown.stdout)
        for key, value in settings.items():
            assert effective[key] == value, (how, key)
        printed[how] = effective
        log = work / "service.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], env=env, stdout=out, stderr=out
            )
        try:
            url = f"http://127.0.0.1:{settings[http_key]}"
            deadline = time.monotonic() + 30
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = httpx.get(url + "/readyz", timeout=1)
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            assert ready is not None, log.read_text()
            assert ready.status_code == 200, log.read_text()
            metrics = httpx.get(url + "/metrics", timeout=2).text
            assert "llmd_readiness_check" in metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.read_text()
    assert printed["file"].keys() == printed["env"].keys() == printed["flags"].keys()
    ports = {"grpc_port", "grpc_health_port", "metrics_port", "http_port", "endpoints_file"}
    same = [{k: v for k, v in p.items() if k not in ports} for p in printed.values()]
    assert same[0] == same[1] == same[2]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_bad_settings_name_their_source_and_exit_2(service: str) -> None:
    module, prefix, _ = SERVICES[service]
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env[f"{prefix}GRPC_PORT"] = "not-a-port"
    done = subprocess.run(
        [sys.executable, "-m", module, "--drain-timeout", "soon", "--print-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "grpc_port: Input should be a valid integer" in done.stderr
    assert f"[{prefix}GRPC_PORT]" in done.stderr
    assert "drain_timeout" in done.stderr
    assert "[--drain-timeout]" in done.stderr
