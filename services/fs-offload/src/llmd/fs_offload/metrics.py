"""The FS tier's own metrics on vLLM's `/metrics` (counters; prometheus_client adds `_total`).

Defined here, without vLLM, so that dashboards and their tests can name them; `spec.py` turns
them into vLLM's offloading metric definitions. vLLM adds its `engine` and `model_name` labels.
"""

from __future__ import annotations

M_LOOKUPS = "llmd_fs_offload_lookups"
M_LOOKUP_TIMEOUTS = "llmd_fs_offload_lookup_timeouts"
M_LOAD_FAILURES = "llmd_fs_offload_load_failures"
M_STORE_FAILURES = "llmd_fs_offload_store_failures"
M_STORES_DROPPED = "llmd_fs_offload_stores_dropped"
M_STORES_SKIPPED = "llmd_fs_offload_stores_skipped_existing"
M_FILES_REMOVED = "llmd_fs_offload_corrupt_files_removed"

VLLM_LABELS = ("engine", "model_name")

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    M_LOOKUPS: ("FS tier lookups by result (hit, miss, retry).", ("result",)),
    M_LOOKUP_TIMEOUTS: ("FS tier lookups past lookup_timeout_ms, counted as misses.", ()),
    M_LOAD_FAILURES: (
        "Chunk loads refused and recomputed, by reason (missing, truncated, checksum, "
        "fingerprint, key, io, ...).",
        ("reason",),
    ),
    M_STORE_FAILURES: (
        "Chunk stores that failed, by errno name (the chunk is not cached).",
        ("reason",),
    ),
    M_STORES_DROPPED: ("Chunk stores dropped by write back-pressure.", ()),
    M_STORES_SKIPPED: ("Chunk stores skipped: the file existed (its access time refreshed).", ()),
    M_FILES_REMOVED: ("Corrupt or foreign files deleted or quarantined after a failed load.", ()),
}
"""name -> (documentation, label names beyond vLLM's)."""

ENGINE_COUNTERS = {
    "load_failures_total": M_LOAD_FAILURES,
    "store_failures_total": M_STORE_FAILURES,
    "stores_dropped_total": M_STORES_DROPPED,
    "stores_skipped_existing_total": M_STORES_SKIPPED,
    "files_deleted_total": M_FILES_REMOVED,
    "files_quarantined_total": M_FILES_REMOVED,
}
"""The I/O engine's counter -> the exported metric it feeds."""


def exported_samples() -> dict[str, frozenset[str]]:
    """Sample name -> label names, as vLLM's /metrics shows them."""
    return {
        f"{name}_total": frozenset(VLLM_LABELS + labels) for name, (_, labels) in COUNTERS.items()
    }
