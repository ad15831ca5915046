"""The local Cluster: a real process pool of engines that scales to N, and to zero.

`LocalCluster` implements `llmd.runtime.cluster.Cluster` on this machine. Each replica of a pool
is one engine process (an `llmd-sim` server, or a real vLLM CPU server on the tiny model) with
its own HTTP, KV-event and replay ports. Scaling up starts processes and adds each replica to
the discovery file (llm-d's file-discovery format, which the scheduler and indexer watch) once
its `/health` answers. Scaling down takes the newest replicas out of discovery first, waits
until they have no running or waiting requests (or `drain_timeout_s`), then stops them.

    scale(pool, n) -> desired = n -> reconcile task: start / drain+stop -> discovery file
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from llmd.protocol.metrics import parse_engine_snapshot
from llmd.runtime.cluster import ClusterError, PoolStatus, lookup_pool
from llmd.runtime.discovery import Endpoint
from llmd.runtime.tasks import cancel_tasks
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, free_port, new_server

log = logging.getLogger(__name__)

EVENTS_LABEL = "llmd.ai/kv-events-endpoint"
REPLAY_LABEL = "llmd.ai/kv-replay-endpoint"
MAX_REPLICAS = 64


@dataclass
class Replica:
    """One engine process of a pool."""

    name: str
    port: int
    events_port: int
    replay_port: int
    stop: Callable[[], None]
    """Stop the process (SIGTERM, then SIGKILL after a grace period); blocking."""
    alive: Callable[[], bool]
    log_path: Path
    ready: bool = False
    serial: int = 0
    """Order of creation in its pool: scaling down stops the highest first."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self) -> Endpoint:
        return Endpoint(
            self.name,
            "127.0.0.1",
            self.port,
            labels={
                "llm-d.ai/role": "decode",
                EVENTS_LABEL: f"tcp://127.0.0.1:{self.events_port}",
                REPLAY_LABEL: f"tcp://127.0.0.1:{self.replay_port}",
            },
            ready=self.ready,
        )


class Launcher(Protocol):
    """Starts one engine process for a pool (returns at once; readiness is polled)."""

    startup_timeout_s: float

    def launch(self, name: str, work: Path) -> Replica: ...


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class SimLauncher:
    """`llmd-sim` servers (simulated vLLM 0.32), one process each."""

    profile: str = "h100-8b"
    block_size: int = 16
    model: str = "tiny"
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 60.0

    def launch(self, name: str, work: Path) -> Replica:
        port, events, replay, side = (free_port() for _ in range(4))
        log_path = work / f"{name}.log"
        cmd = [
            sys.executable, "-m", "llmd.sim.cli", "--count", "1", "--pod-name", name,
            "--port", str(port), "--served-model-name", self.model,
            "--block-size", str(self.block_size), "--profile", self.profile,
            "--enable-prompt-tokens-details", "--side-channel-port", str(side),
            "--kv-events-config", json.dumps({
                "enable_kv_cache_events": True,
                "endpoint": f"tcp://*:{events}",
                "replay_endpoint": f"tcp://*:{replay}",
            }),
            *self.extra_args,
        ]  # fmt: skip
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        return Replica(
            name,
            port,
            events,
            replay,
            stop=lambda: _stop_process(proc),
            alive=lambda: proc.poll() is None,
            log_path=log_path,
        )


@dataclass
class VllmLauncher:
    """Real vLLM 0.32 CPU servers on the generated tiny model, one core each (round robin)."""

    env: VllmEnv
    model_dir: Path
    block_size: int = 32
    startup_timeout_s: float = 300.0
    _next_core: int = 0

    def launch(self, name: str, work: Path) -> Replica:
        cores = os.cpu_count() or 1
        spec = VllmServerSpec(
            pod=name,
            model_dir=self.model_dir,
            block_size=self.block_size,
            cpu_core=self._next_core % cores,
        )
        self._next_core += 1
        server: VllmServer = new_server(spec, work)
        server.start(self.env)
        proc = server.process
        return Replica(
            name,
            server.port,
            server.kv_events_port,
            server.replay_port,
            stop=server.stop,
            alive=lambda: proc is not None and proc.poll() is None,
            log_path=server.log_path,
        )


@dataclass
class _Pool:
    launcher: Launcher
    desired: int = 0
    replicas: list[Replica] = field(default_factory=list)
    serial: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class LocalCluster:
    """Pools of engine processes on this machine, behind one discovery file."""

    def __init__(
        self,
        launchers: dict[str, Launcher],
        discovery_file: Path,
        work: Path,
        *,
        drain_timeout_s: float = 10.0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._pools = {name: _Pool(launcher) for name, launcher in launchers.items()}
        self.discovery_file = discovery_file
        self.work = work
        self.drain_timeout_s = drain_timeout_s
        self.on_change = on_change or (lambda line: log.info("%s", line))
        self._client = httpx.AsyncClient(timeout=2.0)
        self._live: dict[int, Replica] = {}
        """Every launched replica not stopped yet, in a pool's list or not (a draining one is
        out of it): `close()` stops them all, so no engine process outlives the cluster."""
        self._launching: set[asyncio.Future[Replica]] = set()
        self._write_discovery()

    def _stop(self, replica: Replica) -> None:
        """Stop a replica (in a thread) and forget it."""
        replica.stop()
        self._live.pop(id(replica), None)

    def _pool(self, name: str) -> _Pool:
        return lookup_pool(self._pools, name)

    # --- the Cluster protocol ------------------------------------------------------------------

    async def pools(self) -> list[str]:
        return sorted(self._pools)

    async def endpoints(self, pool: str) -> list[Endpoint]:
        return [r.endpoint() for r in self._pool(pool).replicas]

    async def status(self, pool: str) -> PoolStatus:
        p = self._pool(pool)
        return PoolStatus(p.desired, sum(1 for r in p.replicas if r.ready))

    async def scale(self, pool: str, replicas: int) -> None:
        """Ask for `replicas` engines; the pool converges in the background."""
        if not 0 <= replicas <= MAX_REPLICAS:
            raise ClusterError(f"replicas must be between 0 and {MAX_REPLICAS}, got {replicas}")
        p = self._pool(pool)
        p.desired = replicas
        p.changed.set()
        if p.task is None or p.task.done():
            p.task = asyncio.create_task(self._reconcile(pool, p), name=f"reconcile-{pool}")

    # --- convergence ---------------------------------------------------------------------------

    def settled(self, pool: str) -> bool:
        """No replica of the pool is starting or draining."""
        p = self._pool(pool)
        return (p.task is None or p.task.done()) and all(r.ready for r in p.replicas)

    async def wait_ready(self, pool: str, timeout_s: float) -> PoolStatus:
        """Wait until the pool has exactly its desired number of ready replicas and every
        replica it dropped has stopped."""
        deadline = time.monotonic() + timeout_s
        while True:
            p = self._pool(pool)
            st = await self.status(pool)
            if self.settled(pool) and st.ready == st.desired == len(p.replicas):
                return st
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"pool {pool} has {st.ready} ready of {st.desired} after {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.1)

    async def _reconcile(self, name: str, p: _Pool) -> None:
        while True:
            p.changed.clear()
            if len(p.replicas) < p.desired:
                count = p.desired - len(p.replicas)
                await asyncio.gather(*(self._add(name, p) for _ in range(count)))
            elif len(p.replicas) > p.desired:
                by_age = sorted(p.replicas, key=lambda r: r.serial)
                victims = by_age[p.desired :][::-1]  # newest first
                await asyncio.gather(*(self._remove(name, p, r) for r in victims))
            if len(p.replicas) == p.desired and not p.changed.is_set():
                return

    async def _add(self, pool: str, p: _Pool) -> None:
        serial = p.serial
        name = f"{pool}-{serial}"
        p.serial += 1
        # A launch finishes in its thread even if this task is cancelled (close()): register the
        # replica when it does, so that close() can still stop it.
        launching = asyncio.ensure_future(asyncio.to_thread(p.launcher.launch, name, self.work))
        self._launching.add(launching)

        def launched(f: asyncio.Future[Replica]) -> None:
            self._launching.discard(f)
            if not f.cancelled() and f.exception() is None:
                r = f.result()
                self._live[id(r)] = r

        launching.add_done_callback(launched)
        replica = await asyncio.shield(launching)
        replica.serial = serial
        p.replicas.append(replica)
        deadline = time.monotonic() + p.launcher.startup_timeout_s
        while time.monotonic() < deadline and replica.alive():
            with contextlib.suppress(httpx.HTTPError):
                if (await self._client.get(replica.url + "/health")).status_code == 200:
                    replica.ready = True
                    break
            await asyncio.sleep(0.2)
        if not replica.ready:
            self.on_change(f"{name} failed to start (log {replica.log_path}); removing it")
            p.replicas.remove(replica)
            await asyncio.to_thread(self._stop, replica)
            return
        self._write_discovery()
        self.on_change(f"{name} ready at {replica.url}")

    async def _remove(self, pool: str, p: _Pool, replica: Replica) -> None:
        replica.ready = False
        p.replicas.remove(replica)
        self._write_discovery()  # no new requests from here on
        self.on_change(f"{replica.name} draining")
        deadline = time.monotonic() + self.drain_timeout_s
        await asyncio.sleep(2.0)  # readers of discovery (scheduler: 1 s, activator) catch up
        while time.monotonic() < deadline and replica.alive():
            try:
                text = (await self._client.get(replica.url + "/metrics")).text
                snap = parse_engine_snapshot(text)
            except (httpx.HTTPError, ValueError):
                break
            if not (snap.running or 0) and not (snap.waiting or 0):
                break
            await asyncio.sleep(0.2)
        await asyncio.to_thread(self._stop, replica)
        self.on_change(f"{replica.name} stopped")

    def _write_discovery(self) -> None:
        """Rewrite the discovery file atomically with every ready replica of every pool."""
        entries = [
            {
                "name": r.name,
                "address": "127.0.0.1",
                "port": str(r.port),
                "labels": dict(r.endpoint().labels),
            }
            for p in self._pools.values()
            for r in p.replicas
            if r.ready
        ]
        tmp = self.discovery_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"endpoints": entries}, sort_keys=False))
        tmp.replace(self.discovery_file)

    async def close(self) -> None:
        """Stop every replica (no draining: the stack is going away)."""
        for p in self._pools.values():
            p.desired = 0
            await cancel_tasks(p.task)
            p.replicas = []
        # launches still in their threads, then every replica not stopped (draining ones too)
        await asyncio.gather(*self._launching, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(self._stop, r) for r in list(self._live.values())))
        self._write_discovery()
        await self._client.aclose()
