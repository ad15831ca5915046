"""llmd-dev's command line: help, status and argument errors (no engines started)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmd.dev.cli import main


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmd.dev.cli", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--engine", "--count", "--block-size", "--duration", "--profile"):
        assert flag in out


def test_status_says_plainly_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "not built yet" in out
    assert "llmd-sim" in out
    assert "real vLLM" in out


@pytest.mark.integration
def test_up_runs_simulated_engines_by_default_and_stops_cleanly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["up", "--count", "2", "--duration", "3"]) == 0
    out = capsys.readouterr().out
    assert "sim-0" in out
    assert "sim-1" in out
    assert "curl" in out
    assert "engines stopped" in out


@pytest.mark.parametrize(
    "argv", [["up", "--count", "0"], ["up", "--engine", "vllm", "--block-size", "16"]]
)
def test_bad_arguments_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
