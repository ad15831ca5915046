"""`kv_connector_extra_config` of the llmd FS tier: llm-d's FS backend keys plus llmd's own.

Every key is checked when vLLM starts; a wrong value or a key naming a feature llmd lacks (GDS,
the object-store backend) stops the engine with a message naming the key, never a traceback from
deep inside a worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmd.fs_offload.fileformat import xxh3_available

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/tmp/shared-kv"

# Keys vLLM itself reads from kv_connector_extra_config for any OffloadingSpec.
VLLM_KEYS = frozenset(
    {
        "spec_name",
        "spec_module_path",
        "block_size",
        "blocks_per_chunk",
        "offload_prompt_only",
        "self_describing_kv_events",
        "canonical_layout",
    }
)
LLMD_FS_BACKEND_KEYS = frozenset(
    {
        "shared_storage_path",
        "threads_per_gpu",
        "max_staging_memory_gb",
        "read_preferring_ratio",
        "max_write_queued_seconds",
        "gds_mode",
        "backend",
        "enable_events",
        "storage_events_endpoint",
        "storage_medium",
        "storage_events_hwm",
    }
)
OUR_KEYS = frozenset(
    {
        "checksum",
        "o_direct",
        "fsync",
        "storage_domain",
        "on_corrupt",
        "lookup_timeout_ms",
        "lookup_cache_ms",
        "lookup_sync_budget_ms",
        "lookup_threads",
        "gpu_copy",
    }
)


class FsOffloadConfigError(ValueError):
    """A bad `kv_connector_extra_config` for the llmd FS tier."""


@dataclass(frozen=True)
class FsOffloadSettings:
    root: str = DEFAULT_ROOT
    threads: int = 64
    max_staging_bytes: int = 150 << 30
    read_preferring_ratio: float = 0.75
    max_write_queued_s: float = 30.0
    checksum: str = "crc32"
    o_direct: str = "auto"
    fsync: str = "none"
    storage_domain: str = ""
    on_corrupt: str = "delete"
    lookup_timeout_s: float = 0.5
    lookup_cache_s: float = 1.0
    lookup_sync_budget_s: float = 0.002
    lookup_threads: int = 4
    gpu_copy: str = "auto"

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any]) -> FsOffloadSettings:
        unknown = sorted(set(extra) - VLLM_KEYS - LLMD_FS_BACKEND_KEYS - OUR_KEYS)
        if unknown:
            raise FsOffloadConfigError(
                f"kv_connector_extra_config: unknown key(s) {unknown} for the llmd FS tier; "
                f"known: {sorted(LLMD_FS_BACKEND_KEYS | OUR_KEYS)} and vLLM's {sorted(VLLM_KEYS)}"
            )
        gds = str(extra.get("gds_mode", "disabled"))
        if gds != "disabled":
            raise FsOffloadConfigError(
                f"kv_connector_extra_config.gds_mode={gds!r}: GPUDirect Storage is not "
                "supported by llmd-fs-offload; use 'disabled' (staged copies)"
            )
        backend = str(extra.get("backend", "POSIX"))
        if backend != "POSIX":
            raise FsOffloadConfigError(
                f"kv_connector_extra_config.backend={backend!r}: only 'POSIX' (a mounted "
                "filesystem) is supported by llmd-fs-offload; the object-store backend is not"
            )
        for key in ("enable_events", "storage_events_endpoint", "storage_events_hwm"):
            if key in extra:
                log.warning(
                    "kv_connector_extra_config.%s is ignored: llmd-fs-offload publishes its "
                    "BlockStored events through vLLM's own KV-event stream (--kv-events-config) "
                    "with medium STORAGE",
                    key,
                )
        if str(extra.get("storage_medium", "STORAGE")) not in ("STORAGE", "SHARED_STORAGE"):
            raise FsOffloadConfigError(
                "kv_connector_extra_config.storage_medium: events use vLLM's medium 'STORAGE'"
            )
        cpus = os.cpu_count() or 1
        settings = cls(
            root=str(extra.get("shared_storage_path", DEFAULT_ROOT)),
            threads=min(_int(extra, "threads_per_gpu", 64, low=1), cpus),
            max_staging_bytes=int(_num(extra, "max_staging_memory_gb", 150.0, low=0.001) * 2**30),
            read_preferring_ratio=_num(extra, "read_preferring_ratio", 0.75, low=0.0, high=1.0),
            max_write_queued_s=_num(extra, "max_write_queued_seconds", 30.0, low=0.0),
            checksum=_choice(extra, "checksum", "crc32", ("crc32", "xxh3", "none")),
            o_direct=_choice(extra, "o_direct", "auto", ("auto", "on", "off")),
            fsync=_choice(extra, "fsync", "none", ("none", "file", "dir")),
            storage_domain=str(extra.get("storage_domain", "")),
            on_corrupt=_choice(extra, "on_corrupt", "delete", ("delete", "quarantine")),
            lookup_timeout_s=_num(extra, "lookup_timeout_ms", 500.0, low=1.0) / 1000,
            lookup_cache_s=_num(extra, "lookup_cache_ms", 1000.0, low=0.0) / 1000,
            lookup_sync_budget_s=_num(extra, "lookup_sync_budget_ms", 2.0, low=0.0) / 1000,
            lookup_threads=_int(extra, "lookup_threads", 4, low=1),
            gpu_copy=_choice(extra, "gpu_copy", "auto", ("auto", "dma", "kernels")),
        )
        if settings.checksum == "xxh3" and not xxh3_available():
            raise FsOffloadConfigError(
                "kv_connector_extra_config.checksum='xxh3' needs the xxhash package in vLLM's "
                "environment; install it or use 'crc32'"
            )
        if not settings.root:
            raise FsOffloadConfigError("kv_connector_extra_config.shared_storage_path is empty")
        return settings


def _num(
    extra: Mapping[str, Any], key: str, default: float, *, low: float, high: float | None = None
) -> float:
    raw = extra.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise FsOffloadConfigError(
            f"kv_connector_extra_config.{key}={raw!r} is not a number"
        ) from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise FsOffloadConfigError(f"kv_connector_extra_config.{key}={raw!r} must be {bound}")
    return value


def _int(extra: Mapping[str, Any], key: str, default: int, *, low: int) -> int:
    value = _num(extra, key, default, low=low)
    if value != int(value):
        raise FsOffloadConfigError(
            f"kv_connector_extra_config.{key}={value} must be a whole number"
        )
    return int(value)


def _choice(extra: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = str(extra.get(key, default))
    if value not in allowed:
        raise FsOffloadConfigError(
            f"kv_connector_extra_config.{key}={value!r}: one of {list(allowed)}"
        )
    return value
