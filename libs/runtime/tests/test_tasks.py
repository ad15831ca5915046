"""cancel_tasks: every component's stop ends its background tasks through it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llmd.runtime.tasks import cancel_tasks


async def test_running_tasks_are_cancelled_and_finished_before_it_returns() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits still completes
            cleaned.append(name)

    tasks = [asyncio.create_task(worker(n), name=n) for n in ("a", "b")]
    await asyncio.sleep(0)
    await cancel_tasks(tasks[0], None, tasks[1])
    assert all(t.cancelled() for t in tasks)
    assert sorted(cleaned) == ["a", "b"]


async def test_a_task_that_had_failed_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("scrape loop broke")

    async def idle() -> None:
        await asyncio.Event().wait()

    failed = asyncio.create_task(broken(), name="scraper")
    other = asyncio.create_task(idle(), name="sweeper")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="llmd.runtime.tasks"):
        await cancel_tasks(failed, other)
    assert other.cancelled()
    assert [r.getMessage() for r in caplog.records] == [
        "task scraper had failed: RuntimeError('scrape loop broke')"
    ]


async def test_finished_tasks_none_and_the_caller_itself_are_left_alone() -> None:
    async def done() -> int:
        return 7

    finished = asyncio.create_task(done())
    await finished

    async def stopper() -> str:
        # a component whose own loop calls its stop: it must not wait for itself
        await cancel_tasks(asyncio.current_task(), finished, None)
        return "stopped"

    assert await asyncio.create_task(stopper()) == "stopped"
    assert finished.result() == 7
    await cancel_tasks()
