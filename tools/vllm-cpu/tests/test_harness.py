"""The vLLM harness's own logic: cache location, rebuild decisions, server command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmd.vllm_cpu import install
from llmd.vllm_cpu.install import VllmEnv, cache_root, fingerprint
from llmd.vllm_cpu.server import ENGINE_SITE, VllmServerSpec, new_server, nixl_server_spec


def test_cache_root_follows_llmd_cache_dir_then_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMD_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("LLMD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "llmd"


def test_an_environment_is_current_only_with_a_matching_stamp(tmp_path: Path) -> None:
    root = tmp_path / "env"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").touch()
    assert not install._is_current(root)  # half-built: no stamp yet
    (root / install.STAMP_NAME).write_text(json.dumps({"fingerprint": "old"}))
    assert not install._is_current(root)  # outdated recipe
    (root / install.STAMP_NAME).write_text(json.dumps({"fingerprint": fingerprint()}))
    assert install._is_current(root)
    (root / install.STAMP_NAME).write_text("{broken")
    assert not install._is_current(root)


def test_server_command_enables_events_caching_and_cpu_settings(tmp_path: Path) -> None:
    spec = VllmServerSpec(pod="vllm-a", model_dir=tmp_path, cpu_core=1, extra_args=["--seed", "1"])
    server = new_server(spec, tmp_path)
    cmd = server.command(VllmEnv(tmp_path / "env"))
    assert cmd[:3] == [
        str(tmp_path / "env" / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    for flag in ("--enable-prefix-caching", "--enforce-eager", "--enable-prompt-tokens-details"):
        assert flag in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[cmd.index("--block-size") + 1] == "32"
    events = json.loads(cmd[cmd.index("--kv-events-config") + 1])
    assert events["topic"] == "kv@vllm-a@tiny"
    assert events["endpoint"] == f"tcp://*:{server.kv_events_port}"
    assert events["replay_endpoint"] == f"tcp://*:{server.replay_port}"
    assert cmd[-2:] == ["--seed", "1"]
    env = server.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert len({server.port, server.kv_events_port, server.replay_port}) == 3


def test_servers_get_the_engine_site_with_short_queue_spins_and_nixl_delays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    plain = new_server(VllmServerSpec(pod="a", model_dir=tmp_path), tmp_path).environment()
    assert plain["LLMD_VLLM_SHM_SPIN_S"] == "0.001"
    assert plain["LLMD_VLLM_SHM_RECHECK_MS"] == "10"
    assert "LLMD_NIXL_PROGRESS_DELAY_US" not in plain
    assert plain["PYTHONPATH"] == f"{ENGINE_SITE}{os.pathsep}/elsewhere"
    shipped = VllmServerSpec(pod="b", model_dir=tmp_path, shm_spin_s=None, shm_recheck_ms=None)
    env = new_server(shipped, tmp_path).environment()
    assert "LLMD_VLLM_SHM_SPIN_S" not in env
    assert "LLMD_VLLM_SHM_RECHECK_MS" not in env
    assert env["PYTHONPATH"] == "/elsewhere"
    nixl = new_server(nixl_server_spec("c", tmp_path, "kv_producer"), tmp_path).environment()
    assert nixl["LLMD_NIXL_PROGRESS_DELAY_US"] == "1000"
    assert nixl["UCX_TLS"] == "tcp"
    assert nixl["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_SITE)


STAND_IN = """
SHM_READER_RECHECK_INTERVAL_MS = 5000

class SpinCondition:
    def __init__(self, is_reader, context, notify_address, busy_loop_s: float = 1):
        self.is_reader = is_reader
        self.busy_loop_s = busy_loop_s if is_reader else 0
"""

PROBE = """
from vllm.distributed.device_communicators import shm_broadcast as m
SpinCondition = m.SpinCondition
print(SpinCondition(True, None, "x").busy_loop_s, SpinCondition(False, None, "x").busy_loop_s,
      m.SHM_READER_RECHECK_INTERVAL_MS)
"""


def _run_with_site(
    tmp_path: Path, spin: str | None, recheck: str | None = None
) -> subprocess.CompletedProcess[str]:
    pkg = tmp_path / "vllm" / "distributed" / "device_communicators"
    pkg.mkdir(parents=True, exist_ok=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").touch()
    (pkg / "shm_broadcast.py").write_text(STAND_IN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMD_")}
    env["PYTHONPATH"] = os.pathsep.join((str(ENGINE_SITE), str(tmp_path)))
    if spin is not None:
        env["LLMD_VLLM_SHM_SPIN_S"] = spin
    if recheck is not None:
        env["LLMD_VLLM_SHM_RECHECK_MS"] = recheck
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )


def test_the_engine_site_shortens_the_spin_of_queue_readers_only(tmp_path: Path) -> None:
    assert _run_with_site(tmp_path, "0.001", "10").stdout.split() == ["0.001", "0", "10"]
    assert _run_with_site(tmp_path, "0.001").stdout.split() == ["0.001", "0", "5000"]
    assert _run_with_site(tmp_path, None).stdout.split() == ["1", "0", "5000"]  # as shipped


def test_a_bad_spin_setting_is_reported_and_changes_nothing(tmp_path: Path) -> None:
    done = _run_with_site(tmp_path, "soon", "0")
    assert done.stdout.split() == ["1", "0", "5000"]
    assert "LLMD_VLLM_SHM_SPIN_S='soon' is not a number of seconds >= 0" in done.stderr
    assert "LLMD_VLLM_SHM_RECHECK_MS='0' is not a whole number of milliseconds >= 1" in done.stderr


@pytest.mark.vllm
def test_the_engine_site_reaches_vllms_own_queue_readers(vllm_env: VllmEnv) -> None:
    """Against vLLM 0.32 itself: its reader class still takes the setting (a renamed class or
    attribute would make the harness's engines spin for 1 s again, unnoticed)."""
    probe = (
        "import zmq\n"
        "from vllm.distributed.device_communicators import shm_broadcast as m\n"
        "c = m.SpinCondition(True, zmq.Context(), 'inproc://llmd-probe')\n"
        "print(c.busy_loop_s, m.MessageQueue.ReadTimeoutWithWarnings(None, False).timeout_ms())\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ENGINE_SITE),
        "LLMD_VLLM_SHM_SPIN_S": "0.002",
        "LLMD_VLLM_SHM_RECHECK_MS": "7",
    }
    done = subprocess.run(
        [str(vllm_env.python), "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0.002", "7"]
    assert "engine_site" not in done.stderr
