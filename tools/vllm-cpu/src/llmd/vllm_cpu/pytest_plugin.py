"""pytest fixtures that provide real vLLM servers (registered through the pytest11 entry point).

Servers are session-scoped: they start on first use (several at once when asked together) and
stop when the session ends. If the vLLM environment cannot be built, tests that need it are
skipped with a loud reason, except under CI (CI=true) where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmd.vllm_cpu.install import VllmEnv, ensure_vllm_env
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, start_servers
from llmd.vllm_cpu.tiny_model import ensure_tiny_model


class VllmFleet:
    """Lazily started, session-wide real vLLM servers, addressed by pod name."""

    def __init__(self, env: VllmEnv, model_dir: Path, log_dir: Path) -> None:
        self.env = env
        self.model_dir = model_dir
        self.log_dir = log_dir
        self._servers: dict[str, VllmServer] = {}

    def get(self, *pods: str) -> list[VllmServer]:
        """The servers named `pods`, starting (together) those not running yet."""
        missing = [p for p in dict.fromkeys(pods) if p not in self._servers]
        if missing:
            cores = os.cpu_count() or 1
            specs = [
                VllmServerSpec(
                    pod=pod, model_dir=self.model_dir, cpu_core=(len(self._servers) + i) % cores
                )
                for i, pod in enumerate(missing)
            ]
            for server in start_servers(self.env, specs, self.log_dir):
                self._servers[server.spec.pod] = server
        return [self._servers[p] for p in pods]

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


def _unavailable(reason: str) -> None:
    message = f"REAL vLLM UNAVAILABLE, vllm-marked tests cannot run: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    """The vLLM 0.32 CPU virtualenv (built on first use, cached per machine)."""
    try:
        return ensure_vllm_env()
    except (subprocess.CalledProcessError, OSError) as exc:
        _unavailable(f"building the vLLM environment failed: {exc}")
        raise  # unreachable: _unavailable raises


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_env: VllmEnv) -> Path:
    """The deterministic tiny Llama + tokenizer directory."""
    return ensure_tiny_model(vllm_env)


@pytest.fixture(scope="session")
def vllm_fleet(
    vllm_env: VllmEnv, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmFleet]:
    fleet = VllmFleet(vllm_env, tiny_model_dir, tmp_path_factory.mktemp("vllm-logs"))
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="session")
def vllm_server(vllm_fleet: VllmFleet) -> VllmServer:
    """One real vLLM server shared by the session."""
    (server,) = vllm_fleet.get("vllm-a")
    return server
