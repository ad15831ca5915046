"""Health endpoints and graceful shutdown on real signals."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from llmd.runtime.lifecycle import Health, ServiceRunner, health_router


async def test_readiness_reports_failing_checks_and_draining() -> None:
    registry = CollectorRegistry()
    health = Health(registry)
    app = FastAPI()
    app.include_router(health_router(health, registry))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        health.set("discovery", True)
        assert (await http.get("/readyz")).status_code == 200
        health.set("discovery", False, "no endpoints file")
        r = await http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["discovery"] == {"ok": False, "reason": "no endpoints file"}
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert 'llmd_readiness_check{check="discovery"} 0.0' in metrics
        health.set("discovery", True)
        health.draining = True
        assert (await http.get("/readyz")).status_code == 503


SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    from llmd.runtime.lifecycle import ServiceRunner, run_service

    def wire(runner: ServiceRunner):
        async def closing(name):
            print("closed", name, flush=True)
        runner.on_shutdown("db", lambda: closing("db"))
        runner.on_shutdown("server", lambda: closing("server"))
        if "--stuck" in sys.argv:
            runner.on_shutdown("stuck", lambda: asyncio.sleep(60))
        async def main(stop: asyncio.Event) -> None:
            print("serving", flush=True)
            await stop.wait()
            print("draining", runner.health.ready, flush=True)
        return main

    sys.exit(run_service("demo", wire, shutdown_timeout_s=1.0))
    """
)


def run_and_signal(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    script = tmp_path / "svc.py"
    script.write_text(SERVICE)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "serving"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=20)
    assert time.monotonic() - started < 15
    return proc.returncode, out.split("\n")


@pytest.mark.integration
def test_sigterm_drains_then_runs_hooks_newest_first(tmp_path: Path) -> None:
    code, lines = run_and_signal(tmp_path)
    assert code == 0
    assert lines[:3] == ["draining False", "closed server", "closed db"]


@pytest.mark.integration
def test_a_hook_past_the_deadline_makes_the_exit_code_non_zero(tmp_path: Path) -> None:
    code, lines = run_and_signal(tmp_path, "--stuck")
    assert code == 1
    assert "closed server" not in lines  # the stuck hook used up the whole deadline


async def test_a_cancelled_run_ends_its_main_task_and_its_own() -> None:
    """Cancelling `run` itself (its caller is going away) ends the main task and the runner's
    waiting task before the cancellation reaches the caller: nothing is left running."""
    runner = ServiceRunner("svc", Health(), shutdown_timeout_s=1.0)
    main_ended = asyncio.Event()

    async def main(stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()  # never set: only cancellation ends it
        finally:
            main_ended.set()

    before = asyncio.all_tasks()
    run = asyncio.create_task(runner.run(main))
    await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert main_ended.is_set()
    assert asyncio.all_tasks() - before == set()
