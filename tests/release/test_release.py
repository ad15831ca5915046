"""Independent releases: every package's version, changelog and llmd pins agree, a release is
refused with the reason when they do not, and every package's wheel installs alone into a fresh
virtualenv (its llmd dependencies from their own wheels, nothing from the monorepo) and works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmd.dev.images import repo_root
from llmd.dev.release import MEMBERS, ReleaseError, build_dist, check, packages, release

ROOT = repo_root()
UV = str(ROOT / ".tools" / "bin" / "uv") if (ROOT / ".tools" / "bin" / "uv").is_file() else "uv"
MODULES = {
    "llmd-protocol": "llmd.protocol",
    "llmd-runtime": "llmd.runtime",
    "llmd-kvcache": "llmd.kvcache",
    "llmd-vllm-cpu": "llmd.vllm_cpu",
    "llmd-sim": "llmd.sim",
    "llmd-dev": "llmd.dev",
    "llmd-scheduler": "llmd.scheduler",
    "llmd-indexer": "llmd.indexer",
    "llmd-autoscaler": "llmd.autoscaler",
    "llmd-activator": "llmd.activator",
    "llmd-sidecar": "llmd.sidecar",
    "llmd-bench": "llmd.bench",
}
SCRIPTS = {
    "llmd-scheduler": "llmd-scheduler",
    "llmd-indexer": "llmd-indexer",
    "llmd-autoscaler": "llmd-autoscaler",
    "llmd-activator": "llmd-activator",
    "llmd-sidecar": "llmd-sidecar",
    "llmd-sim": "llmd-sim",
}


def test_versions_changelogs_and_pins_agree() -> None:
    assert check() == []
    pkgs = packages()
    assert set(pkgs) == set(MODULES)
    assert pkgs["llmd-scheduler"].pins["llmd-runtime"] == pkgs["llmd-runtime"].version


def copy_metadata(tmp: Path) -> Path:
    """A tree with each member's pyproject.toml and CHANGELOG.md (what the checks read)."""
    for member in MEMBERS:
        (tmp / member).mkdir(parents=True)
        for name in ("pyproject.toml", "CHANGELOG.md"):
            shutil.copy2(ROOT / member / name, tmp / member / name)
    return tmp


def test_a_release_is_refused_with_the_reason(tmp_path: Path) -> None:
    root = copy_metadata(tmp_path)
    with pytest.raises(ReleaseError, match=r"bump it to 9\.9\.9"):
        release("llmd-runtime", "9.9.9", root=root, image=False, tag=False)
    with pytest.raises(ReleaseError, match="not a released package"):
        release("llmd-nothing", "0.1.0", root=root, image=False, tag=False)
    log = root / "libs" / "runtime" / "CHANGELOG.md"
    log.write_text(log.read_text().replace("## 0.1.0", "## 0.0.9"))
    with pytest.raises(ReleaseError, match=r"CHANGELOG.md has no '## 0.1.0' section"):
        release("llmd-runtime", "0.1.0", root=root, image=False, tag=False)
    sched = root / "services" / "scheduler" / "pyproject.toml"
    sched.write_text(sched.read_text().replace('"llmd-runtime==0.1.0"', '"llmd-runtime==0.0.1"'))
    problems = check(root)
    assert "llmd-scheduler: pins llmd-runtime==0.0.1 but the workspace has 0.1.0" in problems
    with pytest.raises(ReleaseError, match=r"pins llmd-runtime==0\.0\.1"):
        release("llmd-scheduler", "0.1.0", root=root, image=False, tag=False)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    files = build_dist(list(MODULES), out)
    assert len([f for f in files if f.suffix == ".whl"]) == len(MODULES)
    assert len([f for f in files if f.name.endswith(".tar.gz")]) == len(MODULES)
    return out


@pytest.fixture(scope="module")
def constraints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The third-party versions of uv.lock, so a fresh install resolves what was tested."""
    text = subprocess.run(
        [UV, "export", "--all-packages", "--frozen", "--no-dev", "--no-emit-workspace",
         "--no-hashes", "--no-header"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_wheel_installs_alone_and_imports(
    name: str, dist: Path, constraints: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([UV, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    version = packages()[name].version
    r = subprocess.run(
        [UV, "pip", "install", "-q", "--python", str(python), "--find-links", str(dist),
         "-c", str(constraints), f"{name}=={version}"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [str(python), "-c", f"import {MODULES[name]} as m; print(list(m.__path__))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(venv) in r.stdout, r.stdout  # this virtualenv's copy, not the monorepo's
    if name in SCRIPTS:
        r = subprocess.run(
            [str(venv / "bin" / SCRIPTS[name]), "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith(f"usage: {SCRIPTS[name]}")
