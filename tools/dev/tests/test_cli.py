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
    for flag in ("--engine", "--count", "--block-size", "--duration"):
        assert flag in out


def test_status_says_plainly_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "not built yet" in out
    assert "real vLLM" in out


def test_simulated_engines_are_refused_until_they_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--engine", "sim"]) == 2
    assert "issue #3" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["up", "--count", "0"], ["up", "--block-size", "16"]])
def test_bad_arguments_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
