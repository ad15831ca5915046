"""llmd-sim's command line: help, profiles, configuration errors, a slow start."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmd.sim.cli import build_parser, config_from_args, main
from llmd.sim.fleet import fleet_configs

from .conftest import StartFleet


def test_help_documents_vllm_and_simulator_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmd.sim.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--block-size", "--num-gpu-blocks-override", "--max-num-seqs", "--max-num-batched-tokens",
        "--kv-events-config", "--kv-transfer-config", "--enable-lora", "--count", "--profile",
        "--speed", "--noise", "--error-rate", "--drop-events-rate", "--crash-after-requests",
        "--hang-after-requests", "--startup-delay", "/sim/faults",
    ):  # fmt: skip
        assert flag in out, flag


def test_list_profiles_describes_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("h100-8b", "h100-32b-tp2", "cpu-tiny", "instant"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--profile", "a100-nope"], "unknown profile"),
        (["--kv-transfer-config", "{not json"], "kv_transfer_config"),
        (["--kv-transfer-config", '{"kv_connector":"NixlConnector"}'], "kv_role is required"),
        (["--error-rate", "2"], "faults.error_rate"),
        (["--lora-modules", "a=/x"], "enable_lora"),
        (["--latency", "prefill_token_s"], "KEY=VALUE"),
    ],
)
def test_bad_configuration_is_refused_with_the_field(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_yaml_config_is_overridden_by_flags(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("block_size: 32\nmax_num_seqs: 7\nfaults: {error_rate: 0.5}\n")
    args = build_parser().parse_args(["--config", str(path), "--max-num-seqs", "9"])
    cfg = config_from_args(args)
    assert (cfg.block_size, cfg.max_num_seqs, cfg.faults.error_rate) == (32, 9, 0.5)


def test_fleet_shifts_every_port_and_names_pods() -> None:
    args = build_parser().parse_args(
        [
            "--port", "9000", "--side-channel-port", "5600", "--kv-events-config",
            '{"enable_kv_cache_events":true,"endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5657"}',
        ]
    )  # fmt: skip
    configs = fleet_configs(config_from_args(args), 3)
    assert [c.port for c in configs] == [9000, 9001, 9002]
    assert [c.side_channel_port for c in configs] == [5600, 5601, 5602]
    events = [c.kv_events_config for c in configs]
    assert [e.endpoint for e in events if e] == ["tcp://*:5557", "tcp://*:5558", "tcp://*:5559"]
    assert [e.topic for e in events if e] == ["kv@sim-0@tiny", "kv@sim-1@tiny", "kv@sim-2@tiny"]


@pytest.mark.integration
async def test_slow_start_keeps_the_port_closed(start_fleet: StartFleet) -> None:
    t0 = time.monotonic()
    fleet = await start_fleet(faults={"startup_delay_s": 0.5})
    assert time.monotonic() - t0 >= 0.5
    assert fleet.servers[0].bound_port
