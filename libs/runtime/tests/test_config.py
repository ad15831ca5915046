"""Typed config: YAML, env overrides and precise error paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from llmd.runtime.config import ConfigError, StrictModel, load_config, parse_duration


class Scrape(StrictModel):
    interval_ms: int = Field(50, gt=0)
    timeout_ms: int = 1000


class Service(StrictModel):
    name: str = "scheduler"
    port: int = Field(9002, ge=1, le=65535)
    scrape: Scrape = Scrape()
    tags: list[str] = []


def test_defaults_yaml_env_and_overrides_stack_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("port: 9100\nscrape:\n  interval_ms: 25\n")
    cfg = load_config(
        Service,
        path,
        env={"LLMD_SCRAPE__TIMEOUT_MS": "300", "LLMD_TAGS": "[a, b]", "OTHER": "x"},
        overrides={"name": "edge"},
    )
    assert cfg == Service(
        name="edge", port=9100, scrape=Scrape(interval_ms=25, timeout_ms=300), tags=["a", "b"]
    )


def test_every_bad_field_is_reported_with_its_path_and_source(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("port: 0\nscrape:\n  interval_ms: -5\n  intervalms: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Service, path, env={"LLMD_TAGS": "{a: 1}"})
    paths = {i.path for i in err.value.issues}
    assert paths == {"port", "scrape.interval_ms", "scrape.intervalms", "tags"}
    by_path = {i.path: i for i in err.value.issues}
    assert by_path["tags"].source == "LLMD_TAGS"
    assert by_path["port"].source == str(path)
    assert "4 problem(s)" in str(err.value)
    assert "scrape.intervalms: Extra inputs are not permitted" in str(err.value)


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("port: 1\nscrape: [\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(Service, path, env={})


@pytest.mark.parametrize(
    ("content", "message"), [("- 1\n- 2\n", "must hold a mapping"), (b"\xff\xfe", "UTF-8")]
)
def test_unusable_files_are_rejected(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(Service, path, env={})


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Service, tmp_path / "nope.yaml", env={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Service, empty, env={}) == Service()


def test_text_fields_take_variables_as_written() -> None:
    cfg = load_config(Service, env={"LLMD_NAME": "[1, 2]", "LLMD_PORT": "0123"})
    assert cfg.name == "[1, 2]"
    assert cfg.port == 123


def test_durations_read_units_and_reject_nonsense() -> None:
    assert parse_duration("50ms") == 0.05
    assert parse_duration("2m") == 120.0
    assert parse_duration(3) == 3.0
    for bad in ("soon", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)  # type: ignore[arg-type]
