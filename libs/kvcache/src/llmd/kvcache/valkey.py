"""A Redis/Valkey index shared by several schedulers or indexers (active-active).

Key layout (llm-d's, so Go and Python replicas can share one server):

- `<prefix><request key decimal>`: HASH; field = the JSON pod entry, exactly as Go marshals
  llm-d's PodEntry (`{"PodIdentifier":..,"DeviceTier":..,"Speculative":..,"HasGroup":..,
  "GroupIdx":..}`, plus `"DataParallelRank"` when not 0); value `""`.
- `<prefix>engine:<engine key decimal>`: ZSET; members = request-key decimals, score =
  position (the highest is the chain's last key).
- `<prefix>sig:<request key decimal>`: STRING; the SHA-1 of the key's holder list, and
  `<prefix>set:<sha1>`: STRING, that list: a header line, `!g` when every entry is a plain GPU
  one and `!m` otherwise, then `pod<TAB>tier` lines, sorted, each ending in a newline
  (speculative entries have an empty tier) (llmd only; what lookups read: one short string per
  block, the holder list only where it changes). Texts without the header, from llmd before
  2026-12, are still read.
- `<prefix>llmd:pods`: HASH; pod -> unix time its events were last applied (llmd only; it
  drives cleanup).

Reads are one round trip: a Lua script walks the request keys' signatures server-side (an
unchanged signature from one block to the next costs one string comparison) and returns only the
per-pod result (consecutive blocks, weighted score, blocks per tier). Where the holders change,
each still-active pod is looked for in the new list with one plain substring search (C code,
no tables built); lists headed `!m` are weighed per tier once, after the walk. Evictions are a
script too (remove the entry, drop emptied keys, drop the engine mapping once every key it
names is empty).

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

# Every request-key HASH has a companion STRING `<prefix>sig:<key>`: the digest of its holder
# list (header line, then sorted `pod<TAB>tier` lines). Writes keep it current; lookups read
# one string per key and, since consecutive blocks usually have the same holders, mostly just
# compare it with the previous one (Lua strings are interned: equal strings are one object).
_RESIG = """
local SETPREFIX = ''
local function resig(k, sk)
  local f = redis.call('HKEYS', k)
  if #f == 0 then
    redis.call('DEL', k)
    redis.call('DEL', sk)
    return true
  end
  local lines = {}
  local mixed = false
  for _, field in ipairs(f) do
    local ok, d = pcall(cjson.decode, field)
    if ok and type(d) == 'table' and d['PodIdentifier'] then
      local t = d['DeviceTier'] or ''
      if d['Speculative'] then t = '' end
      if t ~= 'gpu' then mixed = true end
      lines[#lines + 1] = d['PodIdentifier'] .. '\\t' .. t
    end
  end
  table.sort(lines)
  local head = '!g\\n'
  if mixed then head = '!m\\n' end
  local body = head .. table.concat(lines, '\\n') .. '\\n'
  local digest = redis.sha1hex(body)
  redis.call('SET', SETPREFIX .. digest, body, 'NX')
  redis.call('SET', sk, digest)
  return false
end
"""

_ADD = (
    _RESIG
    + """
local field, ttl = ARGV[1], tonumber(ARGV[2])
SETPREFIX = ARGV[3]
for i = 1, #KEYS, 2 do
  local k, sk = KEYS[i], KEYS[i + 1]
  if redis.call('HSET', k, field, '') == 1 then resig(k, sk) end
  if ttl > 0 then
    redis.call('EXPIRE', k, ttl)
    redis.call('EXPIRE', sk, ttl)
  end
end
return #KEYS / 2
"""
)

_EVICT_REQUEST = (
    _RESIG
    + """
local field = ARGV[1]
SETPREFIX = ARGV[2]
for i = 1, #KEYS, 2 do
  if redis.call('HDEL', KEYS[i], field) == 1 then resig(KEYS[i], KEYS[i + 1]) end
end
return #KEYS / 2
"""
)

_EVICT_ENGINE = (
    _RESIG
    + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local prefix, field = ARGV[1], ARGV[2]
SETPREFIX = prefix .. 'set:'
local all_empty = true
for _, m in ipairs(members) do
  local k = prefix .. m
  if redis.call('HDEL', k, field) == 1 then resig(k, prefix .. 'sig:' .. m) end
  if redis.call('EXISTS', k) == 1 then all_empty = false end
end
if all_empty then redis.call('DEL', KEYS[1]) end
return #members
"""
)

_LOOKUP = """
local sigprefix = ARGV[1]
local setprefix = string.gsub(sigprefix, 'sig:$', 'set:')
local keylist = ARGV[2]
local npods = tonumber(ARGV[3])
local filter = nil
if npods > 0 then
  filter = {}
  for i = 4, npods + 3 do filter[ARGV[i]] = true end
end
local i = npods + 4
local nw = tonumber(ARGV[i]); i = i + 1
local weights = {}
for _ = 1, nw do weights[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
local wg = weights['gpu'] or 1.0
local find, gsub = string.find, string.gsub
-- Walk: the active pods only shrink. Where the holder set changes, each active pod is looked
-- for in the new set's text (a C-level search for its own line), so a change costs one search
-- per active pod and no table building. Sets that hold anything but plain GPU entries are
-- remembered as runs and weighed once, after the walk.
local active, na = nil, 0
local depth = {}          -- pod -> blocks it holds from the start
local needles = {}        -- pod -> '\\n' .. pod .. '\\t'
local runs = {}           -- {first block, end block, set text} for sets with other tiers
local last, lasttext, lastmixed = nil, nil, false
local runstart = 0
local n = 0
local names = {}
for key in string.gmatch(keylist, '%d+') do names[#names + 1] = sigprefix .. key end
local chunk = 16
local stop = false
local lo = 1
while lo <= #names and not stop do
  local hi = math.min(#names, lo + chunk - 1)
  local sigs = redis.call('MGET', unpack(names, lo, hi))
  for j = 1, hi - lo + 1 do
    local idx = lo + j - 2
    local sig = sigs[j]
    if not sig then stop = true; break end
    if sig ~= last then
      local body = redis.call('GET', setprefix .. sig)
      if not body then stop = true; break end
      if lastmixed then runs[#runs + 1] = {runstart, idx, lasttext} end
      local text, mixed = body, false
      if string.byte(body, 1) == 33 then  -- '!': the header says whether any tier is not 'gpu'
        mixed = string.byte(body, 2) == 109
      else  -- written by an older llmd: no header, no newline at either end
        text = '\\n' .. body .. '\\n'
        local _, lines = gsub(text, '\\t', '')
        local _, plain = gsub(text, '\\tgpu\\n', '')
        mixed = plain ~= lines
      end
      if active == nil then
        active = {}
        for pod in string.gmatch(body, '([^\\t\\n]+)\\t[^\\n]*') do
          if (filter == nil or filter[pod]) and not active[pod] then
            active[pod] = true
            needles[pod] = '\\n' .. pod .. '\\t'
            na = na + 1
          end
        end
      else
        for p in pairs(active) do
          if not find(text, needles[p], 1, true) then
            active[p] = nil
            depth[p] = idx
            na = na - 1
          end
        end
      end
      if na == 0 then stop = true; break end
      lastmixed = mixed
      lasttext = text
      runstart = idx
      last = sig
    end
    n = idx + 1
  end
  lo = hi + 1
  if chunk < 256 then chunk = chunk * 2 end
end
if active ~= nil then
  for p in pairs(active) do depth[p] = n end
  if lastmixed and na > 0 then runs[#runs + 1] = {runstart, n, lasttext} end
end
local score, tiers = {}, {}
for p, d in pairs(depth) do
  if d > 0 then
    score[p] = d * wg
    tiers[p] = {gpu = d}
  end
end
for _, run in ipairs(runs) do
  local s, e, text = run[1], run[2], run[3]
  local len = e - s
  local bw, bt = {}, {}
  for pod, tier in string.gmatch(text, '([^\\t\\n]+)\\t([^\\n]*)') do
    local d = depth[pod]
    if d ~= nil and d >= e then
      local w = weights[tier] or 1.0
      local cw = bw[pod]
      if cw == nil or w > cw or (w == cw and bt[pod] == '') then
        bw[pod] = w
        bt[pod] = tier
      end
    end
  end
  for p, t in pairs(bt) do
    if t ~= 'gpu' then
      score[p] = score[p] + len * (bw[p] - wg)
      local tt = tiers[p]
      tt['gpu'] = tt['gpu'] - len
      tt[t] = (tt[t] or 0) + len
    end
  end
end
-- one string, not nested arrays: the client parses it with a split, not a RESP walk
local out = {}
for p, tt in pairs(tiers) do
  local tl = {}
  for t, c in pairs(tt) do
    if c > 0 then tl[#tl + 1] = t .. '=' .. c end
  end
  out[#out + 1] = p .. '\\t' .. depth[p] .. '\\t' .. tostring(score[p]) .. '\\t'
    .. table.concat(tl, ',')
end
return table.concat(out, '\\n')
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
        self._add = self.redis.register_script(_ADD)
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

    @property
    def _setp(self) -> str:
        return f"{self.prefix}set:"

    def _sk(self, key: int | str) -> str:
        return f"{self.prefix}sig:{key}"

    def _pairs(self, request_keys: Sequence[int]) -> list[str]:
        out: list[str] = []
        for rk in request_keys:
            out += (self._rk(rk), self._sk(rk))
        return out

    async def add(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], entry: PodEntry
    ) -> None:
        if not request_keys:
            return
        field = entry_field(entry)
        ttl = self.key_ttl_s
        pipe = self.redis.pipeline(transaction=False)
        await self._add(keys=self._pairs(request_keys), args=[field, ttl, self._setp], client=pipe)
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
                keys=self._pairs(request_keys), args=[entry_field(entry), self._setp]
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
        sig_prefix = f"{self.prefix}sig:".encode()
        set_prefix = f"{self.prefix}set:".encode()
        llmd_prefix = f"{self.prefix}llmd:".encode()
        async for batch in self._scan_batches():
            keys = [
                k
                for k in batch
                if not k.startswith((engine_prefix, sig_prefix, set_prefix, llmd_prefix))
            ]
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
            if doomed:
                evict = self.redis.pipeline(transaction=False)
                for key, fld in doomed:
                    name = key.decode()
                    rk = name[len(self.prefix) :]
                    await self._evict_request(
                        keys=[name, self._sk(rk)], args=[fld.decode(), self._setp], client=evict
                    )
                await evict.execute()
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
        # Key names are built server-side from one string of decimals: packing 512 separate
        # arguments costs the client more than the whole lookup costs the server.
        args: list[Any] = [
            f"{self.prefix}sig:",
            " ".join(map(str, request_keys)),
            len(pod_list),
            *pod_list,
            len(w),
        ]
        for tier, weight in w.items():
            args += [tier, repr(float(weight))]
        rows = await self._lookup(keys=[], args=args)
        self.lookups += 1
        out: dict[str, PrefixHit] = {}
        for row in rows.decode().split("\n") if rows else ():
            pod, blocks, score, tiers = row.split("\t")
            counts = {}
            for item in tiers.split(",") if tiers else ():
                tier, _, count = item.rpartition("=")
                counts[tier] = int(count)
            out[pod] = PrefixHit(int(blocks), float(score), counts)
        return out
