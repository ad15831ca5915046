"""A Redis/Valkey index shared by several schedulers or indexers (active-active).

Key layout (llm-d's, so Go and Python replicas can share one server):

- `<prefix><request key decimal>`: HASH; field = the JSON pod entry, exactly as Go marshals
  llm-d's PodEntry (`{"PodIdentifier":..,"DeviceTier":..,"Speculative":..,"HasGroup":..,
  "GroupIdx":..}`, plus `"DataParallelRank"` when not 0); value `""`.
- `<prefix>engine:<engine key decimal>`: ZSET; members = request-key decimals, score =
  position (the highest is the chain's last key).
- `<prefix>llmd:pods`: HASH; pod -> unix time its events were last applied (llmd only; it
  drives cleanup).

Reads are one round trip: a Lua script walks the request keys server-side and returns only the
per-pod result (consecutive blocks, weighted score, blocks per tier). Evictions are a script too
(remove the entry, drop emptied keys, drop the engine mapping once every key it names is empty).

Dead pods do not linger: `clear(pod)` runs when discovery drops a pod, and `janitor()` clears
pods whose events stopped more than `pod_ttl_s` ago (the replica that takes a short lock does
it, so a crashed replica's pods are still cleaned). An optional `key_ttl_s` also puts a TTL,
refreshed on every store, on the keys themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from llmd.kvcache.index import (
    DEFAULT_TIER_WEIGHTS,
    NO_GROUP,
    PodEntry,
    PrefixHit,
    ratio_mapping,
)

_LOOKUP = """
local npods = tonumber(ARGV[1])
local filter = nil
if npods > 0 then
  filter = {}
  for i = 2, npods + 1 do filter[ARGV[i]] = true end
end
local i = npods + 2
local nw = tonumber(ARGV[i]); i = i + 1
local weights = {}
for _ = 1, nw do weights[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local active = nil
local res = {}
for _, k in ipairs(KEYS) do
  local fields = redis.call('HKEYS', k)
  if #fields == 0 then break end
  local best = {}
  local any = false
  for _, f in ipairs(fields) do
    local ok, e = pcall(cjson.decode, f)
    if ok and type(e) == 'table' then
      local p = e['PodIdentifier']
      if p and (filter == nil or filter[p]) and (active == nil or active[p]) then
        local t = e['DeviceTier'] or ''
        local w = weights[t] or 1.0
        local cur = best[p]
        if cur == nil or w > cur[1] or (w == cur[1] and cur[2] == '') then
          best[p] = {w, t}; any = true
        end
      end
    end
  end
  if not any then break end
  active = {}
  for p, bt in pairs(best) do
    active[p] = true
    local r = res[p]
    if r == nil then r = {0, 0, {}}; res[p] = r end
    r[1] = r[1] + 1
    r[2] = r[2] + bt[1]
    r[3][bt[2]] = (r[3][bt[2]] or 0) + 1
  end
end
local out = {}
for p, r in pairs(res) do
  local tl = {}
  for t, c in pairs(r[3]) do table.insert(tl, t); table.insert(tl, c) end
  table.insert(out, {p, r[1], tostring(r[2]), tl})
end
return out
"""

_EVICT_ENGINE = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local prefix, field = ARGV[1], ARGV[2]
local all_empty = true
for _, m in ipairs(members) do
  local k = prefix .. m
  redis.call('HDEL', k, field)
  if redis.call('HLEN', k) == 0 then redis.call('DEL', k) else all_empty = false end
end
if all_empty then redis.call('DEL', KEYS[1]) end
return #members
"""

_EVICT_REQUEST = """
local field = ARGV[1]
for _, k in ipairs(KEYS) do
  redis.call('HDEL', k, field)
  if redis.call('HLEN', k) == 0 then redis.call('DEL', k) end
end
return #KEYS
"""


def entry_field(entry: PodEntry) -> str:
    """The HASH field for an entry, byte-identical to Go's json.Marshal of llm-d's PodEntry."""
    has_group = entry.group != NO_GROUP
    doc: dict[str, Any] = {
        "PodIdentifier": entry.pod,
        "DeviceTier": entry.tier,
        "Speculative": entry.speculative,
        "HasGroup": has_group,
        "GroupIdx": entry.group if has_group else 0,
    }
    if entry.rank:
        doc["DataParallelRank"] = entry.rank
    return json.dumps(doc, separators=(",", ":"))


def parse_field(field: str | bytes) -> PodEntry | None:
    try:
        doc = json.loads(field)
        return PodEntry(
            str(doc["PodIdentifier"]),
            str(doc.get("DeviceTier", "")),
            int(doc.get("GroupIdx", 0)) if doc.get("HasGroup") else NO_GROUP,
            int(doc.get("DataParallelRank", 0)),
            bool(doc.get("Speculative", False)),
        )
    except (ValueError, KeyError, TypeError):
        return None


def normalize_url(url: str) -> str:
    """llm-d's address rules: valkey:// -> redis://, valkeys:// -> rediss://, bare host:port."""
    if url.startswith("valkey://"):
        return "redis://" + url[len("valkey://") :]
    if url.startswith("valkeys://"):
        return "rediss://" + url[len("valkeys://") :]
    if "://" not in url:
        return "redis://" + url
    return url


class ValkeyIndex:
    """The `Index` protocol over a Redis/Valkey server (redis-py asyncio)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        prefix: str = "",
        key_ttl_s: int = 0,
        pod_ttl_s: float = 900.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.prefix = prefix
        self.key_ttl_s = key_ttl_s
        self.pod_ttl_s = pod_ttl_s
        self.redis: aioredis.Redis = client or aioredis.Redis.from_url(
            self.url, decode_responses=False
        )
        self._lookup = self.redis.register_script(_LOOKUP)
        self._evict_engine = self.redis.register_script(_EVICT_ENGINE)
        self._evict_request = self.redis.register_script(_EVICT_REQUEST)
        self._touched: dict[str, float] = {}
        self.lookups = 0
        self.writes = 0
        self.errors = 0

    def _rk(self, key: int) -> str:
        return f"{self.prefix}{key}"

    def _ek(self, key: int) -> str:
        return f"{self.prefix}engine:{key}"

    @property
    def _pods_key(self) -> str:
        return f"{self.prefix}llmd:pods"

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    def stats(self) -> dict[str, float]:
        return {"lookups": self.lookups, "writes": self.writes, "errors": self.errors}

    # --- writes ----------------------------------------------------------------------------

    async def add(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> None:
        if not request_keys:
            return
        field = entry_field(entry)
        pipe = self.redis.pipeline(transaction=False)
        ttl = self.key_ttl_s
        for rk in request_keys:
            k = self._rk(rk)
            pipe.hset(k, field, "")
            if ttl:
                pipe.expire(k, ttl)
        if engine_keys:
            for i, (ek, rk) in enumerate(ratio_mapping(engine_keys, request_keys)):
                k = self._ek(ek)
                pipe.zadd(k, {str(rk): i})
                if ttl:
                    pipe.expire(k, ttl)
        now = time.time()
        if now - self._touched.get(entry.pod, 0.0) > 5.0:
            self._touched[entry.pod] = now
            pipe.hset(self._pods_key, entry.pod, str(now))
        await pipe.execute()
        self.writes += 1

    async def evict_engine_key(self, engine_key: int, entry: PodEntry) -> None:
        await self._evict_engine(
            keys=[self._ek(engine_key)], args=[self.prefix, entry_field(entry)]
        )
        self.writes += 1

    async def evict_request_keys(self, request_keys: Sequence[int], entry: PodEntry) -> None:
        if request_keys:
            await self._evict_request(
                keys=[self._rk(k) for k in request_keys], args=[entry_field(entry)]
            )
            self.writes += 1

    async def request_key(self, engine_key: int) -> int | None:
        got = await self.redis.zrange(self._ek(engine_key), -1, -1)
        return int(got[0]) if got else None  # type: ignore[arg-type]

    async def clear(self, pod: str) -> int:
        """Remove every entry of `pod` (SCAN over the prefix; engine mappings are left, as
        llm-d leaves them: they point at emptied keys, which breaks chains correctly)."""
        removed = 0
        engine_prefix = f"{self.prefix}engine:".encode()
        pods_key = self._pods_key.encode()
        async for batch in self._scan_batches():
            keys = [k for k in batch if not k.startswith(engine_prefix) and k != pods_key]
            if not keys:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.hkeys(k)
            try:
                fields_per_key = await pipe.execute(raise_on_error=False)
            except aioredis.ResponseError:
                continue
            doomed: list[tuple[bytes, bytes]] = []
            for k, fields in zip(keys, fields_per_key, strict=True):
                if not isinstance(fields, list):
                    continue  # not a hash: somebody else's key under this prefix
                for f in fields:
                    e = parse_field(f)
                    if e is not None and e.pod == pod:
                        doomed.append((k, f))
            for key, fld in doomed:
                await self._evict_request(keys=[key.decode()], args=[fld.decode()])
            removed += len(doomed)
        await self.redis.hdel(self._pods_key, pod)
        self._touched.pop(pod, None)
        return removed

    async def _scan_batches(self) -> Any:
        cursor = 0
        pattern = f"{self.prefix}*" if self.prefix else "*"
        while True:
            cursor, keys = await self.redis.scan(cursor, match=pattern, count=1024)
            yield keys
            if cursor == 0:
                return

    async def janitor(self, live: Collection[str] = ()) -> list[str]:
        """Clear pods whose events stopped more than `pod_ttl_s` ago (and are not `live`)."""
        seen = await self.redis.hgetall(self._pods_key)
        now = time.time()
        cleared = []
        for raw_pod, raw_t in seen.items():
            pod = raw_pod.decode() if isinstance(raw_pod, bytes) else str(raw_pod)
            try:
                age = now - float(raw_t)
            except ValueError:
                age = float("inf")
            if pod in live or age < self.pod_ttl_s:
                continue
            lock = f"{self.prefix}llmd:janitor:{pod}"
            if await self.redis.set(lock, "1", nx=True, ex=60):
                await self.clear(pod)
                cleared.append(pod)
        return cleared

    # --- reads -----------------------------------------------------------------------------

    async def longest_prefix(
        self,
        request_keys: Sequence[int],
        pods: Collection[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> dict[str, PrefixHit]:
        if not request_keys:
            return {}
        w = DEFAULT_TIER_WEIGHTS if weights is None else weights
        pod_list = sorted(pods) if pods is not None else []
        if pods is not None and not pod_list:
            return {}
        args: list[Any] = [len(pod_list), *pod_list, len(w)]
        for tier, weight in w.items():
            args += [tier, repr(float(weight))]
        rows = await self._lookup(keys=[self._rk(k) for k in request_keys], args=args)
        self.lookups += 1
        out: dict[str, PrefixHit] = {}
        for pod, blocks, score, tiers in rows:
            tier_counts = {tiers[i].decode(): int(tiers[i + 1]) for i in range(0, len(tiers), 2)}
            out[pod.decode()] = PrefixHit(int(blocks), float(score), tier_counts)
        return out
