from __future__ import annotations

import pytest

from llmd.activator.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pool: required"),
        (["--pool", "p", "--cluster", "kubernetes"], "selector: required with cluster=kubernetes"),
        (["--pool", "p", "--max-queued", "0"], "max_queued"),
        (["--pool", "p", "--hold-timeout=-1s"], "hold_timeout"),
        (["--pool", "p", "--cluster", "nomad"], "cluster"),
    ],
)
def test_bad_settings_exit_2_naming_them(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--check-config", *args]) == 2
    assert message in capsys.readouterr().err


def test_check_config_says_what_it_would_run(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--pool", "llama", "--scale-to-zero", "--scale-down-delay", "10m",
            "--upstream-url", "http://10.0.0.1:8000"]  # fmt: skip
    assert main(["--check-config", *args]) == 0
    out = capsys.readouterr().out
    assert "pool llama (local), forwarding to http://10.0.0.1:8000" in out
    assert "scale to zero after 600s idle" in out
