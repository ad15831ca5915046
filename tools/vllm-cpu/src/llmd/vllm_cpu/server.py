"""Start and stop real vLLM 0.32 CPU servers as processes (for tests and local runs).

Each server gets unique ports (HTTP, KV-event PUB, replay ROUTER), prefix caching, ZMQ KV events
on topic `kv@<pod>@<model>`, `cached_tokens` in usage, float32 and eager mode (the settings that
work on these CPUs, see the package README), and its own CPU core for OpenMP.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmd.protocol.kv_events import format_topic
from llmd.vllm_cpu.install import VllmEnv

DEFAULT_BLOCK_SIZE = 32  # vLLM's CPU backend needs a multiple of 32
DEFAULT_MAX_MODEL_LEN = 4096
STARTUP_TIMEOUT_S = 420.0
NIXL_PROGRESS_DELAY_US = 1000
"""The poll delay given to NIXL's progress thread (see `engine_site/sitecustomize.py`)."""
SHM_SPIN_S = 0.001
"""How long the readers of vLLM's shared-memory queues spin after a read before they sleep
(vLLM: 1 s; see `engine_site/sitecustomize.py`)."""
SHM_RECHECK_MS = 10
"""How long a sleeping reader of those queues waits for a notify before it looks anyway (vLLM:
5 s, its bound on a lost notify)."""
ENGINE_SITE = Path(__file__).parent / "engine_site"


_PORTS_FROM = 20000
_rng = random.SystemRandom()
_handed_out: collections.deque[int] = collections.deque(maxlen=4096)
"""Ports this process returned lately: not returned again while their server may be starting."""


def ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral port range (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_is_free(port: int, *, reuse_address: bool = False) -> bool:
    """Whether a server could listen on `port` on loopback now (and no wildcard listener has it).
    With `reuse_address`, as a server setting SO_REUSEADDR would: old connections in TIME_WAIT
    on the port do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """An unused TCP port on loopback, for a server about to be started.

    Taken at random below the kernel's ephemeral range when there is room: a port in that range
    can be handed to some outgoing connection between this check and the server's bind (a test
    suite or a load test makes thousands), and the server then fails with "address already in
    use". A race with other callers of this function remains, as with any such helper."""
    low = ephemeral_low()
    if low > _PORTS_FROM + 1000:
        for _ in range(100):
            port = _rng.randrange(_PORTS_FROM, low)
            if port not in _handed_out and port_is_free(port):
                _handed_out.append(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


class VllmStartError(RuntimeError):
    """A vLLM server exited or did not become healthy in time."""


@dataclass
class VllmServerSpec:
    """How to start one server."""

    pod: str
    model_dir: Path
    served_model_name: str = "tiny"
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kv_cache_gib: int = 1
    hash_algo: str = "sha256"
    cpu_core: int | None = None
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    """Scheduling niceness of the server's processes (benchmarks raise it so that engines
    sharing cores with the router do not starve it, as they do not share in a cluster)."""
    shm_spin_s: float | None = SHM_SPIN_S
    """Spin time of vLLM's shared-memory queue readers after a read; None leaves vLLM's 1 s."""
    shm_recheck_ms: int | None = SHM_RECHECK_MS
    """A sleeping reader's wait for a notify before it looks anyway; None leaves vLLM's 5 s."""
    nixl_progress_delay_us: int = 0
    """Poll delay of NIXL's progress thread; 0 leaves NIXL's (a busy loop)."""


@dataclass
class VllmServer:
    """A running vLLM server process and its addresses."""

    spec: VllmServerSpec
    port: int
    kv_events_port: int
    replay_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    @property
    def topic(self) -> str:
        return format_topic(self.spec.pod, self.spec.served_model_name)

    def command(self, env: VllmEnv) -> list[str]:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.kv_events_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": self.topic,
        }
        s = self.spec
        return [
            *env.server_command(),
            "--model",
            str(s.model_dir),
            "--served-model-name",
            s.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(s.max_model_len),
            "--block-size",
            str(s.block_size),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo",
            s.hash_algo,
            "--enforce-eager",
            "--enable-prompt-tokens-details",
            "--kv-events-config",
            json.dumps(events),
            *s.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.spec.kv_cache_gib)
        if self.spec.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.spec.cpu_core)
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        site: dict[str, str] = {}
        if self.spec.shm_spin_s is not None:
            site["LLMD_VLLM_SHM_SPIN_S"] = repr(float(self.spec.shm_spin_s))
        if self.spec.shm_recheck_ms is not None:
            site["LLMD_VLLM_SHM_RECHECK_MS"] = str(self.spec.shm_recheck_ms)
        if self.spec.nixl_progress_delay_us > 0:
            site["LLMD_NIXL_PROGRESS_DELAY_US"] = str(self.spec.nixl_progress_delay_us)
        if site:
            site["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ENGINE_SITE), env.get("PYTHONPATH", "")) if p
            )
            env.update(site)
        env.update(self.spec.env)
        return env

    def start(self, env: VllmEnv) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            nice = ["nice", "-n", str(self.spec.nice)] if self.spec.nice else []
            self.process = subprocess.Popen(
                [*nice, *self.command(env)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # so stop() can signal vLLM's engine-core child too
            )

    def cpu_seconds(self) -> float:
        """CPU time used so far by every process of this server (API server, engine core,
        worker: they share the session it was started in)."""
        if self.process is None:
            return 0.0
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended while we looked
            if int(fields[3]) == self.process.pid:  # stat field 6: the session id
                ticks += int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Block until /health answers 200; VllmStartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise VllmStartError(
                        f"vLLM {self.spec.pod} exited with {self.process.returncode}; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(1.0)
        raise VllmStartError(
            f"vLLM {self.spec.pod} not healthy after {timeout_s:.0f}s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def nixl_server_spec(
    pod: str,
    model_dir: Path,
    role: str,
    *,
    cpu_core: int | None = None,
    progress_delay_us: int = NIXL_PROGRESS_DELAY_US,
    shm_spin_s: float | None = SHM_SPIN_S,
    shm_recheck_ms: int | None = SHM_RECHECK_MS,
) -> VllmServerSpec:
    """A server with vLLM's NixlConnector in `role` (`kv_producer` for a prefill engine,
    `kv_consumer` for a decode engine): KV in CPU memory, moved by UCX over TCP, the NIXL side
    channel on loopback at a port of its own.

    NIXL's progress thread gets a poll delay (`engine_site`): as NIXL 1.5.1 starts it, it polls
    without sleeping and takes a whole core even when the engine is idle. `progress_delay_us`
    0 leaves NIXL as it is; `shm_spin_s` and `shm_recheck_ms` None leave vLLM's queue readers
    as vLLM ships them (1 s spin, 5 s recheck)."""
    transfer = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    env = {
        "UCX_TLS": "tcp",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
    }
    return VllmServerSpec(
        pod=pod,
        model_dir=model_dir,
        cpu_core=cpu_core,
        extra_args=("--kv-transfer-config", json.dumps(transfer)),
        env=env,
        shm_spin_s=shm_spin_s,
        shm_recheck_ms=shm_recheck_ms,
        nixl_progress_delay_us=progress_delay_us,
    )


def new_server(spec: VllmServerSpec, log_dir: Path) -> VllmServer:
    """A server with fresh ports (not started)."""
    return VllmServer(
        spec=spec,
        port=free_port(),
        kv_events_port=free_port(),
        replay_port=free_port(),
        log_path=log_dir / f"vllm-{spec.pod}.log",
    )


def start_servers(env: VllmEnv, specs: Sequence[VllmServerSpec], log_dir: Path) -> list[VllmServer]:
    """Start several servers at once and wait for all; on failure stop them all and raise.

    A server whose process exits during start-up is started once more on fresh ports (its
    first log is kept as `*.failed.log`): on a loaded 2-core machine vLLM's engine core
    occasionally fails to initialise, and a port picked as free can be taken before vLLM binds
    it. A server that is still starting when the time runs out is not retried."""
    servers = [new_server(spec, log_dir) for spec in specs]
    try:
        for server in servers:
            server.start(env)
        for i, server in enumerate(servers):
            try:
                server.wait_healthy()
            except VllmStartError:
                if server.process is None or server.process.poll() is None:
                    raise  # timed out while still running: a retry would not help
                failed_log = server.log_path.with_suffix(".failed.log")
                server.log_path.replace(failed_log)
                print(
                    f"vLLM {server.spec.pod} exited during start-up (log {failed_log}); "
                    "starting it once more on fresh ports",
                    file=sys.stderr,
                )
                retry = new_server(server.spec, log_dir)
                servers[i] = retry
                retry.start(env)
                retry.wait_healthy()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@contextlib.contextmanager
def running_servers(
    env: VllmEnv, specs: Sequence[VllmServerSpec], log_dir: Path
) -> Iterator[list[VllmServer]]:
    servers = start_servers(env, specs, log_dir)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
