"""The vLLM plugin: an `OffloadingSpec` whose tier is a shared filesystem (vLLM 0.32).

```
--kv-transfer-config '{"kv_connector": "LlmdFsConnector",
  "kv_connector_module_path": "llmd.fs_offload.connector",
  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
  "kv_connector_extra_config": {"spec_name": "LlmdFsOffloadingSpec",
    "spec_module_path": "llmd.fs_offload.spec",
    "shared_storage_path": "/mnt/kv", "block_size": 256}}'
```

`SharedStorageOffloadingSpec` is the same class under llm-d's FS backend name, so an llm-d
configuration switches by changing the module paths. The scheduler-side `FsOffloadingManager`
answers lookups from the filesystem (asynchronously, with a deadline) and publishes `BlockStored`
events with medium `STORAGE` for files that exist after a store. The worker-side
`FsOffloadingWorker` moves chunks between the KV tensors and files through `IOEngine`; it reports
failed loads per block, which only `LlmdFsConnector` passes on to vLLM (vLLM's own
`OffloadingConnector` asserts that every transfer succeeds), so this spec refuses to run without it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingManager,
    OffloadingMetricMetadata,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
    TransferResult,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from llmd.fs_offload.engine import Chunk, IOEngine
from llmd.fs_offload.layout import FILE_FORMAT, GROUP_BYTES, StorageLayout
from llmd.fs_offload.metrics import (
    COUNTERS,
    ENGINE_COUNTERS,
    M_LOOKUP_TIMEOUTS,
    M_LOOKUPS,
)
from llmd.fs_offload.settings import FsOffloadConfigError, FsOffloadSettings
from llmd.fs_offload.torch_pages import TorchPages

log = logging.getLogger("llmd.fs_offload")


def _route_logs_through_vllm() -> None:
    """Our log lines go where vLLM's go, in its format (vLLM configures only its own logger)."""
    vllm_logger = logging.getLogger("vllm")
    if log.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


_route_logs_through_vllm()

MAX_PENDING_LOOKUPS = 65_536
MAX_KNOWN = 262_144


class FsLoadStoreSpec(LoadStoreSpec):
    """The chunks of a transfer, by offload key (the worker derives each file's path)."""

    def __init__(self, keys: Sequence[OffloadKey]) -> None:
        self.keys = list(keys)

    @staticmethod
    def medium() -> str:
        return "STORAGE"

    def __repr__(self) -> str:
        return f"FsLoadStoreSpec({len(self.keys)} keys)"


def _layout_fields(config: OffloadingConfig, blocks_per_chunk: int) -> dict[str, Any]:
    p = config.parallel
    return {
        "model_name": config.model.name,
        "tokens_per_hash": config.cache.tokens_per_hash,
        "blocks_per_file": blocks_per_chunk,
        "tp_size": p.tp_size,
        "pp_size": p.pp_size,
        "pcp_size": p.pcp_size,
        "dcp_size": p.dcp_size,
        "dtype": str(config.model.dtype).removeprefix("torch."),
        "kv_cache_groups": [
            {"tokens_per_block": g.tokens_per_block, "layer_names": list(g.layer_names)}
            for g in config.groups
        ],
        "inference_engine": "vllm",
        "parallel_agnostic": False,
        "kv_cache_layout": config.kv_cache_layout,
        "file_format": FILE_FORMAT,
    }


class LlmdFsOffloadingSpec(OffloadingSpec):
    """llmd's shared-filesystem KV tier; see the module docstring."""

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        return {
            name: OffloadingCounterMetadata(documentation=doc, labelnames=labels)
            for name, (doc, labels) in COUNTERS.items()
        }

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        self.settings = FsOffloadSettings.from_extra_config(self.extra_config)
        if len(config.groups) != 1:
            raise FsOffloadConfigError(
                f"llmd-fs-offload supports models with one KV-cache group; this one has "
                f"{len(config.groups)} (hybrid attention): vLLM cannot recompute single failed "
                "blocks of such models, so a bad file could not be refused safely"
            )
        self.fields = _layout_fields(config, self.blocks_per_chunk)
        self.fail_closed = False
        """Set by `LlmdFsConnector`, which passes failed loads on to vLLM."""
        self._manager: FsOffloadingManager | None = None
        self._worker: FsOffloadingWorker | None = None

    def layout(self, rank: int, block_bytes: tuple[int, ...] = ()) -> StorageLayout:
        return StorageLayout(Path(self.settings.root), self.fields, rank, block_bytes)

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = FsOffloadingManager(self)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if not self.fail_closed:
            raise FsOffloadConfigError(
                "llmd-fs-offload must run under kv_connector 'LlmdFsConnector' "
                "(kv_connector_module_path 'llmd.fs_offload.connector'): vLLM's "
                "OffloadingConnector cannot report a failed load, and llmd does not serve KV it "
                "could not verify"
            )
        if self._worker is None:
            self._worker = FsOffloadingWorker(self, kv_caches)
        return self._worker


class SharedStorageOffloadingSpec(LlmdFsOffloadingSpec):
    """llm-d's FS backend spec name, for configurations that switch to llmd."""


# -- scheduler side ---------------------------------------------------------------------------


class FsOffloadingManager(OffloadingManager):
    """Lookups are file existence checks on a small thread pool, remembered for
    `lookup_cache_ms`. A lookup waits for its answer only while the step's
    `lookup_sync_budget_ms` lasts; after that it answers RETRY (vLLM asks again next step) and,
    once the check has taken `lookup_timeout_ms`, MISS: a slow or hung filesystem delays no
    scheduler step by more than the budget. A remembered HIT whose file has gone since is
    refused at load time and recomputed, never served."""

    def __init__(self, spec: LlmdFsOffloadingSpec) -> None:
        self.spec = spec
        self.settings = spec.settings
        self.layout = spec.layout(rank=0)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.settings.lookup_threads, thread_name_prefix="llmd-fs-lookup"
        )
        self._pending: dict[bytes, tuple[concurrent.futures.Future[bool], float]] = {}
        self._known: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._budget = self.settings.lookup_sync_budget_s
        self._events = spec.kv_events_config.enable_kv_cache_events
        self._store_checks: deque[concurrent.futures.Future[list[OffloadKey]]] = deque()
        self._stats = OffloadingConnectorStats()
        self._ownership = (
            f"fs:{self.settings.storage_domain}" if self.settings.storage_domain else None
        )

    def _exists(self, key: bytes) -> bool:
        try:
            return os.stat(self.layout.path(key)).st_size > 0
        except FileNotFoundError:
            return False

    def _answer(self, key: bytes, hit: bool, now: float) -> LookupResult:
        self._known[key] = (hit, now)
        self._known.move_to_end(key)
        if len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)
        self._stats.increase_counter(M_LOOKUPS, 1, ("hit" if hit else "miss",))
        return LookupResult.HIT if hit else LookupResult.MISS

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        now = time.monotonic()
        known = self._known.get(key)
        if known is not None and now - known[1] < self.settings.lookup_cache_s:
            return LookupResult.HIT if known[0] else LookupResult.MISS
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= MAX_PENDING_LOOKUPS:
                self._stats.increase_counter(M_LOOKUP_TIMEOUTS)
                return self._answer(key, False, now)
            entry = (self._pool.submit(self._exists, key), now)
            self._pending[key] = entry
        future, submitted = entry
        if not future.done() and self._budget > 0:
            concurrent.futures.wait([future], timeout=self._budget)
            self._budget -= time.monotonic() - now
        if future.done():
            del self._pending[key]
            try:
                hit = future.result()
            except OSError as exc:
                log.warning("llmd-fs-offload: lookup of %s failed: %s", self.layout.path(key), exc)
                hit = False
            return self._answer(key, hit, now)
        if now - submitted > self.settings.lookup_timeout_s:
            del self._pending[key]
            self._stats.increase_counter(M_LOOKUP_TIMEOUTS)
            return self._answer(key, False, now)
        self._stats.increase_counter(M_LOOKUPS, 1, ("retry",))
        return LookupResult.RETRY

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        return FsLoadStoreSpec(list(keys))

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        # Every chunk is offered to the worker, which skips files that exist; keeping the keys
        # contiguous keeps the engine blocks of each chunk unambiguous.
        keys = list(keys)
        return PrepareStoreOutput(
            keys_to_store=keys, store_spec=FsLoadStoreSpec(keys), evicted_keys=[]
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        keys = list(keys)
        for key in keys:
            self._known.pop(key, None)
        if self._events and keys:
            self._store_checks.append(self._pool.submit(self._existing, keys))

    def _existing(self, keys: list[OffloadKey]) -> list[OffloadKey]:
        return [k for k in keys if self._exists(k)]

    def take_events(self) -> Iterable[OffloadingEvent]:
        while self._store_checks and self._store_checks[0].done():
            try:
                stored = self._store_checks.popleft().result()
            except OSError as exc:
                log.warning("llmd-fs-offload: checking stored files failed: %s", exc)
                continue
            if stored:
                yield OffloadingEvent(
                    keys=stored, medium=Medium.STORAGE, removed=False, ownership=self._ownership
                )

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._budget = self.settings.lookup_sync_budget_s

    def has_pending_work(self) -> bool:
        return bool(self._store_checks)

    def get_stats(self) -> OffloadingConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, OffloadingConnectorStats()
        return stats

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- worker side ------------------------------------------------------------------------------


def group_parts(kv_caches: CanonicalKVCaches) -> list[list[tuple[torch.Tensor, int]]]:
    """Per KV-cache group, its distinct (tensor, unpadded page bytes): layers that alias one
    tensor share their bytes, so each tensor is stored once."""
    groups = []
    for refs in kv_caches.group_data_refs:
        seen: set[int] = set()
        parts = []
        for ref in refs:
            if ref.tensor_idx not in seen:
                seen.add(ref.tensor_idx)
                parts.append((kv_caches.tensors[ref.tensor_idx].tensor, ref.page_size_bytes))
        groups.append(parts)
    return groups


def split_chunks(
    keys: Sequence[bytes], spec: GPULoadStoreSpec, blocks_per_chunk: int
) -> list[Chunk]:
    """The files of a transfer: each group's engine blocks cut at chunk boundaries, in order,
    one offload key per piece (a key's last 4 bytes name its group)."""
    by_group: dict[int, list[bytes]] = {}
    for key in keys:
        by_group.setdefault(int.from_bytes(key[-GROUP_BYTES:], "big"), []).append(key)
    block_ids = spec.block_ids.tolist()
    sizes = list(spec.group_sizes) if spec.group_sizes is not None else [len(block_ids)]
    chunks: list[Chunk] = []
    pos = 0
    for group, size in enumerate(sizes):
        blocks = block_ids[pos : pos + size]
        pos += size
        logical = spec.block_indices[group] if size else 0
        used = 0
        for key in by_group.get(group, []):
            first = logical % blocks_per_chunk
            take = min(blocks_per_chunk - first, size - used)
            if take <= 0:
                raise ValueError(f"group {group}: more keys than chunks for {size} blocks")
            chunks.append(
                Chunk(key=key, group=group, block_ids=blocks[used : used + take], first=first)
            )
            used += take
            logical += take
        if used != size:
            raise ValueError(f"group {group}: {size} blocks but the keys cover {used}")
    return chunks


class FsOffloadingWorker(OffloadingWorker):
    def __init__(self, spec: LlmdFsOffloadingSpec, kv_caches: CanonicalKVCaches) -> None:
        self.spec = spec
        self.pages = TorchPages(
            group_parts(kv_caches), spec.blocks_per_chunk, copy=spec.settings.gpu_copy
        )
        layout = spec.layout(spec.config.parallel.rank, self.pages.sizes)
        self.engine = IOEngine(
            layout, self.pages, spec.settings, max_chunk_blocks=spec.blocks_per_chunk
        )
        self._load_errors: set[int] = set()

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        assert isinstance(dst_spec, FsLoadStoreSpec)
        try:
            chunks = split_chunks(dst_spec.keys, src_spec, self.spec.blocks_per_chunk)
        except ValueError as exc:  # never crash the engine: this store is a future miss
            log.error("llmd-fs-offload: store job %d not written: %s", job_id, exc)
            self.engine.fail_job(job_id, is_load=False, block_ids=[])
            return True
        self.engine.submit_store(job_id, chunks)
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, FsLoadStoreSpec)
        try:
            chunks = split_chunks(src_spec.keys, dst_spec, self.spec.blocks_per_chunk)
        except ValueError as exc:  # never guess which file feeds which block: recompute them
            log.error("llmd-fs-offload: load job %d refused: %s", job_id, exc)
            self.engine.fail_job(job_id, is_load=True, block_ids=dst_spec.block_ids.tolist())
            return True
        self.engine.submit_load(job_id, chunks)
        return True

    def get_finished(self) -> list[TransferResult]:
        results = []
        for r in self.engine.get_finished():
            # A failed load still completes: its blocks go to vLLM as load errors in the same
            # step (LlmdFsConnector.get_block_ids_with_load_errors), and vLLM recomputes them.
            if r.is_load:  # a failed store is a future miss; its blocks are fine
                self._load_errors.update(r.failed_block_ids)
            results.append(TransferResult(r.job_id, True, r.num_bytes, r.seconds))
        return results

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> OffloadingConnectorStats | None:
        stats = OffloadingConnectorStats()
        for (name, label), value in self.engine.take_counter_deltas().items():
            metric = ENGINE_COUNTERS.get(name)
            if metric is not None:
                stats.increase_counter(metric, value, (label,) if COUNTERS[metric][1] else ())
        return None if stats.is_empty() else stats

    def wait(self, job_ids: set[int]) -> None:
        self.engine.wait(job_ids)

    def shutdown(self) -> None:
        self.engine.shutdown()
