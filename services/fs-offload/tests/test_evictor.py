"""The evictor on real files: LRU order, watermarks, files in use, dry runs, BlockRemoved."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from llmd.fs_offload.evictor import Evictor
from llmd.fs_offload.evictor_service import EvictorApp, EvictorConfig, build
from llmd.fs_offload.layout import StorageLayout, event_hash, make_key
from llmd.protocol.kv_events import BlockRemoved, decode_batch
from llmd.runtime.config import ConfigError
from llmd.vllm_cpu.server import free_port

SIZE = 64 * 1024
NOW = time.time()


def populate(root: Path, n: int) -> list[tuple[bytes, str]]:
    """`n` chunk files of SIZE bytes, file i last used i minutes after the oldest (2h ago)."""
    layout = StorageLayout(root, {"model_name": "org/m"}, rank=0, block_bytes=(SIZE,))
    layout.write_config()
    out = []
    for i in range(n):
        block_hash = (i + 1).to_bytes(32, "big")
        path = layout.path(make_key(block_hash, 0))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(SIZE))
        t = NOW - 7200 + 60 * i
        os.utime(path, (t, t))
        out.append((block_hash, path))
    return out


def test_below_the_high_watermark_nothing_is_touched(tmp_path: Path) -> None:
    files = populate(tmp_path, 10)
    report = Evictor(str(tmp_path), capacity_bytes=21 * SIZE).run_once()
    assert report.usage_before == pytest.approx(0.5, abs=0.05)
    assert report.removed == []
    assert all(os.path.exists(p) for _, p in files)


def test_oldest_files_go_first_down_to_the_low_watermark(tmp_path: Path) -> None:
    files = populate(tmp_path, 20)
    report = Evictor(str(tmp_path), capacity_bytes=21 * SIZE, high=0.85, low=0.70).run_once()
    assert report.usage_before >= 0.95
    assert report.usage_after <= 0.70
    removed = {r.block_hash for r in report.removed}
    assert removed == {h for h, _ in files[: len(removed)]}, "only the least recently used"
    assert len(removed) == 6
    assert all(not os.path.exists(p) for _, p in files[:6])
    assert all(os.path.exists(p) for _, p in files[6:])
    assert {r.model for r in report.removed} == {"org/m"}


def test_files_in_use_and_recent_files_are_kept(tmp_path: Path) -> None:
    files = populate(tmp_path, 20)
    busy = os.open(files[0][1], os.O_RDONLY)
    fcntl.flock(busy, fcntl.LOCK_SH)  # what the tier's reader holds while it reads
    try:
        report = Evictor(
            str(tmp_path), capacity_bytes=21 * SIZE, min_age_s=7200 - 60 * 3, clock=lambda: NOW
        ).run_once()
    finally:
        os.close(busy)
    assert os.path.exists(files[0][1]), "a file being read is never removed"
    assert report.skipped_in_use == 1
    # files 1..3 are old enough; file 4 on was used within min_age
    assert [r.block_hash for r in report.removed] == [h for h, _ in files[1:4]]
    assert report.skipped_recent == 16


def test_dry_run_removes_nothing(tmp_path: Path) -> None:
    files = populate(tmp_path, 20)
    report = Evictor(str(tmp_path), capacity_bytes=21 * SIZE, dry_run=True).run_once()
    assert len(report.removed) == 6
    assert all(os.path.exists(p) for _, p in files)


def test_stale_temp_files_are_cleared(tmp_path: Path) -> None:
    populate(tmp_path, 20)
    stale = tmp_path / "x.bin.123abc.tmp"
    stale.write_bytes(b"x" * SIZE)
    os.utime(stale, (NOW - 7200, NOW - 7200))
    fresh = tmp_path / "y.bin.456def.tmp"
    fresh.write_bytes(b"y")
    report = Evictor(str(tmp_path), capacity_bytes=21 * SIZE).run_once()
    assert report.stale_temps_removed == 1
    assert not stale.exists()
    assert fresh.exists()


def test_filesystem_usage_mode(tmp_path: Path) -> None:
    populate(tmp_path, 4)
    ev = Evictor(str(tmp_path), usage=lambda root: (90 * SIZE, 100 * SIZE))
    report = ev.run_once()
    assert report.usage_before == 0.9
    assert len(report.removed) == 4


def test_config_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="root"):
        build(EvictorConfig())
    with pytest.raises(ConfigError, match="low_watermark"):
        build(EvictorConfig(root=str(tmp_path), high_watermark=0.5, low_watermark=0.6))
    with pytest.raises(ConfigError, match="model"):
        build(EvictorConfig(root=str(tmp_path), kv_events_endpoint="tcp://*:5557"))


async def test_the_service_publishes_block_removed_for_what_it_removed(tmp_path: Path) -> None:
    files = populate(tmp_path, 20)
    port = free_port()
    config = EvictorConfig(
        root=str(tmp_path),
        capacity_bytes=21 * SIZE,
        http_port=0,
        host="127.0.0.1",
        interval=3600,
        kv_events_endpoint=f"tcp://127.0.0.1:{port}",
        model="tiny",
        storage_domain="vol-a",
    )
    config = EvictorConfig.model_validate(
        {**config.model_dump(), "kv_events_endpoint": f"tcp://*:{port}"}
    )
    app = build(config)
    assert isinstance(app, EvictorApp)
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        await app.start()  # the first pass runs at once; publish again after the subscriber joined
        await asyncio.sleep(0.5)
        assert app.last is not None
        assert len(app.last.removed) == 6
        app.publish(app.last)
        topic, _seq, payload = await asyncio.wait_for(sub.recv_multipart(), 10)
        assert topic == b"kv@llmd-fs-evictor@tiny"
        (event,) = decode_batch(payload).events
        assert isinstance(event, BlockRemoved)
        assert event.medium == "STORAGE"
        assert event.ownership == "fs:vol-a"
        assert event.group_idx == 0
        assert sorted(event.block_hashes) == sorted(event_hash(h) for h, _ in files[:6])
        assert app.health.ready
    finally:
        await app.stop()
        sub.close(linger=0)
        ctx.term()
