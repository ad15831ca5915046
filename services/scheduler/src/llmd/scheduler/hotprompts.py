"""The pool's hot prompt heads, learned from the requests the scheduler routes.

A chat request's head is its leading `system`/`developer` messages: the system prompt, tool
instructions or few-shot header that many requests of a pool share and that a new replica
should have in its prefix cache before users reach it (llmd-activator's warm start reads them
from `/debug/hot-prompts` instead of, or beside, a hand-written list).

Each head is counted with an exponentially decaying score (`half_life_s`), so yesterday's
system prompt fades when today's traffic uses another. The table is bounded in entries and in
characters; when it is full, the head with the lowest decayed score makes room. Heads shorter
than `min_chars` are not worth a warm-up and are not tracked. Completions requests have no
boundary between shared and per-request text and are not tracked.

Cost per routed chat request: one hash over the head's text (CPython's SipHash, in C) and a
dict lookup, about 4 us for a 12 KB system prompt on a 2-core VM; the head's strings are the
parsed request's own, not copies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Head = tuple[tuple[str, str], ...]
"""(role, text) of each leading system/developer message."""


@dataclass
class _Entry:
    model: str
    head: Head
    chars: int
    score: float
    at: float
    requests: int = 1
    first_seen: float = field(default=0.0)


class HotPrompts:
    """A bounded, decaying count of chat heads per model."""

    def __init__(
        self,
        max_entries: int = 64,
        max_chars: int = 4 << 20,
        half_life_s: float = 600.0,
        min_chars: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_chars < 1 or half_life_s <= 0 or min_chars < 0:
            raise ValueError("hot prompt bounds must be positive")
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._decay = math.log(2) / half_life_s
        self._clock = clock
        self._entries: dict[tuple[str, int], _Entry] = {}
        self.chars = 0
        self.evicted = 0
        self.observed = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _score(self, e: _Entry, now: float) -> float:
        return e.score * math.exp(-self._decay * (now - e.at))

    def observe(self, model: str, head: Head) -> None:
        """Count one routed request with this head (no-op for an empty or short head)."""
        if not head:
            return
        chars = sum(len(text) for _, text in head)
        if chars < self.min_chars or chars > self.max_chars:
            return
        self.observed += 1
        now = self._clock()
        key = (model, hash(head))
        e = self._entries.get(key)
        if e is not None and e.head == head:
            e.score = self._score(e, now) + 1.0
            e.at = now
            e.requests += 1
            return
        if e is not None:  # a hash collision: the newcomer replaces the older head
            self._drop(key)
        while self._entries and (
            len(self._entries) >= self.max_entries or self.chars + chars > self.max_chars
        ):
            coldest = min(self._entries, key=lambda k: self._score(self._entries[k], now))
            self._drop(coldest)
            self.evicted += 1
        self._entries[key] = _Entry(model, head, chars, 1.0, now, first_seen=now)
        self.chars += chars

    def _drop(self, key: tuple[str, int]) -> None:
        e = self._entries.pop(key)
        self.chars -= e.chars

    def top(self, n: int, min_requests: int = 2, model: str = "") -> list[dict[str, Any]]:
        """The `n` hottest heads seen at least `min_requests` times (of `model`, when given),
        hottest first, each as a warm prompt: `model`, `messages`, plus its figures."""
        now = self._clock()
        rows = [
            (self._score(e, now), e)
            for e in self._entries.values()
            if e.requests >= min_requests and (not model or e.model == model)
        ]
        rows.sort(key=lambda r: r[0], reverse=True)
        return [
            {
                "model": e.model,
                "messages": [{"role": role, "content": text} for role, text in e.head],
                "score": round(score, 3),
                "requests": e.requests,
                "chars": e.chars,
                "last_seen_s": round(now - e.at, 3),
                "first_seen_s": round(now - e.first_seen, 3),
            }
            for score, e in rows[: max(0, n)]
        ]
