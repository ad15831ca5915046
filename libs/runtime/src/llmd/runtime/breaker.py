"""A circuit breaker for calls a service can do without (a shared index, a remote indexer).

Closed: calls go through. After a failure (an error or a timeout) it opens for `base_s`; while
open, `allow()` is False and callers skip the call (and serve without its data, saying so in a
metric). When the time is up one call is let through: success closes the breaker, another
failure reopens it for twice as long, up to `max_s`. Pure logic with an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    """Skip a failing dependency for a growing while instead of waiting on it every time."""

    base_s: float = 1.0
    max_s: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic)
    failures: int = 0
    open_until: float = 0.0
    skipped: int = 0

    @property
    def is_open(self) -> bool:
        return self.clock() < self.open_until

    def allow(self) -> bool:
        """May the call go through now? (False while open; counted in `skipped`.)"""
        if self.is_open:
            self.skipped += 1
            return False
        return True

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        self.open_until = self.clock() + min(self.max_s, self.base_s * 2 ** (self.failures - 1))
