"""`LlmdFsConnector`: vLLM's OffloadingConnector, plus what a tier that can fail needs.

vLLM 0.32's OffloadingConnector asserts that every transfer succeeds, so a backend under it can
either crash the engine or report a bad load as good. This subclass lets the llmd FS tier report
the engine blocks of a refused chunk through `get_block_ids_with_load_errors`; with
`kv_load_failure_policy: "recompute"` vLLM then recomputes them (with vLLM's default, `"fail"`,
the request fails instead: wrong KV is never used either way). It also forwards the tier's
worker-side counters (load failures by reason, dropped stores) to vLLM's `/metrics`.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector

from llmd.fs_offload.spec import FsOffloadingWorker, LlmdFsOffloadingSpec

log = logging.getLogger("llmd.fs_offload")


class LlmdFsConnector(OffloadingConnector):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        side = self.connector_worker or self.connector_scheduler
        spec = getattr(side, "spec", None)
        if isinstance(spec, LlmdFsOffloadingSpec):
            spec.fail_closed = True
        policy = vllm_config.kv_transfer_config.kv_load_failure_policy
        if role == KVConnectorRole.SCHEDULER and policy != "recompute":
            log.warning(
                "llmd-fs-offload: kv_load_failure_policy is %r, so a request whose stored KV is "
                "refused (missing, truncated or corrupt file) fails; set it to 'recompute' to "
                "recompute those tokens instead",
                policy,
            )

    def _fs_worker(self) -> FsOffloadingWorker | None:
        worker = getattr(self.connector_worker, "worker", None)
        return worker if isinstance(worker, FsOffloadingWorker) else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        worker = self._fs_worker()
        return worker.take_load_errors() if worker is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.connector_scheduler is not None:
            return super().get_kv_connector_stats()
        worker = self._fs_worker()
        return worker.take_stats() if worker is not None else None
