"""KV events in, index updates out: ordering, gaps, replay, restarts, duplicates, garbage.

    engine PUB --(topic, seq, batch)--> Subscription (one per engine / DP rank)
        sequence tracking: next -> apply; gap -> replay from the engine's ROUTER;
        lower than before -> the engine restarted: clear its entries, replay from 0;
        unrepairable gap -> clear the pod and go on from the live stream
      --> shard queue (bounded; pod -> shard by FNV-1a, so one pod's batches stay in order)
      --> EventApplier: BlockStored -> request keys from token_ids (+ extras) -> index.add;
          BlockRemoved -> reference count -> index.evict; AllBlocksCleared -> index.clear

Duplicate stores of one block (vLLM re-caches, reuse reports, offload chunk overlap) are
reference counted per (pod, tier, group, rank, engine hash): the removal reaches the index only
when the last store is gone. Batches that do not decode are counted and dropped; the
subscription and the index carry on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from llmd.kvcache.index import (
    MAX_STORAGE_DOMAINS,
    STORAGE_DOMAIN_PREFIX,
    Index,
    InMemoryIndex,
    PodEntry,
    normalize_tier,
    storage_domain_pod,
)
from llmd.kvcache.keys import TokenProcessor, event_block_extras
from llmd.kvcache.metrics import KVCacheMetrics
from llmd.protocol.errors import DecodeError
from llmd.protocol.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    parse_topic,
    to_u64,
)
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

RECENT_BATCHES = 1024
"""Per stream, how many applied batches are remembered (by digest) to tell duplicates from a
restarted engine's new batches."""

INDEXABLE_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


class EventApplier:
    """Applies decoded batches of one pod to the index (callers keep per-pod order)."""

    def __init__(
        self,
        index: Index,
        processor: TokenProcessor,
        metrics: KVCacheMetrics | None = None,
        max_refcounts: int = 1_000_000,
    ) -> None:
        self.index = index
        self.processor = processor
        self.metrics = metrics or KVCacheMetrics()
        self._fast = index if isinstance(index, InMemoryIndex) else None
        self._refs: dict[tuple[PodEntry, int], int] = {}
        """Stores beyond the first per (entry, engine key): a removal is absorbed while >= 2."""
        self._seen: dict[tuple[PodEntry, int], None] = {}
        """Backends that cannot tell duplicates themselves (Valkey): every stored block."""
        self.max_refcounts = max_refcounts
        self.blocks_stored = 0
        self.blocks_removed = 0
        m = self.metrics
        # labelled children resolved once: .labels() costs more than the rest of a small event
        self._ev_stored = m.events.labels("BlockStored")
        self._ev_removed = m.events.labels("BlockRemoved")
        self._blk_stored = m.blocks.labels("stored")
        self._blk_removed = m.blocks.labels("removed")
        self._blk_dup = m.blocks.labels("duplicate-remove")
        self._domains: set[str] = set()
        self._chunks: OrderedDict[tuple[str, int], tuple[int, ...]] = OrderedDict()
        """Storage-domain stores: a chunk's engine keys by its last one (the chunk's file name),
        so that an evictor's removal of the file, which names only that key, removes them all."""

    def _holder(self, pod: str, medium: str | None, ownership: str | None) -> str | None:
        """Who holds the blocks of an event: its pod, or for a shared filesystem tier the
        storage domain (so the evictor's removals reach what every pod of it stored). None
        when too many domains are already known (the event is skipped and counted)."""
        domain = storage_domain_pod(medium, ownership)
        if domain is None:
            return pod
        if domain not in self._domains:
            if len(self._domains) >= MAX_STORAGE_DOMAINS:
                self._skip("storage-domains")
                return None
            self._domains.add(domain)
        return domain

    async def apply(self, pod: str, model: str, batch: EventBatch) -> None:
        rank = batch.data_parallel_rank or 0
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                await self._stored(pod, model, rank, ev)
            elif isinstance(ev, BlockRemoved):
                await self._removed(pod, rank, ev)
            elif isinstance(ev, AllBlocksCleared):
                await self.clear_pod(pod)
                self.metrics.events.labels("AllBlocksCleared").inc()

    async def clear_pod(self, pod: str) -> int:
        self._refs = {k: v for k, v in self._refs.items() if k[0].pod != pod}
        self._seen = {k: v for k, v in self._seen.items() if k[0].pod != pod}
        return await self.index.clear(pod)

    def _skip(self, reason: str, kind: str | None = None) -> None:
        self.metrics.stores_skipped.labels(reason).inc()
        self.metrics.stores_skipped_by_kind.labels(kind or "full", reason).inc()

    async def _stored(self, pod: str, model: str, rank: int, ev: BlockStored) -> None:
        self._ev_stored.inc()
        if ev.kv_cache_spec_kind is not None and ev.kv_cache_spec_kind not in INDEXABLE_KINDS:
            self._skip("attention-kind", ev.kv_cache_spec_kind)
            return
        group = ev.group_idx if ev.group_idx is not None else -1
        holder = self._holder(pod, ev.medium, ev.ownership)
        if holder is None:
            return
        entry = PodEntry(holder, normalize_tier(ev.medium), group, rank)
        engine_keys = [to_u64(h) for h in ev.block_hashes]
        shared = holder != pod
        if shared and len(engine_keys) > 1:
            self._chunks[(holder, engine_keys[-1])] = tuple(engine_keys)
            if len(self._chunks) > self.max_refcounts:
                self._chunks.popitem(last=False)
        index = self.index
        fast = self._fast
        tokens = ev.token_ids
        if not tokens:
            # A tier update (offload placeholder): the blocks are known by their engine keys.
            resolved = []
            for ek in engine_keys:
                rk = fast.request_key_sync(ek) if fast else await index.request_key(ek)
                if rk is not None:
                    resolved.append(rk)
            if not resolved:
                self._skip("unknown-engine-key")
                return
            if fast:
                fast.add_sync(None, resolved, entry)
            else:
                await index.add(None, resolved, entry)
            self._count(entry, engine_keys, None)
            return
        if ev.block_size <= 0 or len(tokens) != len(engine_keys) * ev.block_size:
            self._skip("token-count")
            return
        parent = 0
        if ev.parent_block_hash is not None:
            ph = to_u64(ev.parent_block_hash)
            got = fast.request_key_sync(ph) if fast else await index.request_key(ph)
            if got is None:
                self._skip("missing-parent")
                return
            parent = got
        n_blocks = len(tokens) // self.processor.block_size
        extras = event_block_extras(ev.extra_keys, ev.lora_name, n_blocks)
        request_keys = self.processor.keys(
            tokens, ev.lora_name or model, extras=extras, parent=parent
        )
        if fast:
            again = fast.add_sync(engine_keys, request_keys, entry)
            # the index says which blocks this entry already held: only those need a count
            dup = {engine_keys[p * len(engine_keys) // len(request_keys)] for p in again}
            self._count(entry, engine_keys, dup)
        else:
            await index.add(engine_keys, request_keys, entry)
            self._count(entry, engine_keys, None)

    def _count(self, entry: PodEntry, engine_keys: list[int], dup: set[int] | None) -> None:
        """Reference counts of stores beyond the first (absent = held once).

        `dup` are the engine keys this entry already held (None: unknown, check each)."""
        refs = self._refs
        shared = entry.pod.startswith(STORAGE_DOMAIN_PREFIX)  # one file: stores are idempotent
        for ek in () if shared else engine_keys if dup is None else dup:
            k = (entry, ek)
            n = refs.get(k)
            if n is not None:
                refs[k] = n + 1
            elif dup is not None or k in self._seen:
                refs[k] = 2
            if dup is None:
                self._seen[k] = None
        if len(self._seen) > self.max_refcounts:
            for k in list(self._seen)[: len(self._seen) - self.max_refcounts]:
                del self._seen[k]
        if len(refs) > self.max_refcounts:  # forget the oldest: their removals pass through
            for k in list(refs)[: len(refs) - self.max_refcounts]:
                del refs[k]
        self.blocks_stored += len(engine_keys)
        self._blk_stored.inc(len(engine_keys))
        self.metrics.admissions.inc(len(engine_keys))

    async def _removed(self, pod: str, rank: int, ev: BlockRemoved) -> None:
        self._ev_removed.inc()
        group = ev.group_idx if ev.group_idx is not None else -1
        holder = self._holder(pod, ev.medium, ev.ownership)
        if holder is None:
            return
        entry = PodEntry(holder, normalize_tier(ev.medium), group, rank)
        refs = self._refs
        fast = self._fast
        removed = [to_u64(h) for h in ev.block_hashes]
        if holder != pod:  # one file, whoever announced it: no reference counts
            removed = [k for ek in removed for k in self._chunks.pop((holder, ek), (ek,))]
        for ek in removed:
            k = (entry, ek)
            n = refs.get(k)
            if n is not None:
                if n > 2:
                    refs[k] = n - 1
                else:
                    del refs[k]
                self._blk_dup.inc()
                self.metrics.dedup_suppressed.inc()
                continue
            self._seen.pop(k, None)
            if fast:
                fast.evict_engine_key_sync(ek, entry)
            else:
                await self.index.evict_engine_key(ek, entry)
            self.blocks_removed += 1
            self._blk_removed.inc()
            self.metrics.dedup_forwarded.inc()
            self.metrics.evictions.inc()


# --- subscriptions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    """Where one engine (or DP rank) publishes, and the pod id its blocks are indexed under."""

    pod: str
    events: str
    replay: str | None = None
    model: str | None = None
    """Overrides the topic's model name (the read path must use the same one)."""


@dataclass(slots=True)
class StreamState:
    last_seq: int = -1
    """The last sequence applied (live or replayed)."""
    recent: dict[int, int] = field(default_factory=dict)
    """Digest of each recently applied batch by sequence (the last RECENT_BATCHES): a batch
    whose sequence was applied is a duplicate only if its bytes are the same; otherwise the
    engine restarted and is numbering from 0 again."""
    live_seq: int = -1
    """The last sequence seen live: a lower one means the engine restarted."""
    batches: int = 0
    gaps: int = 0
    replays: int = 0
    replay_failures: int = 0
    restarts: int = 0
    clears: int = 0
    decode_errors: int = 0
    last_event_at: float = 0.0
    last_error: str | None = None
    models: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Ingestor:
    """Subscriptions to many engines feeding sharded, bounded apply queues."""

    def __init__(
        self,
        applier: EventApplier,
        *,
        ctx: zmq.asyncio.Context | None = None,
        topic_filter: str = "kv@",
        shards: int = 4,
        queue_size: int = 1024,
        replay_timeout_s: float = 2.0,
        on_clear: Callable[[str, str], None] | None = None,
    ) -> None:
        self.applier = applier
        self.metrics = applier.metrics
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.topic_filter = topic_filter.encode()
        self.replay_timeout_s = replay_timeout_s
        self.on_clear = on_clear
        self._queues: list[asyncio.Queue[tuple[str, str, EventBatch] | Callable[[], Any]]] = [
            asyncio.Queue(maxsize=queue_size) for _ in range(max(1, shards))
        ]
        self._workers: list[asyncio.Task[None]] = []
        self._subs: dict[str, tuple[EngineEndpoint, asyncio.Task[None]]] = {}
        self.streams: dict[str, StreamState] = {}
        self._bound: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        for i, q in enumerate(self._queues):
            self._workers.append(asyncio.create_task(self._work(q), name=f"kv-shard-{i}"))
            self.metrics.queue_capacity.labels(str(i)).set(q.maxsize)
        self.metrics.pool_capacity.set(len(self._queues))
        self.metrics.pool_queue_depth.set_function(lambda: sum(q.qsize() for q in self._queues))

    async def stop(self) -> None:
        await cancel_tasks(*(t for _, t in self._subs.values()), *self._bound, *self._workers)
        self._subs.clear()
        self._workers.clear()
        self._bound.clear()

    async def drain(self) -> None:
        """Wait until every queued batch has been applied."""
        for q in self._queues:
            await q.join()

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, endpoint: EngineEndpoint) -> None:
        """Follow one engine (idempotent; a changed address resubscribes)."""
        key = endpoint.events
        current = self._subs.get(key)
        if current is not None:
            if current[0] == endpoint:
                return
            current[1].cancel()
        task = asyncio.create_task(self._follow(endpoint), name=f"kv-sub-{endpoint.pod}")
        self._subs[key] = (endpoint, task)
        self.metrics.subscriptions.set(len(self._subs))
        self.metrics.active_subscribers.set(len(self._subs))

    async def unsubscribe(self, events: str, *, clear: bool = True) -> None:
        got = self._subs.pop(events, None)
        self.metrics.subscriptions.set(len(self._subs))
        self.metrics.active_subscribers.set(len(self._subs))
        if got is None:
            return
        endpoint, task = got
        await cancel_tasks(task)
        self.streams.pop(endpoint.pod + "|" + events, None)
        if clear and not any(e.pod == endpoint.pod for e, _ in self._subs.values()):
            await self._enqueue_clear(endpoint.pod, "pod left")

    def sync(self, endpoints: list[EngineEndpoint]) -> list[asyncio.Task[None]]:
        """Make the subscriptions exactly `endpoints` (pods that left are cleared)."""
        wanted = {e.events: e for e in endpoints}
        gone = [k for k in self._subs if k not in wanted]
        for e in endpoints:
            self.subscribe(e)
        return [asyncio.create_task(self.unsubscribe(k)) for k in gone]

    @property
    def subscribed(self) -> list[EngineEndpoint]:
        return [e for e, _ in self._subs.values()]

    async def resync(self, pod: str, reason: str) -> None:
        """Forget a pod's entries and rebuild them from its replay buffer (index health)."""
        for endpoint, _ in list(self._subs.values()):
            if endpoint.pod != pod:
                continue
            state = self.streams.get(self._stream_key(endpoint))
            if state is None:
                await self._enqueue_clear(pod, reason)
                continue
            async with state.lock:
                await self._enqueue_clear(pod, reason)
                if endpoint.replay and state.last_seq >= 0:
                    last = state.last_seq
                    ok = await self._replay(endpoint, state, 0, None, last + 1)
                    state.last_seq = max(state.last_seq, last)
                    if not ok:
                        log.warning("resync of %s: replay incomplete; new events rebuild it", pod)

    def bind(self, address: str) -> None:
        """Centralized mode: engines connect to `address`; pods are named by the topic."""
        self._bound.append(asyncio.create_task(self._listen(address), name=f"kv-bind-{address}"))

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _stream_key(endpoint: EngineEndpoint) -> str:
        return endpoint.pod + "|" + endpoint.events

    def _shard(self, pod: str) -> asyncio.Queue[tuple[str, str, EventBatch] | Callable[[], Any]]:
        return self._queues[fnv1a32(pod) % len(self._queues)]

    async def _enqueue_clear(self, pod: str, reason: str) -> None:
        self.metrics.pod_clears.labels(reason).inc()
        log.warning("clearing the KV index entries of %s: %s", pod, reason)
        if self.on_clear is not None:
            self.on_clear(pod, reason)

        async def clear() -> None:
            await self.applier.clear_pod(pod)

        await self._shard(pod).put(clear)

    async def _work(
        self, q: asyncio.Queue[tuple[str, str, EventBatch] | Callable[[], Any]]
    ) -> None:
        applier = self.applier
        while True:
            item = await q.get()
            try:
                if callable(item):
                    await item()
                else:
                    pod, model, batch = item
                    await applier.apply(pod, model, batch)
            except Exception as exc:  # an index failure loses this batch, not the pipeline
                self.metrics.apply_errors.inc()
                log.warning("applying KV events failed: %s: %s", type(exc).__name__, exc)
            finally:
                q.task_done()

    @staticmethod
    def _is_duplicate(state: StreamState, seq: int, payload: bytes) -> bool:
        """An already-applied sequence with the same bytes (not a restarted engine's batch)."""
        return state.recent.get(seq) == hash(payload)

    def _decode(
        self, frames: list[bytes], state: StreamState, where: str
    ) -> tuple[str, str, int, EventBatch] | None:
        if len(frames) != 3 or len(frames[1]) != 8:
            state.decode_errors += 1
            state.last_error = f"{len(frames)} frames (expected topic, seq, payload)"
            self.metrics.decode_errors.labels("frames").inc()
            return None
        try:
            topic = parse_topic(frames[0])
            batch = decode_batch(frames[2])
        except (DecodeError, ValueError) as exc:
            state.decode_errors += 1
            state.last_error = str(exc)
            self.metrics.decode_errors.labels("payload").inc()
            if state.decode_errors <= 3 or state.decode_errors % 1000 == 0:
                log.warning("undecodable KV event batch from %s: %s", where, exc)
            return None
        return topic.pod, topic.model, int.from_bytes(frames[1], "big"), batch

    async def _follow(self, endpoint: EngineEndpoint) -> None:
        state = self.streams.setdefault(self._stream_key(endpoint), StreamState())
        while True:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter)
            try:
                sock.connect(endpoint.events)
                if state.last_seq < 0 and endpoint.replay:
                    # Joining: whatever the engine still buffers is state we would miss.
                    async with state.lock:
                        await self._replay(endpoint, state, 0, pod_model=None)
                while True:
                    frames = await sock.recv_multipart()
                    await self._on_live(endpoint, state, frames)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("KV subscription to %s failed: %s", endpoint.events, exc)
                self.metrics.zmq_errors.labels(endpoint.pod, "recv").inc()
                self.metrics.reconnections.labels(endpoint.pod).inc()
                await asyncio.sleep(1.0)
            finally:
                sock.close(linger=0)

    async def _on_live(
        self, endpoint: EngineEndpoint, state: StreamState, frames: list[bytes]
    ) -> None:
        self.metrics.messages_received.labels(endpoint.pod).inc()
        got = self._decode(frames, state, endpoint.events)
        if got is None:
            return
        _, topic_model, seq, batch = got
        model = endpoint.model or topic_model
        digest = hash(frames[2])
        async with state.lock:
            live_before = state.live_seq
            state.live_seq = seq
            restarted = (live_before >= 0 and seq < live_before) or (
                seq <= state.last_seq and not self._is_duplicate(state, seq, frames[2])
            )
            if restarted:
                # Lower than the last live sequence: the engine restarted (empty cache, new seq).
                state.restarts += 1
                self.metrics.sequence.labels("restart").inc()
                await self._enqueue_clear(endpoint.pod, "engine restarted")
                log.info(
                    "engine %s restarted (sequence %d after %d)",
                    endpoint.pod,
                    seq,
                    max(live_before, state.last_seq),
                )
                state.last_seq = -1
                state.recent.clear()
                if seq > 0 and endpoint.replay:
                    await self._replay(endpoint, state, 0, model, seq)
                await self._push(endpoint.pod, model, state, seq, batch, digest)
                return
            last = state.last_seq
            if seq <= last:  # already applied (replayed while it was in flight)
                self.metrics.sequence.labels("duplicate").inc()
                return
            if last >= 0 and seq > last + 1:
                state.gaps += 1
                self.metrics.sequence.labels("gap").inc()
                repaired = bool(endpoint.replay) and await self._replay(
                    endpoint, state, last + 1, model, seq
                )
                if not repaired:
                    log.warning(
                        "events %d..%d of %s lost and not replayable",
                        last + 1,
                        seq - 1,
                        endpoint.pod,
                    )
                    await self._enqueue_clear(endpoint.pod, "events lost")
            await self._push(endpoint.pod, model, state, seq, batch, digest)

    async def _push(
        self, pod: str, model: str, state: StreamState, seq: int, batch: EventBatch, digest: int
    ) -> None:
        state.last_seq = seq
        state.recent[seq] = digest
        if len(state.recent) > RECENT_BATCHES:
            del state.recent[next(iter(state.recent))]
        state.batches += 1
        state.last_event_at = time.time()
        state.models.add(model)
        q = self._shard(pod)
        await q.put((pod, model, batch))
        self.metrics.batches.inc()

    async def _replay(
        self,
        endpoint: EngineEndpoint,
        state: StreamState,
        start: int,
        pod_model: str | None,
        stop: int | None = None,
    ) -> bool:
        """Ask the engine's ROUTER for batches from `start`; True when [start, stop) arrived."""
        assert endpoint.replay is not None
        state.replays += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        expected = start
        try:
            sock.connect(endpoint.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(int(self.replay_timeout_s * 1000)):
                    raise TimeoutError(f"no replay answer within {self.replay_timeout_s} s")
                frames = await sock.recv_multipart()
                if len(frames) >= 3 and frames[-2] == END_SEQ:
                    break
                got = self._decode(frames[1:], state, endpoint.replay)
                if got is None:
                    continue
                _, topic_model, seq, batch = got
                if seq < expected or (stop is not None and seq >= stop):
                    continue
                digest = hash(frames[3])
                if seq != expected:
                    if stop is None and expected == start:
                        # Joining: the engine's buffer no longer starts at 0; take what is left.
                        state.last_error = f"replay began at {seq}: older batches are gone"
                    else:
                        raise LookupError(f"replay starts at {seq}, {expected} is gone")
                await self._push(
                    endpoint.pod,
                    pod_model or endpoint.model or topic_model,
                    state,
                    seq,
                    batch,
                    digest,
                )
                expected = seq + 1
            if stop is not None and expected < stop:
                raise LookupError(f"replay ended at {expected - 1}, before {stop}")
            self.metrics.replays.labels("ok").inc()
            return True
        except (TimeoutError, LookupError, zmq.ZMQError) as exc:
            state.replay_failures += 1
            state.last_error = f"replay: {exc}"
            self.metrics.replays.labels("failed").inc()
            log.warning("replay from %s failed: %s", endpoint.replay, exc)
            return False
        finally:
            sock.close(linger=0)

    async def _listen(self, address: str) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter)
        sock.bind(address)
        try:
            while True:
                frames = await sock.recv_multipart()
                key = "bound|" + (frames[0].decode(errors="replace") if frames else "")
                state = self.streams.setdefault(key, StreamState())
                got = self._decode(frames, state, address)
                if got is None:
                    continue
                pod, model, seq, batch = got
                rank = batch.data_parallel_rank or 0
                rank_key = f"{key}|{rank}"
                rstate = self.streams.setdefault(rank_key, StreamState())
                if rstate.last_seq >= 0 and seq < rstate.last_seq:
                    rstate.restarts += 1
                    await self._enqueue_clear(pod, "engine restarted")
                elif rstate.last_seq >= 0 and seq > rstate.last_seq + 1:
                    rstate.gaps += 1
                    self.metrics.sequence.labels("gap").inc()
                    await self._enqueue_clear(pod, "events lost (centralized mode has no replay)")
                await self._push(pod, model, rstate, seq, batch, hash(frames[2]))
        finally:
            sock.close(linger=0)

    def snapshot(self) -> dict[str, Any]:
        return {
            k: {
                "last_seq": s.last_seq,
                "batches": s.batches,
                "gaps": s.gaps,
                "replays": s.replays,
                "replay_failures": s.replay_failures,
                "restarts": s.restarts,
                "decode_errors": s.decode_errors,
                "last_event_age_s": round(time.time() - s.last_event_at, 3)
                if s.last_event_at
                else None,
                "last_error": s.last_error,
            }
            for k, s in self.streams.items()
        }
