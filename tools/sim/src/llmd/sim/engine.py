"""The simulated engine core: vLLM V1's continuous-batching scheduler over a KV block pool.

One step = one forward pass. Each step the scheduler (1) gives every running request its next
tokens (a prefill chunk, or one decode token) within the `max_num_batched_tokens` budget,
preempting the most recently admitted requests when blocks run out (recompute mode: their blocks
are freed and they go back to the front of the queue); (2) if nothing was preempted, admits
waiting requests in FIFO order while `max_num_seqs`, the token budget, the LoRA slots and free
blocks allow, after matching their prompt against the prefix cache. The step then lasts what the
latency model says, and on completion every request whose known tokens are all computed samples
one token, full blocks are cached (BlockStored), finished requests free their blocks.

P/D: a decode-leg request (valid `kv_transfer_params`) waits in WAITING_FOR_REMOTE_KVS while it
pulls its prompt's KV from the prefill engine; a prefill-leg request keeps its blocks after it
finishes, under a lease, until the decode engine pulls them or the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmd.protocol.hashing import ExtraKeys, event_hash, hash_function, none_hash
from llmd.protocol.kv_events import MEDIUM_STORAGE, BlockRemoved, BlockStored
from llmd.runtime.tasks import cancel_tasks
from llmd.sim.kv_cache import BlockOwner, BlockPool, KVBlock
from llmd.sim.latency import LatencyModel, StepShape
from llmd.sim.metrics import EngineMetrics
from llmd.sim.storage import StorageTier

log = logging.getLogger(__name__)


class SimClock:
    """Simulated seconds; runs `speed` times faster than the event loop's clock."""

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = speed
        self._loop_t0 = asyncio.get_running_loop().time()

    def now(self) -> float:
        return (asyncio.get_running_loop().time() - self._loop_t0) * self.speed

    def shared_now(self) -> float:
        """Simulated seconds on a time base every clock of the same speed shares (the event
        loop's epoch, not this clock's start): for state several engines share."""
        return asyncio.get_running_loop().time() * self.speed

    async def sleep_until(self, t: float) -> None:
        delay = (t - self.now()) / self.speed
        await asyncio.sleep(max(delay, 0.0))

    async def sleep_until_shared(self, t: float) -> None:
        await asyncio.sleep(max((t - self.shared_now()) / self.speed, 0.0))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0) / self.speed)


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A loaded adapter: vLLM's name, path and integer id."""

    name: str
    path: str
    lora_id: int


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """What a decode leg needs from its `kv_transfer_params` to pull KV from the prefill engine."""

    params: dict[str, Any]
    remote_prefill_cached_tokens: int | None


@dataclass(eq=False)
class SimRequest(BlockOwner):
    """One sequence (one choice of an OpenAI request)."""

    request_id: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    max_tokens: int = 16
    arrival: float = 0.0
    lora: LoraAdapter | None = None
    cache_salt: str | None = None
    rng: random.Random | None = None
    """Set for requests with a `seed`: their tokens then depend on nothing else."""
    params_n: int = 1
    params_max_tokens: int | None = None
    do_remote_decode: bool = False
    remote: RemotePrefill | None = None
    all_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    extra_keys: list[ExtraKeys] = field(default_factory=list)
    num_computed: int = 0
    num_prompt_hits: int | None = None
    cached_tokens: int = 0
    status: Status = Status.WAITING
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    on_update: Callable[[], None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class EngineError(Exception):
    """A request the engine cannot take (reported to the client as vLLM reports it)."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


PullFn = Callable[[SimRequest], Awaitable[str | None]]
"""Pull a decode leg's KV; returns None on success or the failure reason."""


@dataclass
class EngineSettings:
    """The scheduler's limits and the prefix-cache hashing setup."""

    block_size: int = 16
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    max_loras: int = 1
    max_waiting: int = 100_000
    enable_prefix_caching: bool = True
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    kv_load_failure_policy: str = "fail"


@dataclass(slots=True)
class _Scheduled:
    request: SimRequest
    num_new: int


class Engine:
    """The engine core of one simulated server."""

    def __init__(
        self,
        settings: EngineSettings,
        latency: LatencyModel,
        clock: SimClock,
        metrics: EngineMetrics,
        vocabulary: Sequence[int],
        *,
        publish: Callable[[list[Any]], None] | None = None,
        seed: int = 0,
        storage: StorageTier | None = None,
    ) -> None:
        self.settings = settings
        self.latency = latency
        self.clock = clock
        self.metrics = metrics
        self.pool = BlockPool(
            settings.num_gpu_blocks,
            settings.block_size,
            enable_caching=settings.enable_prefix_caching,
        )
        self._hash = hash_function(settings.hash_algo)
        self._none_hash = none_hash(settings.hash_algo, settings.hash_seed)
        self._vocab = list(vocabulary) or [0]
        self._rng = random.Random(seed)
        self._publish = publish
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.fetching: set[SimRequest] = set()
        self.pull: PullFn | None = None
        self.on_finished: Callable[[SimRequest], bool] | None = None
        """Hook for finished requests; returning True keeps their blocks (a P/D lease)."""
        self._work = asyncio.Event()
        self._resume = asyncio.Event()
        self._resume.set()
        self._task: asyncio.Task[None] | None = None
        self._fetch_tasks: set[asyncio.Task[None]] = set()
        self.steps = 0
        self.fatal: str | None = None
        self.storage = storage
        self._storage_events: list[Any] = []
        self._loading: dict[bytes, int] = {}
        """Stored blocks being loaded -> loads in flight that read them. A request whose next
        block is one of them waits for that load (then hits it on the GPU) instead of loading
        it a second time, as vLLM's offloading connector delays a request whose hit chunks are
        already being loaded (with prefix caching on)."""
        self._read_link_free_at = 0.0
        self._write_link_free_at = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        await cancel_tasks(self._task, *self._fetch_tasks)
        self._task = None

    @property
    def hung(self) -> bool:
        return not self._resume.is_set()

    def hang(self) -> None:
        """Stop stepping (requests stay where they are) until `unhang`."""
        self._resume.clear()

    def unhang(self) -> None:
        self._resume.set()

    def wake(self) -> None:
        self._work.set()

    # -- admission --------------------------------------------------------------------------

    def new_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        lora: LoraAdapter | None = None,
        cache_salt: str | None = None,
        seed: int | None = None,
    ) -> SimRequest:
        """A request with its prompt's block hashes computed (as vLLM does on arrival)."""
        req = SimRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            arrival=self.clock.now(),
            lora=lora,
            cache_salt=cache_salt,
            rng=None if seed is None else random.Random(seed),
            all_ids=list(prompt_ids),
        )
        self._extend_hashes(req)
        return req

    def submit(self, req: SimRequest) -> None:
        if self.fatal is not None:
            raise EngineError(self.fatal, status=500, kind="EngineDeadError")
        if len(self.waiting) + len(self.fetching) >= self.settings.max_waiting:
            self.metrics.admission_rejections["max_num_queued_reqs"] += 1
            raise EngineError(
                f"the waiting queue is full ({self.settings.max_waiting} requests)",
                status=503,
                kind="ServiceUnavailableError",
            )
        req.status = Status.WAITING
        self.waiting.append(req)
        self._work.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: drop the request wherever it is and free its blocks."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        self.fetching.discard(req)
        self._finish(req, "abort", self.clock.now())
        self._work.set()

    # -- hashing ----------------------------------------------------------------------------

    def _block_extra(self, req: SimRequest, index: int) -> ExtraKeys:
        keys: list[Any] = []
        if req.lora is not None:
            keys.append(("lora", req.lora.name, req.lora.path))
        if req.cache_salt is not None and index == 0:
            keys.append(("cache_salt", req.cache_salt))
        return tuple(keys) if keys else None

    def _extend_hashes(self, req: SimRequest) -> None:
        bs = self.settings.block_size
        hashes = req.block_hashes
        ids = req.all_ids
        while (len(hashes) + 1) * bs <= len(ids):
            i = len(hashes)
            extra = self._block_extra(req, i)
            req.extra_keys.append(extra)
            parent = hashes[-1] if hashes else self._none_hash
            hashes.append(self._hash((parent, tuple(ids[i * bs : (i + 1) * bs]), extra)))

    # -- the step loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._resume.wait()
            plan, shape = self._schedule()
            if not plan:
                self._flush_events()
                self.refresh_gauges()
                self._work.clear()
                await self._work.wait()
                continue
            start = self.clock.now()
            self.refresh_gauges()
            await self.clock.sleep_until(start + self.latency.step_time(shape))
            await self._resume.wait()  # a hang fault freezes a step in flight, too
            self._commit(plan, shape, self.clock.now())
            self.steps += 1

    def _lora_ok(self, req: SimRequest, active: set[str]) -> bool:
        if req.lora is None or req.lora.name in active:
            return True
        return len(active) < self.settings.max_loras

    def _schedule(self) -> tuple[list[_Scheduled], StepShape]:
        s = self.settings
        bs = s.block_size
        budget = s.max_num_batched_tokens
        plan: list[_Scheduled] = []
        shape = StepShape()
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed, budget)
            if num_new <= 0:
                i += 1
                continue
            need = -(-(req.num_computed + num_new) // bs) - len(req.blocks)
            while need > 0 and not self.pool.can_allocate(need):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            if need > 0:
                req.blocks.extend(self.pool.allocate(need))
            self._plan(plan, shape, req, num_new)
            budget -= num_new
            i += 1
        if preempted:
            return plan, shape
        active = {r.lora.name for r in self.running if r.lora is not None}
        skipped: list[SimRequest] = []
        while self.waiting and budget > 0 and len(self.running) < s.max_num_seqs:
            req = self.waiting.popleft()
            if not self._lora_ok(req, active) or (self._loading and self._behind_a_load(req)):
                skipped.append(req)
                continue
            if not self._admit(req, budget, plan, shape):
                self.waiting.appendleft(req)
                break
            if req.status is Status.RUNNING:
                budget -= plan[-1].num_new
                if req.lora is not None:
                    active.add(req.lora.name)
        self.waiting.extendleft(reversed(skipped))
        self.metrics.waiting_deferred = len(skipped) + len(self.fetching)
        return plan, shape

    def _admit(
        self, req: SimRequest, budget: int, plan: list[_Scheduled], shape: StepShape
    ) -> bool:
        """Try to start `req`: prefix-match, allocate, schedule its first chunk (or its pull)."""
        bs = self.settings.block_size
        hit: list[KVBlock] = []
        if not req.blocks:
            # vLLM never hits the last prompt token: it must be computed to sample from it.
            max_hit_blocks = (req.num_tokens - 1) // bs
            hit = self.pool.longest_prefix(req.block_hashes, max_hit_blocks)
            if req.num_prompt_hits is None:
                self.metrics.prefix_queries += req.num_tokens
                self.metrics.prefix_hits += len(hit) * bs
        computed = len(hit) * bs if not req.blocks else req.num_computed
        if self.storage is not None and req.remote is None and not req.blocks:
            stored = self.storage.consecutive(
                req.block_hashes, len(hit), (req.num_tokens - 1) // bs, self.clock.shared_now()
            )
            if stored:
                if not self.pool.can_allocate(stored, hit):
                    return False
                self.pool.touch(hit)
                req.blocks = [*hit, *self.pool.allocate(stored)]
                req.num_cached_blocks = len(hit)
                req.num_computed = computed
                self._record_first_schedule(req, computed)
                self._start_storage_load(req, stored)
                return True
        if req.remote is not None:
            total_blocks = -(-req.num_tokens // bs)
            need = total_blocks - len(hit)
            if not self.pool.can_allocate(need, hit):
                return False
            self.pool.touch(hit)
            req.blocks = [*hit, *self.pool.allocate(need)]
            req.num_cached_blocks = len(hit)
            req.num_computed = computed
            self._record_first_schedule(req, computed)
            self._start_fetch(req)
            return True
        num_new = min(req.num_tokens - computed, budget)
        need = -(-(computed + num_new) // bs) - len(req.blocks) - len(hit)
        if not self.pool.can_allocate(need, hit):
            return False
        if hit:
            self.pool.touch(hit)
            req.blocks = list(hit)
            req.num_cached_blocks = len(hit)
            req.num_computed = computed
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        self._record_first_schedule(req, computed)
        req.status = Status.RUNNING
        self.running.append(req)
        self._plan(plan, shape, req, num_new)
        return True

    def _record_first_schedule(self, req: SimRequest, computed: int) -> None:
        if req.num_prompt_hits is None:
            req.num_prompt_hits = computed
            req.cached_tokens = computed
            self.metrics.cached_by_source["device"] += computed
            self.metrics.prompt_by_source["local_cache_hit"] += computed
        if req.first_scheduled is None:
            req.first_scheduled = self.clock.now()

    def _plan(
        self, plan: list[_Scheduled], shape: StepShape, req: SimRequest, num_new: int
    ) -> None:
        plan.append(_Scheduled(req, num_new))
        if req.num_computed + num_new <= req.num_prompt_tokens or num_new > 1:
            shape.prefill_tokens += num_new
            shape.attention_pairs += num_new * (req.num_computed + num_new // 2)
        else:
            shape.decode_tokens += num_new
            shape.kv_read_tokens += req.num_computed

    def _preempt(self, req: SimRequest) -> None:
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_cached_blocks = 0
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.metrics.preemptions += 1
        self.waiting.appendleft(req)

    def _commit(self, plan: list[_Scheduled], shape: StepShape, now: float) -> None:
        bs = self.settings.block_size
        m = self.metrics
        m.observe("vllm:iteration_tokens_total", shape.total_tokens)
        finished: list[SimRequest] = []
        for item in plan:
            req = item.request
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            before = req.num_computed
            req.num_computed += item.num_new
            prompt_part = max(0, min(req.num_computed, req.num_prompt_tokens) - before)
            if prompt_part:
                m.prompt_tokens += prompt_part
                m.prompt_by_source["local_compute"] += prompt_part
            if req.num_computed >= req.num_tokens:
                self._sample(req, now)
            self._cache_computed(req)
            if self.storage is not None and prompt_part:
                # vLLM offloads the prompt's full blocks as they are computed
                first, last = before // bs, min(req.num_computed, req.num_prompt_tokens) // bs
                if last > first:
                    self._store(req.block_hashes[first:last])
            if self._is_done(req):
                finished.append(req)
        for req in finished:
            self.running.remove(req)
            self._finish(req, "length", now)
        self._flush_events()
        for item in plan:
            if item.request.on_update is not None:
                item.request.on_update()

    def _sample(self, req: SimRequest, now: float) -> None:
        token = (req.rng or self._rng).choice(self._vocab)
        req.output_ids.append(token)
        req.all_ids.append(token)
        self._extend_hashes(req)
        self.metrics.generation_tokens += 1
        if req.first_token is None:
            req.first_token = now
            self.metrics.observe("vllm:time_to_first_token_seconds", now - req.arrival)
        elif req.last_token is not None:
            self.metrics.observe("vllm:inter_token_latency_seconds", now - req.last_token)
        req.last_token = now

    def _is_done(self, req: SimRequest) -> bool:
        return (
            len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.settings.max_model_len
        )

    def _finish(self, req: SimRequest, reason: str, now: float) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finished_at = now
        keep = False
        if reason in ("length", "stop") and self.on_finished is not None:
            keep = self.on_finished(req)
        if not keep:
            self.pool.free(req.blocks)
            req.blocks = []
        self._record_finished(req, now)
        if req.on_update is not None:
            req.on_update()

    def _record_finished(self, req: SimRequest, now: float) -> None:
        m = self.metrics
        m.success[req.finish_reason or "abort"] += 1
        if req.finish_reason in ("abort", "error") and req.first_token is None:
            return
        m.observe("vllm:e2e_request_latency_seconds", now - req.arrival)
        m.observe("vllm:request_prompt_tokens", req.num_prompt_tokens)
        m.observe("vllm:request_generation_tokens", len(req.output_ids))
        m.observe("vllm:request_max_num_generation_tokens", req.max_tokens)
        m.observe("vllm:request_params_n", req.params_n)
        if req.params_max_tokens is not None:
            m.observe("vllm:request_params_max_tokens", req.params_max_tokens)
        m.observe("vllm:request_num_preemptions", req.num_preemptions)
        m.observe(
            "vllm:request_prefill_kv_computed_tokens",
            max(req.num_prompt_tokens - req.cached_tokens, 0),
        )
        if req.first_scheduled is not None:
            m.observe("vllm:request_queue_time_seconds", req.first_scheduled - req.arrival)
            m.observe("vllm:request_inference_time_seconds", now - req.first_scheduled)
            if req.first_token is not None:
                m.observe(
                    "vllm:request_prefill_time_seconds", req.first_token - req.first_scheduled
                )
        if req.first_token is not None:
            m.observe("vllm:request_decode_time_seconds", now - req.first_token)
            if len(req.output_ids) > 1:
                m.observe(
                    "vllm:request_time_per_output_token_seconds",
                    (now - req.first_token) / (len(req.output_ids) - 1),
                )

    def fail(self, req: SimRequest, message: str) -> None:
        """Finish `req` with finish_reason "error" (a failed KV load under policy "fail")."""
        req.error = message
        if req in self.running:
            self.running.remove(req)
        self._finish(req, "error", self.clock.now())

    def _flush_events(self) -> None:
        events = self.pool.take_events()
        if self._storage_events:
            events = [*events, *self._storage_events]
            self._storage_events = []
        if events and self._publish is not None:
            self._publish(events)

    def refresh_gauges(self) -> None:
        """Copy queue sizes and KV usage into the metrics (each step, and on every scrape)."""
        m = self.metrics
        m.running = len(self.running)
        m.waiting = len(self.waiting) + len(self.fetching)
        m.kv_usage = self.pool.usage

    def _cache_computed(self, req: SimRequest) -> None:
        """Cache the request's computed full blocks (one BlockStored for the new ones)."""
        self.pool.cache_full_blocks(
            req,
            req.num_computed // self.settings.block_size,
            req.all_ids,
            req.extra_keys,
            req.lora.lora_id if req.lora else None,
            req.lora.name if req.lora else None,
        )

    # -- the shared storage tier ------------------------------------------------------------

    def _store(self, hashes: Sequence[bytes]) -> None:
        assert self.storage is not None
        now = self.clock.shared_now()
        stored, evicted, done, dropped = self.storage.store(hashes, now, self._write_link_free_at)
        own = self.storage.ownership
        if stored:
            self._write_link_free_at = done
            m = self.metrics
            m.offload_store_bytes += self.storage.bytes_of(len(stored))
            m.offload_store_seconds += done - now
            if done <= now:
                self._storage_events.extend(self._stored_events(stored))
            else:
                task = asyncio.create_task(
                    self._announce_when_written(stored, done), name="fs-store"
                )
                self._fetch_tasks.add(task)
                task.add_done_callback(self._fetch_tasks.discard)
        elif dropped:
            self.metrics.offload_stores_dropped += 1
        if evicted:
            self._storage_events.append(
                BlockRemoved(
                    block_hashes=[event_hash(h) for h in evicted],
                    medium=MEDIUM_STORAGE,
                    group_idx=0,
                    ownership=own,
                )
            )

    def _stored_events(self, hashes: Sequence[bytes]) -> list[Any]:
        assert self.storage is not None
        own = self.storage.ownership
        return [
            BlockStored(
                block_hashes=[event_hash(h)],
                parent_block_hash=None,
                token_ids=[],
                block_size=0,
                lora_id=None,
                medium=MEDIUM_STORAGE,
                lora_name=None,
                group_idx=0,
                ownership=own,
            )
            for h in hashes
        ]

    async def _announce_when_written(self, hashes: list[bytes], done: float) -> None:
        """`BlockStored` once the file exists, as the real tier does (not for blocks evicted
        while they were being written)."""
        await self.clock.sleep_until_shared(done)
        assert self.storage is not None
        present = [h for h in hashes if self.storage.written(h, done)]
        if present and self._publish is not None:
            self._publish(self._stored_events(present))

    def _behind_a_load(self, req: SimRequest) -> bool:
        """Whether the first block `req` would not find on the GPU is being loaded by another
        request's load in flight."""
        if req.blocks or req.remote is not None or self.storage is None:
            return False
        most = (req.num_tokens - 1) // self.settings.block_size
        hit = len(self.pool.longest_prefix(req.block_hashes, most))
        return hit < most and req.block_hashes[hit] in self._loading

    def _start_storage_load(self, req: SimRequest, blocks: int) -> None:
        req.status = Status.WAITING_FOR_REMOTE_KVS
        self.fetching.add(req)
        first = req.num_computed // self.settings.block_size
        hashes = req.block_hashes[first : first + blocks]
        for h in hashes:
            self._loading[h] = self._loading.get(h, 0) + 1
        task = asyncio.create_task(self._load(req, blocks), name=f"fs-load-{req.request_id}")
        self._fetch_tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._fetch_tasks.discard(t)
            for h in hashes:
                n = self._loading.pop(h) - 1
                if n:
                    self._loading[h] = n
            self._work.set()  # requests waiting for these blocks look again

        task.add_done_callback(done)

    async def _load(self, req: SimRequest, blocks: int) -> None:
        """Read `blocks` stored blocks after the GPU hit into the request's new blocks."""
        assert self.storage is not None
        now = self.clock.shared_now()
        done, self._read_link_free_at = self.storage.load_done(blocks, now, self._read_link_free_at)
        await self.clock.sleep_until_shared(done)
        self.metrics.offload_load_bytes += self.storage.bytes_of(blocks)
        self.metrics.offload_load_seconds += done - now
        if req.status is not Status.WAITING_FOR_REMOTE_KVS:
            return  # aborted meanwhile
        self.fetching.discard(req)
        bs = self.settings.block_size
        tokens = blocks * bs
        self.storage.loads += 1
        self.storage.loaded_blocks += blocks
        req.num_computed += tokens
        req.cached_tokens += tokens
        m = self.metrics
        m.external_queries += req.num_tokens
        m.external_hits += tokens
        m.prompt_by_source["external_kv_transfer"] += tokens
        m.cached_by_source["disk"] += tokens
        self._cache_computed(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._work.set()

    # -- P/D decode legs --------------------------------------------------------------------

    def _start_fetch(self, req: SimRequest) -> None:
        req.status = Status.WAITING_FOR_REMOTE_KVS
        self.fetching.add(req)
        task = asyncio.create_task(self._fetch(req), name=f"kv-pull-{req.request_id}")
        self._fetch_tasks.add(task)
        task.add_done_callback(self._fetch_tasks.discard)

    async def _fetch(self, req: SimRequest) -> None:
        m = self.metrics
        m.kv_fetch["in_progress"] += 1
        tokens = max(req.num_tokens - 1 - req.num_computed, 0)
        failure: str | None
        try:
            failure = await self.pull(req) if self.pull is not None else "no KV connector"
            if failure is None:
                seconds = self.latency.transfer_time(tokens)
                await self.clock.sleep(seconds)
                m.nixl_xfer_time.observe(seconds)
        finally:
            m.kv_fetch["in_progress"] -= 1
        if req.status is not Status.WAITING_FOR_REMOTE_KVS:
            return  # aborted meanwhile
        self.fetching.discard(req)
        if failure is None:
            remote = req.remote
            assert remote is not None
            req.num_computed = max(req.num_tokens - 1, req.num_computed)
            m.external_queries += req.num_tokens
            m.external_hits += tokens
            m.prompt_by_source["external_kv_transfer"] += tokens
            m.cached_by_source["p2p"] += tokens
            reported = remote.remote_prefill_cached_tokens
            req.cached_tokens = reported if reported is not None else req.num_computed
            self._cache_computed(req)
        else:
            m.nixl_failed_transfers += 1
            log.warning("KV load for %s failed: %s", req.request_id, failure)
            if self.settings.kv_load_failure_policy == "fail":
                self.fail(req, f"KV transfer from the prefill engine failed: {failure}")
                self._work.set()
                return
            # "recompute": keep the local hits, compute the rest here
            self.pool.free(req.blocks[req.num_cached_blocks :])
            req.blocks = req.blocks[: req.num_cached_blocks]
        req.remote = None
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._work.set()
