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
from collections.abc import Collection, Mapping, Sequence
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

STORAGE_DOMAIN_PREFIX = "storage:"
"""Entries of a shared storage tier belong to its domain, `storage:<domain>`, not to one pod."""
MAX_STORAGE_DOMAINS = 256


def storage_domain_pod(medium: str | None, ownership: str | None) -> str | None:
    """The domain pseudo-pod of a STORAGE event whose ownership names a shared filesystem
    (`fs:<domain>`, as llmd-fs-offload and llmd-fs-evictor send), else None."""
    if (
        ownership
        and ownership.startswith("fs:")
        and len(ownership) > 3
        and medium
        and medium.upper() == "STORAGE"
    ):
        return STORAGE_DOMAIN_PREFIX + ownership[3:]
    return None


def apply_storage_domains(
    hits: dict[str, PrefixHit], domains: Mapping[str, str]
) -> dict[str, PrefixHit]:
    """Credit each pod with its storage domain's hit when that is worth more than its own
    (every pod of a domain mounts the same files). Drops the domain pseudo-pods.

    The better of the two, not their union: a pod holding the first blocks in HBM and the rest
    only on the shared volume is scored by whichever part is worth more."""
    if not domains:
        return hits
    out = {p: h for p, h in hits.items() if not p.startswith(STORAGE_DOMAIN_PREFIX)}
    for pod, domain in domains.items():
        shared = hits.get(STORAGE_DOMAIN_PREFIX + domain)
        if shared is None:
            continue
        own = out.get(pod)
        if own is None or shared.score > own.score:
            out[pod] = PrefixHit(shared.blocks, shared.score, dict(shared.tiers))
    return out


def domain_query_pods(
    pods: Collection[str] | None, domains: Mapping[str, str] | None
) -> Collection[str] | None:
    """The pods to look up: the candidates and their storage domains' pseudo-pods."""
    if pods is None or not domains:
        return pods
    extra = {STORAGE_DOMAIN_PREFIX + d for p, d in domains.items() if p in set(pods) and d}
    return [*pods, *sorted(extra)]


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


# Rough CPython costs, for the byte bound: a dict slot + int key + holder tuple + entries tuple,
# and per entry a tuple slot (PodEntry tuples are interned, so shared).
_KEY_BYTES = 240
_ENTRY_BYTES = 16
_E2R_BYTES = 140

_GPU_ONLY = TIER_GPU

# A key's holders: (entries, pod-set id, gpu_only). Only tuples of atoms (str, int, bool) live
# in the maps, so Python's cyclic GC untracks them: millions of keys cost the collector nothing
# (lists, dicts or slotted objects here made ingestion ~4x slower, all of it in the GC).
_Holders = tuple[tuple[PodEntry, ...], int, bool]


class InMemoryIndex:
    """A bounded, LRU-ordered index in this process. Every method is O(keys touched), except
    `clear`, which scans.

    Each key carries the id of its pod set (the distinct pods holding it, interned), so a
    lookup walking a prompt's keys mostly compares two ints: consecutive blocks usually have the
    same holders. Where they change, the active pods shrink by a C-level set intersection;
    per-entry work happens only at keys holding non-GPU or speculative entries.

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
        self._data: OrderedDict[int, _Holders] = OrderedDict()
        self._e2r: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._entries = 0
        self.evicted_keys = 0
        self.evicted_entries = 0
        self._interned: dict[PodEntry, PodEntry] = {}
        self._set_ids: dict[frozenset[str], int] = {}
        self._sets: list[frozenset[str]] = []

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
            "pod_sets": len(self._sets),
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

    def _set_id(self, pods: frozenset[str]) -> int:
        sid = self._set_ids.get(pods)
        if sid is None:
            sid = self._set_ids[pods] = len(self._sets)
            self._sets.append(pods)
        return sid

    def _holders(self, entries: tuple[PodEntry, ...]) -> _Holders:
        return (
            entries,
            self._set_id(frozenset(e.pod for e in entries)),
            all(e.tier == _GPU_ONLY and not e.speculative for e in entries),
        )

    def _shrink(self) -> None:
        data, e2r = self._data, self._e2r
        while len(data) > self.max_keys or (self.approx_bytes > self.max_bytes and len(data) > 1):
            _, h = data.popitem(last=False)
            self._entries -= len(h[0])
            self.evicted_keys += 1
            self.evicted_entries += len(h[0])
        while len(e2r) > self.max_keys:
            e2r.popitem(last=False)

    # --- writes ----------------------------------------------------------------------------

    def add_sync(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> list[int]:
        """Add `entry` at every request key; returns the positions it was already at."""
        entry = self._intern(entry)
        again: list[int] = []
        data = self._data
        cap = self.max_entries_per_key
        fresh: _Holders = self._holders((entry,))
        added = 0
        for pos, rk in enumerate(request_keys):
            h = data.get(rk)
            if h is None:
                data[rk] = fresh
                added += 1
                continue
            data.move_to_end(rk)
            entries = h[0]
            if entry in entries:
                again.append(pos)
                continue
            if len(entries) >= cap:
                entries = entries[1:]
                added -= 1
                self.evicted_entries += 1
            data[rk] = self._holders((*entries, entry))
            added += 1
        self._entries += added
        if engine_keys:
            e2r = self._e2r
            pairs = (
                zip(engine_keys, request_keys, strict=True)
                if len(engine_keys) == len(request_keys)
                else ratio_mapping(engine_keys, request_keys)
            )
            for ek, rk in pairs:
                mapped = e2r.get(ek)
                if mapped is None:
                    e2r[ek] = (rk,)
                elif rk not in mapped:
                    e2r[ek] = (*mapped, rk)
        if (
            len(data) > self.max_keys
            or len(self._e2r) > self.max_keys
            or (self._entries * _ENTRY_BYTES + len(data) * _KEY_BYTES > self.max_bytes)
        ):
            self._shrink()
        return again

    def _remove(self, rk: int, entry: PodEntry) -> bool:
        """Remove `entry` at `rk`; True when the key is now empty (and gone)."""
        h = self._data.get(rk)
        if h is None:
            return True
        entries = h[0]
        if entry in entries:
            entries = tuple(e for e in entries if e != entry)
            self._entries -= 1
            if not entries:
                del self._data[rk]
                return True
            self._data[rk] = self._holders(entries)
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

    def clear_sync(self, pod: str) -> int:
        """Drop every entry of `pod` (all tiers, groups, ranks); returns how many."""
        removed = 0
        sets = self._sets
        changed: list[tuple[int, tuple[PodEntry, ...]]] = []
        for rk, (entries, sid, _) in self._data.items():
            if pod not in sets[sid]:
                continue
            kept = tuple(e for e in entries if e.pod != pod)
            removed += len(entries) - len(kept)
            changed.append((rk, kept))
        for rk, kept in changed:
            if kept:
                self._data[rk] = self._holders(kept)
            else:
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
        sets = self._sets
        depth: dict[str, int] = {}
        mixed: list[tuple[int, tuple[PodEntry, ...]]] = []
        active: set[str] | frozenset[str] = frozenset()
        last = -1
        n = 0
        for i, rk in enumerate(request_keys):
            h = data.get(rk)
            if h is None:
                break
            sid = h[1]
            if last < 0:
                active = sets[sid] if pods is None else sets[sid].intersection(pods)
                if not active:
                    break
            elif sid != last:
                ps = sets[sid]
                if not active <= ps:
                    kept = active & ps
                    for p in active - kept:
                        depth[p] = i
                    active = kept
                    if not active:
                        break
            last = sid
            if not h[2]:
                mixed.append((i, h[0]))
            n = i + 1
        for p in active:
            depth[p] = n
        if not depth:
            return {}
        for rk in request_keys[:n]:
            data.move_to_end(rk)
        wg = w.get(TIER_GPU, 1.0)
        hits = {p: PrefixHit(d, d * wg, {TIER_GPU: d}) for p, d in depth.items() if d}
        for i, entries in mixed:
            best: dict[str, tuple[float, str]] = {}
            for e in entries:
                hit = hits.get(e.pod)
                if hit is None or hit.blocks <= i:
                    continue
                weight = w.get(e.tier, 1.0)
                cur = best.get(e.pod)
                # Ties go to a confirmed entry, then to the first tier name in sort order,
                # whatever order the entries arrived in (the Valkey backend decides alike).
                if (
                    cur is None
                    or weight > cur[0]
                    or (
                        weight == cur[0]
                        and e.tier != SPECULATIVE_TIER
                        and (cur[1] == SPECULATIVE_TIER or e.tier < cur[1])
                    )
                ):
                    best[e.pod] = (weight, e.tier)
            for p, (weight, tier) in best.items():
                if tier == TIER_GPU:
                    continue
                hit = hits[p]
                hit.score += weight - wg
                hit.tiers[TIER_GPU] -= 1
                hit.tiers[tier] = hit.tiers.get(tier, 0) + 1
        for hit in hits.values():
            if not hit.tiers.get(TIER_GPU):
                hit.tiers.pop(TIER_GPU, None)
        return hits

    def engine_keys(self, pod: str) -> set[int]:
        """Engine keys (vLLM's hashes) that `pod` holds in some tier (a scan; for checks)."""
        data, sets = self._data, self._sets
        return {
            ek
            for ek, rks in self._e2r.items()
            if any((h := data.get(rk)) is not None and pod in sets[h[1]] for rk in rks)
        }

    def pods(self) -> set[str]:
        return {p for h in self._data.values() for p in self._sets[h[1]]}

    def holders(self, request_key: int) -> list[PodEntry]:
        h = self._data.get(request_key)
        return list(h[0]) if h else []

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
