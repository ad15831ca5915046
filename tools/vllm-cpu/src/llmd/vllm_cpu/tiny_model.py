"""The deterministic tiny model, generated once per machine into the user cache."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from llmd.vllm_cpu.install import VllmEnv, cache_root

BUILDER = Path(__file__).with_name("tiny_model_build.py")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def builder_digest() -> str:
    """Changes whenever the generator's source changes (names the cached outputs)."""
    return hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:12]


def model_dir() -> Path:
    """Where the model lives; the name changes whenever the generator's source changes."""
    return cache_root() / "models" / f"tiny-llama-{builder_digest()}"


def build_cached(target: Path, required: Sequence[str], build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging_dir)` unless every `required` file is there already.

    A file lock serialises concurrent builders (test workers, several tools) and the staging
    directory is renamed into place only when complete, so a crash never leaves half a build.
    """
    if all((target / name).is_file() for name in required):
        return target  # complete (renamed into place whole): no lock, so read-only caches work
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((target / name).is_file() for name in required):
            return target
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def ensure_tiny_model(env: VllmEnv) -> Path:
    """Return the model directory, generating it (with the vLLM env's torch) if missing."""

    def build(staging: Path) -> None:
        subprocess.run(
            [str(env.python), str(BUILDER), "--out", str(staging)],
            check=True,
            capture_output=True,
        )

    return build_cached(model_dir(), REQUIRED_FILES, build)
