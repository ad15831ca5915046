"""llm-d's published EndpointPickerConfigs (tests/compat/llm-d, sources in SOURCES.md) load,
or are rejected with messages that name the feature llmd lacks: never a traceback, never a
complaint about a parameter llm-d accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core

CORPUS = Path(__file__).parent / "compat" / "llm-d"
EXPECTED: dict[str, object] = yaml.safe_load((CORPUS / "expected.yaml").read_text())
FEATURE = re.compile(r"\(missing feature: (.+)\)$")


def test_every_corpus_file_has_an_expectation() -> None:
    files = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.yaml")} - {
        "expected.yaml",
        "dashboards.yaml",
    }
    assert files == set(EXPECTED), "add new corpus files to expected.yaml (and SOURCES.md)"
    sources = (CORPUS / "SOURCES.md").read_text()
    assert all(f"| {name} |" in sources for name in files)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_config(name: str) -> None:
    text = (CORPUS / name).read_text()
    expected = EXPECTED[name]
    if expected == "loads":
        core = build_core(text, allow_experimental=True)
        assert core.built.profiles, name
        return
    with pytest.raises(ConfigError) as exc:
        build_core(text, allow_experimental=True)
    messages = [i.message for i in exc.value.issues]
    assert isinstance(expected, dict)
    if "missing" in expected:
        features = {m.group(1) for m in map(FEATURE.search, messages) if m}
        assert features == set(expected["missing"]), messages
        # every problem reported names the missing feature: nothing else is wrong
        assert all(FEATURE.search(m) for m in messages), messages
    else:
        assert any("not an EndpointPickerConfig key" in m for m in messages), messages


def test_corpus_counts_are_what_the_docs_say() -> None:
    loads = sum(1 for v in EXPECTED.values() if v == "loads")
    missing = sum(1 for v in EXPECTED.values() if isinstance(v, dict) and "missing" in v)
    invalid = sum(1 for v in EXPECTED.values() if isinstance(v, dict) and "invalid" in v)
    doc = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"{loads} load, {missing} are rejected naming a missing feature, {invalid}" in doc
