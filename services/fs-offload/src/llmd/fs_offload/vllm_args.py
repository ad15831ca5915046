"""The vLLM command-line arguments that turn the llmd FS tier on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPEC_MODULE = "llmd.fs_offload.spec"
CONNECTOR_MODULE = "llmd.fs_offload.connector"


def kv_transfer_config(
    root: str | Path, *, block_size: int = 256, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`--kv-transfer-config` for vLLM 0.32: files of `block_size` tokens under `root`."""
    return {
        "kv_connector": "LlmdFsConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "spec_name": "LlmdFsOffloadingSpec",
            "spec_module_path": SPEC_MODULE,
            "shared_storage_path": str(root),
            "block_size": block_size,
            # name every block of a stored chunk in its BlockStored, not only the last one, so
            # an index sees the chunk's whole prefix on the storage tier
            "self_describing_kv_events": True,
            **(extra or {}),
        },
    }


def vllm_args(
    root: str | Path, *, block_size: int = 256, extra: Mapping[str, Any] | None = None
) -> list[str]:
    return [
        "--kv-transfer-config",
        json.dumps(kv_transfer_config(root, block_size=block_size, extra=extra)),
    ]
