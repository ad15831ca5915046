"""Peer routers in their own virtualenvs: SGLang's router and vLLM's router.

Each peer is a pinned PyPI package installed once per machine into
`~/.cache/llmd/peers/<package>-<version>/` (a stamp file marks a complete install; a broken one
is rebuilt), then started as a process in front of the same fleet the other targets get:

- `sglang-cache-aware`, `sglang-rr`: `sglang-router` (Rust router with a Python launcher),
  `--policy cache_aware` (its radix-tree prefix policy) or `round_robin`.
- `vllm-router`: vLLM's router, `--policy cache_aware`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmd.vllm_cpu.install import pip_index_args


@dataclass(frozen=True)
class Peer:
    package: str
    version: str
    module: str
    policy: str
    label: str
    preinstall: tuple[str, ...] = ()
    """Requirements installed with the package, pinned first (e.g. the CPU torch build)."""

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


PEERS: dict[str, Peer] = {
    "sglang-cache-aware": Peer(
        "sglang-router", "0.3.2", "sglang_router.launch_router", "cache_aware", "sglang-router"
    ),
    "sglang-rr": Peer(
        "sglang-router", "0.3.2", "sglang_router.launch_router", "round_robin", "sglang-router"
    ),
    "vllm-router": Peer(
        "vllm-router", "0.1.17", "vllm_router.launch_router", "cache_aware", "vllm-router"
    ),
}


class PeerError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("LLMD_CACHE_DIR") or str(Path.home() / ".cache" / "llmd")
    return Path(root) / "peers"


def ensure_env(peer: Peer) -> Path:
    """The peer's virtualenv (its python), installing it on first use."""
    env = cache_dir() / f"{peer.package}-{peer.version}"
    stamp = env / ".llmd-installed"
    python = env / "bin" / "python"
    if stamp.is_file() and python.is_file():
        return python
    if env.exists():
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {peer.pin} into {env} (once per machine)", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *peer.preinstall,
                peer.pin,
                *pip_index_args(),
            ],
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise PeerError(f"installing {peer.pin} failed: {exc}") from None
    stamp.write_text(peer.pin + "\n")
    return python


@contextlib.contextmanager
def running(
    name: str, worker_urls: Sequence[str], port: int, log_path: Path, timeout_s: float = 60.0
) -> Iterator[str]:
    """Start peer `name` over `worker_urls` on `port`; yield its base URL; stop it after."""
    peer = PEERS[name]
    python = ensure_env(peer)
    cmd = [
        str(python), "-m", peer.module, "--host", "127.0.0.1", "--port", str(port),
        "--policy", peer.policy, "--worker-urls", *worker_urls,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise PeerError(
                    f"{name} exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                )
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"{name} not healthy after {timeout_s:.0f}s; log {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
