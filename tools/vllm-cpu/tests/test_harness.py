"""The vLLM harness's own logic: cache location, rebuild decisions, server command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmd.vllm_cpu import install
from llmd.vllm_cpu.install import VllmEnv, cache_root, fingerprint
from llmd.vllm_cpu.server import VllmServerSpec, new_server


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
