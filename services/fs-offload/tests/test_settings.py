from __future__ import annotations

import pytest

from llmd.fs_offload.settings import FsOffloadConfigError, FsOffloadSettings


def test_llm_d_keys_are_accepted() -> None:
    s = FsOffloadSettings.from_extra_config(
        {
            "spec_name": "SharedStorageOffloadingSpec",
            "spec_module_path": "llmd.fs_offload.spec",
            "shared_storage_path": "/mnt/kv",
            "block_size": 256,
            "threads_per_gpu": "1",
            "max_staging_memory_gb": 2,
            "read_preferring_ratio": 0.5,
            "max_write_queued_seconds": 0,
        }
    )
    assert s.root == "/mnt/kv"
    assert s.threads == 1
    assert s.max_staging_bytes == 2 << 30
    assert s.read_preferring_ratio == 0.5
    assert s.max_write_queued_s == 0
    assert s.checksum
    assert s.o_direct == "auto"
    assert s.fsync == "none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"gds_mode": "read_write"}, "gds_mode"),
        ({"backend": "OBJ"}, "backend"),
        ({"threads_per_gpu": 0}, "threads_per_gpu"),
        ({"threads_per_gpu": "many"}, "not a number"),
        ({"read_preferring_ratio": 2}, "read_preferring_ratio"),
        ({"fsync": "always"}, "fsync"),
        ({"checksum": "md5"}, "checksum"),
        ({"bogus_key": 1}, "bogus_key"),
        ({"shared_storage_path": ""}, "shared_storage_path"),
    ],
)
def test_bad_or_unsupported_keys_are_named(extra: dict[str, object], message: str) -> None:
    with pytest.raises(FsOffloadConfigError, match=message):
        FsOffloadSettings.from_extra_config(extra)
