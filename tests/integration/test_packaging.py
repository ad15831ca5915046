"""Packaging truth: each distribution, installed alone from its own wheel into a fresh
virtualenv (its llmd dependencies from their wheels, the rest from the package index), imports
every one of its modules. A missing dependency declaration fails here, not on a user's machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(
    p.parent
    for pattern in ("libs/*/pyproject.toml", "services/*/pyproject.toml", "tools/*/pyproject.toml",
                    "benchmarks/pyproject.toml", "examples/*/pyproject.toml")
    for p in ROOT.glob(pattern)
)  # fmt: skip
NOT_IMPORTED_ALONE = {
    # runs with the separate vLLM virtualenv's interpreter (torch, transformers), never here
    "llmd.vllm_cpu.tiny_model_build",
    # loaded by pytest itself through the pytest11 entry point, only when pytest runs
    "llmd.vllm_cpu.pytest_plugin",
    # the FS tier's vLLM plugin runs inside vLLM's environment (torch, vllm); the real-vLLM
    # tier loads it there (tests/vllm/test_fs_offload_e2e.py)
    "llmd.fs_offload.spec",
    "llmd.fs_offload.connector",
    "llmd.fs_offload.torch_pages",
}


def _uv() -> str:
    found = ROOT / ".tools" / "bin" / "uv"
    return str(found) if found.exists() else shutil.which("uv") or "uv"


def _modules(folder: Path) -> list[str]:
    out = []
    for src in (folder / "src").glob("*"):
        for f in sorted(src.rglob("*.py")):
            parts = f.relative_to(folder / "src").with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            if name and name not in NOT_IMPORTED_ALONE:
                out.append(name)
    return out


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [_uv(), "build", "--all-packages", "--wheel", "-o", str(out), "-q"],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return out


@pytest.mark.parametrize("folder", FOLDERS, ids=[str(f.relative_to(ROOT)) for f in FOLDERS])
def test_distribution_installs_alone_and_imports_everything(
    folder: Path, wheels: Path, tmp_path: Path
) -> None:
    name = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    subprocess.run(
        [_uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env
    )
    python = venv / "bin" / "python"
    # every llmd distribution comes from this checkout's wheels, never from an index
    local = tmp_path / "local.txt"
    local.write_text(
        "".join(f"{w.name.split('-')[0].replace('_', '-')} @ {w.as_uri()}\n"
                for w in sorted(wheels.glob("*.whl")))
    )  # fmt: skip
    install = subprocess.run(
        [_uv(), "pip", "install", "-q", "--python", str(python), "--override", str(local), name],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    modules = _modules(folder)
    assert modules, f"{folder} has no modules"
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run(
        [str(python), "-c", script, *modules], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
