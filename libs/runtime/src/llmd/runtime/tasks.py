"""Background asyncio tasks: the one way components end theirs.

Every long-lived component (scrapers, dispatchers, sweepers, discovery followers) owns a few
tasks that it creates in `start` and must end in `stop`. Cancelling a task without waiting for
it leaves it running past its owner's close (it may still touch a closed client) and makes
asyncio warn that a pending task was destroyed; waiting without guarding against its error
stops the shutdown half-way. `cancel_tasks` does both right, in one place.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait until each has finished.

    `None` entries are skipped, so an optional task is passed as it is stored, and so is the
    calling task itself (it cannot wait for its own end). A task that had already failed is
    logged here, once, and not raised: stopping goes on to the next resource.
    """
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not None and t is not current]
    if not pending:
        return
    for task in pending:
        task.cancel()
    results = await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(pending, results, strict=True):
        if isinstance(result, Exception):
            log.warning("task %s had failed: %r", task.get_name(), result, exc_info=result)
