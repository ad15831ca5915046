"""The deterministic tiny model, generated once per machine into the user cache."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from pathlib import Path

from llmd.vllm_cpu.install import VllmEnv, cache_root

BUILDER = Path(__file__).with_name("tiny_model_build.py")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def model_dir() -> Path:
    """Where the model lives; the name changes whenever the generator's source changes."""
    digest = hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:12]
    return cache_root() / "models" / f"tiny-llama-{digest}"


def ensure_tiny_model(env: VllmEnv) -> Path:
    """Return the model directory, generating it (with the vLLM env's torch) if missing."""
    target = model_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((target / name).is_file() for name in REQUIRED_FILES):
            return target
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(
            [str(env.python), str(BUILDER), "--out", str(staging)],
            check=True,
            capture_output=True,
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target
