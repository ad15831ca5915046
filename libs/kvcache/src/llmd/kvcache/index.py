"""The KV-block index: request key -> the pods (and tiers) holding that block.

Two maps, as llm-d keeps them: request key -> pod entries (what scoring reads), and engine key
-> request keys (how a `BlockRemoved`, which names vLLM's hash, finds what to evict). Both are
bounded by a key count and an estimated byte size; the least recently used keys go first and
every eviction is counted.

`longest_prefix` is the only read: walk the request keys in order, keep the pods present at
every key so far, and stop when none is left. Per pod it returns the consecutive matched blocks,
the tier-weighted score (a block counts with the best tier weight that pod has for it) and the
blocks per tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

TIER_GPU = "gpu"
TIER_CPU = "cpu"
TIER_STORAGE = "storage"
SPECULATIVE_TIER = ""
"""Tier of speculative entries (just-routed requests, before their events arrive)."""

DEFAULT_TIER_WEIGHTS: dict[str, float] = {TIER_GPU: 1.0, TIER_CPU: 0.8}
"""llm-d's defaults; a tier missing from the map weighs 1.0 (speculative entries too)."""

NO_GROUP = -1


class PodEntry(NamedTuple):
    """One holder of a block: which pod, which device tier, KV group and data-parallel rank.

    An entry is the identity of a store: a removal must name the same tier, group and rank.
    """

    pod: str
    tier: str = TIER_GPU
    group: int = NO_GROUP
    rank: int = 0
    speculative: bool = False


def normalize_tier(medium: str | None) -> str:
    """vLLM's `medium` ("GPU", "CPU", "STORAGE", None) as an index tier."""
    return medium.lower() if medium else TIER_GPU


@dataclass(slots=True)
class PrefixHit:
    """One pod's match for a request: consecutive blocks from the start, and their worth."""

    blocks: int = 0
    score: float = 0.0
    tiers: dict[str, int] = field(default_factory=dict)


def ratio_mapping(engine_keys: Sequence[int], request_keys: Sequence[int]) -> list[tuple[int, int]]:
    """llm-d's engine -> request pairing when the two block sizes differ (equal: 1:1)."""
    ne, nr = len(engine_keys), len(request_keys)
    n = max(ne, nr)
    if ne == 0 or nr == 0:
        return []
    return [(engine_keys[i * ne // n], request_keys[i * nr // n]) for i in range(n)]


class Index(Protocol):
    """What ingestion and scoring need from a backend (in-memory or Valkey)."""

    async def add(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> None: ...

    async def evict_engine_key(self, engine_key: int, entry: PodEntry) -> None: ...

    async def evict_request_keys(self, request_keys: Sequence[int], entry: PodEntry) -> None: ...

    async def request_key(self, engine_key: int) -> int | None: ...

    async def clear(self, pod: str) -> int: ...

    async def longest_prefix(
        self,
        request_keys: Sequence[int],
        pods: Collection[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, PrefixHit]: ...

    def stats(self) -> dict[str, float]: ...


# Rough CPython costs, for the byte bound: a dict slot + int key + entry dict, and per entry a
# slot in that dict (the PodEntry tuples are shared through interning of the common ones).
_KEY_BYTES = 240
_ENTRY_BYTES = 72
_E2R_BYTES = 160


class InMemoryIndex:
    """A bounded, LRU-ordered index in this process. Every method is O(keys touched), except
    `clear`, which scans.

    The async methods exist for the `Index` protocol; the `*_sync` ones are what ingestion and
    the embedded scheduler call directly.
    """

    def __init__(
        self,
        max_keys: int = 10_000_000,
        max_bytes: int = 2 << 30,
        max_entries_per_key: int = 64,
    ) -> None:
        if max_keys <= 0 or max_bytes <= 0 or max_entries_per_key <= 0:
            raise ValueError("index bounds must be positive")
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.max_entries_per_key = max_entries_per_key
        self._data: OrderedDict[int, dict[PodEntry, None]] = OrderedDict()
        self._e2r: OrderedDict[int, list[int]] = OrderedDict()
        self._entries = 0
        self.evicted_keys = 0
        self.evicted_entries = 0
        self._interned: dict[PodEntry, PodEntry] = {}

    # --- sizes -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def approx_bytes(self) -> int:
        return (
            len(self._data) * _KEY_BYTES
            + self._entries * _ENTRY_BYTES
            + len(self._e2r) * _E2R_BYTES
        )

    def stats(self) -> dict[str, float]:
        return {
            "keys": len(self._data),
            "entries": self._entries,
            "engine_keys": len(self._e2r),
            "approx_bytes": self.approx_bytes,
            "evicted_keys": self.evicted_keys,
            "evicted_entries": self.evicted_entries,
        }

    def _intern(self, entry: PodEntry) -> PodEntry:
        got = self._interned.get(entry)
        if got is None:
            if len(self._interned) > 65_536:
                self._interned.clear()
            self._interned[entry] = entry
            got = entry
        return got

    def _shrink(self) -> None:
        data, e2r = self._data, self._e2r
        while len(data) > self.max_keys or (self.approx_bytes > self.max_bytes and len(data) > 1):
            _, entries = data.popitem(last=False)
            self._entries -= len(entries)
            self.evicted_keys += 1
            self.evicted_entries += len(entries)
        while len(e2r) > self.max_keys:
            e2r.popitem(last=False)

    # --- writes ----------------------------------------------------------------------------

    def add_sync(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> None:
        entry = self._intern(entry)
        data = self._data
        cap = self.max_entries_per_key
        for rk in request_keys:
            entries = data.get(rk)
            if entries is None:
                data[rk] = {entry: None}
                self._entries += 1
                continue
            data.move_to_end(rk)
            if entry in entries:
                continue
            if len(entries) >= cap:
                entries.pop(next(iter(entries)))
                self._entries -= 1
                self.evicted_entries += 1
            entries[entry] = None
            self._entries += 1
        if engine_keys:
            e2r = self._e2r
            if len(engine_keys) == len(request_keys):
                for ek, rk in zip(engine_keys, request_keys, strict=True):
                    mapped = e2r.get(ek)
                    if mapped is None:
                        e2r[ek] = [rk]
                    elif rk not in mapped:
                        mapped.append(rk)
            else:
                for ek, rk in ratio_mapping(engine_keys, request_keys):
                    mapped = e2r.setdefault(ek, [])
                    if rk not in mapped:
                        mapped.append(rk)
        if (
            len(data) > self.max_keys
            or len(self._e2r) > self.max_keys
            or (self._entries * _ENTRY_BYTES + len(data) * _KEY_BYTES > self.max_bytes)
        ):
            self._shrink()

    def _remove(self, rk: int, entry: PodEntry) -> bool:
        """Remove `entry` at `rk`; True when the key is now empty (and gone)."""
        entries = self._data.get(rk)
        if entries is None:
            return True
        if entry in entries:
            del entries[entry]
            self._entries -= 1
        if not entries:
            del self._data[rk]
            return True
        return False

    def evict_engine_key_sync(self, engine_key: int, entry: PodEntry) -> None:
        mapped = self._e2r.get(engine_key)
        if mapped is None:
            return
        empty = True
        for rk in mapped:
            empty = self._remove(rk, entry) and empty
        if empty:
            del self._e2r[engine_key]

    def evict_request_keys_sync(self, request_keys: Sequence[int], entry: PodEntry) -> None:
        for rk in request_keys:
            self._remove(rk, entry)

    def request_key_sync(self, engine_key: int) -> int | None:
        mapped = self._e2r.get(engine_key)
        return mapped[-1] if mapped else None

    def clear_sync(self, pod: str, keep: Iterable[str] = ()) -> int:
        """Drop every entry of `pod` (all tiers, groups, ranks); returns how many."""
        removed = 0
        kept = set(keep)
        empty: list[int] = []
        for rk, entries in self._data.items():
            doomed = [e for e in entries if e.pod == pod and e.tier not in kept]
            for e in doomed:
                del entries[e]
            removed += len(doomed)
            if not entries:
                empty.append(rk)
        for rk in empty:
            del self._data[rk]
        self._entries -= removed
        return removed

    # --- reads -----------------------------------------------------------------------------

    def longest_prefix_sync(
        self,
        request_keys: Sequence[int],
        pods: Collection[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, PrefixHit]:
        w = DEFAULT_TIER_WEIGHTS if weights is None else weights
        data = self._data
        hits: dict[str, PrefixHit] = {}
        active: set[str] | None = None
        for rk in request_keys:
            entries = data.get(rk)
            if not entries:
                break
            data.move_to_end(rk)
            best: dict[str, tuple[float, str]] = {}
            for e in entries:
                p = e.pod
                if (active is not None and p not in active) or (pods is not None and p not in pods):
                    continue
                weight = w.get(e.tier, 1.0)
                cur = best.get(p)
                if (
                    cur is None
                    or weight > cur[0]
                    or (weight == cur[0] and cur[1] == SPECULATIVE_TIER)
                ):
                    best[p] = (weight, e.tier)
            if not best:
                break
            for p, (weight, tier) in best.items():
                h = hits.get(p)
                if h is None:
                    h = hits[p] = PrefixHit()
                h.blocks += 1
                h.score += weight
                h.tiers[tier] = h.tiers.get(tier, 0) + 1
            active = set(best)
        return hits

    def pods(self) -> set[str]:
        return {e.pod for entries in self._data.values() for e in entries}

    def holders(self, request_key: int) -> list[PodEntry]:
        return list(self._data.get(request_key, ()))

    # --- the async protocol ----------------------------------------------------------------

    async def add(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> None:
        self.add_sync(engine_keys, request_keys, entry)

    async def evict_engine_key(self, engine_key: int, entry: PodEntry) -> None:
        self.evict_engine_key_sync(engine_key, entry)

    async def evict_request_keys(self, request_keys: Sequence[int], entry: PodEntry) -> None:
        self.evict_request_keys_sync(request_keys, entry)

    async def request_key(self, engine_key: int) -> int | None:
        return self.request_key_sync(engine_key)

    async def clear(self, pod: str) -> int:
        return self.clear_sync(pod)

    async def longest_prefix(
        self,
        request_keys: Sequence[int],
        pods: Collection[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, PrefixHit]:
        return self.longest_prefix_sync(request_keys, pods, weights)
