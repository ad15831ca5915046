"""The I/O engine on real files, with pages held in a bytearray (no torch needed)."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from llmd.fs_offload.engine import Chunk, IOEngine, JobResult, probe_o_direct
from llmd.fs_offload.layout import StorageLayout, make_key
from llmd.fs_offload.settings import FsOffloadSettings

BB = 4096 + 512  # bytes per block (not a multiple of the alignment, on purpose)


class BytesPages:
    def __init__(self, num_blocks: int = 64) -> None:
        self.mem = bytearray(os.urandom(num_blocks * BB))
        self.gate: threading.Event | None = None
        self.registered = 0
        self.released = 0

    def block_bytes(self, group: int) -> int:
        return BB

    def gather(self, group: int, block_ids: Sequence[int], out: memoryview, token: object) -> None:
        if self.gate is not None:
            self.gate.wait()
        for i, b in enumerate(block_ids):
            out[i * BB : (i + 1) * BB] = self.mem[b * BB : (b + 1) * BB]

    def scatter(self, group: int, block_ids: Sequence[int], src: memoryview) -> None:
        for i, b in enumerate(block_ids):
            self.mem[b * BB : (b + 1) * BB] = src[i * BB : (i + 1) * BB]

    def store_token(self) -> object:
        return None

    def register_staging(self, buf: mmap.mmap) -> None:
        self.registered += 1

    def release_staging(self, buf: mmap.mmap) -> None:
        self.released += 1

    def block(self, b: int) -> bytes:
        return bytes(self.mem[b * BB : (b + 1) * BB])


def key(n: int) -> bytes:
    return make_key(n.to_bytes(32, "big"), 0)


def layout(root: Path) -> StorageLayout:
    return StorageLayout(root, {"model_name": "m"}, rank=0, block_bytes=(BB,))


@pytest.fixture
def pages() -> BytesPages:
    return BytesPages()


def make_engine(root: Path, pages: BytesPages, **settings: object) -> IOEngine:
    s = FsOffloadSettings(root=str(root), threads=2, **settings)  # type: ignore[arg-type]
    return IOEngine(layout(root), pages, s, max_chunk_blocks=4)


@pytest.fixture
def engine(tmp_path: Path, pages: BytesPages) -> Iterator[IOEngine]:
    e = make_engine(tmp_path, pages)
    yield e
    e.shutdown()


def finish(engine: IOEngine, job_id: int, timeout_s: float = 10) -> JobResult:
    deadline = time.monotonic() + timeout_s
    seen: list[JobResult] = []
    while time.monotonic() < deadline:
        seen += engine.get_finished()
        for r in seen:
            if r.job_id == job_id:
                return r
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} did not finish")


def test_store_then_load_into_other_blocks(engine: IOEngine, pages: BytesPages) -> None:
    engine.submit_store(1, [Chunk(key(1), 0, [0, 1, 2, 3], 0), Chunk(key(2), 0, [4, 5], 0)])
    stored = finish(engine, 1)
    assert stored.ok
    assert stored.num_bytes == 6 * BB
    engine.submit_load(2, [Chunk(key(1), 0, [10, 11, 12, 13], 0), Chunk(key(2), 0, [14, 15], 0)])
    loaded = finish(engine, 2)
    assert loaded.ok
    assert loaded.failed_block_ids == []
    for src, dst in zip([0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], strict=True):
        assert pages.block(dst) == pages.block(src)
    counters = engine.counters()
    assert counters[("stores_total", "")] == 2
    assert counters[("loads_total", "")] == 2
    for path in Path(engine.layout.rank_dir).rglob("*.bin"):
        assert path.stat().st_size % 4096 == 0


def test_xxh3_checksums_and_staging_buffers_released_at_shutdown(
    tmp_path: Path, pages: BytesPages
) -> None:
    engine = make_engine(tmp_path, pages, checksum="xxh3")
    engine.submit_store(1, [Chunk(key(1), 0, [0, 1], 0)])
    finish(engine, 1)
    engine.submit_load(2, [Chunk(key(1), 0, [8, 9], 0)])
    assert finish(engine, 2).ok
    assert pages.block(9) == pages.block(1)
    engine.shutdown()
    assert pages.registered == pages.released == 2


def test_a_suffix_of_a_chunk_loads_and_a_missing_head_is_refused(
    engine: IOEngine, pages: BytesPages
) -> None:
    engine.submit_store(1, [Chunk(key(7), 0, [20, 21, 22], 1)])  # chunk blocks 1..3
    assert finish(engine, 1).ok
    engine.submit_load(2, [Chunk(key(7), 0, [30, 31], 2)])  # needs chunk blocks 2..3
    assert finish(engine, 2).ok
    assert pages.block(30) == pages.block(21)
    assert pages.block(31) == pages.block(22)
    engine.submit_load(3, [Chunk(key(7), 0, [40, 41, 42, 43], 0)])
    refused = finish(engine, 3)
    assert not refused.ok
    assert refused.failed_block_ids == [40, 41, 42, 43]
    assert engine.counters()[("load_failures_total", "partial")] == 1


def test_an_existing_file_is_touched_not_rewritten(engine: IOEngine) -> None:
    engine.submit_store(1, [Chunk(key(3), 0, [0], 0)])
    finish(engine, 1)
    path = engine.layout.path(key(3))
    os.utime(path, (1_000_000, 1_000_000))
    inode = os.stat(path).st_ino
    engine.submit_store(2, [Chunk(key(3), 0, [0], 0)])
    finish(engine, 2)
    st = os.stat(path)
    assert st.st_ino == inode
    assert st.st_mtime > 1_000_000
    assert engine.counters()[("stores_skipped_existing_total", "")] == 1


@pytest.mark.parametrize("mode", ["delete", "quarantine"])
def test_bad_files_fail_their_blocks_only_and_are_removed(
    tmp_path: Path, pages: BytesPages, mode: str
) -> None:
    engine = make_engine(tmp_path, pages, on_corrupt=mode)
    try:
        engine.submit_store(1, [Chunk(key(1), 0, [0, 1], 0), Chunk(key(2), 0, [2, 3], 0)])
        finish(engine, 1)
        bad = Path(engine.layout.path(key(2)))
        data = bytearray(bad.read_bytes())
        data[5000] ^= 0xFF
        bad.write_bytes(bytes(data))
        before = pages.block(12)
        engine.submit_load(2, [Chunk(key(1), 0, [10, 11], 0), Chunk(key(2), 0, [12, 13], 0)])
        result = finish(engine, 2)
        assert not result.ok
        assert result.failed_block_ids == [12, 13]
        assert pages.block(10) == pages.block(0), "the good chunk still loads"
        assert pages.block(12) == before, "a refused chunk never touches the pages"
        assert not bad.exists()
        assert engine.counters()[("load_failures_total", "checksum")] == 1
        if mode == "quarantine":
            assert len(list((tmp_path / "quarantine").iterdir())) == 1
        engine.submit_load(3, [Chunk(key(2), 0, [12, 13], 0)])
        assert finish(engine, 3).failed_block_ids == [12, 13]
        assert engine.counters()[("load_failures_total", "missing")] == 1
    finally:
        engine.shutdown()


def test_a_file_of_another_layout_is_refused(tmp_path: Path, pages: BytesPages) -> None:
    engine = make_engine(tmp_path, pages)
    try:
        engine.submit_store(1, [Chunk(key(1), 0, [0], 0)])
        finish(engine, 1)
        path = engine.layout.path(key(1))
        os.rename(path, engine.layout.path(key(2)))  # right layout, wrong name
        engine.submit_load(2, [Chunk(key(2), 0, [5], 0)])
        assert not finish(engine, 2).ok
        assert engine.counters()[("load_failures_total", "key")] == 1
    finally:
        engine.shutdown()


def test_write_back_pressure_drops_stores_and_counts_them(
    tmp_path: Path, pages: BytesPages
) -> None:
    engine = make_engine(tmp_path, pages, max_write_queued_s=1e-9)
    try:
        engine.submit_store(1, [Chunk(key(1), 0, [0], 0)])  # measures the write speed
        finish(engine, 1)
        engine.submit_store(2, [Chunk(key(2), 0, [1], 0)])
        assert finish(engine, 2).ok, "a dropped store is not an error"
        assert not os.path.exists(engine.layout.path(key(2)))
        assert engine.counters()[("stores_dropped_total", "")] == 1
    finally:
        engine.shutdown()


def test_wait_abandons_queued_stores(tmp_path: Path, pages: BytesPages) -> None:
    engine = make_engine(tmp_path, pages)
    pages.gate = threading.Event()
    try:
        engine.submit_store(1, [Chunk(key(i), 0, [i], 0) for i in range(8)])
        time.sleep(0.1)  # both threads are now blocked in gather
        waiter = threading.Thread(target=engine.wait, args=({1},))
        waiter.start()
        time.sleep(0.1)
        pages.gate.set()
        waiter.join(10)
        assert not waiter.is_alive()
        abandoned = engine.counters().get(("stores_abandoned_total", ""), 0)
        assert abandoned == 6, "the two stores in flight finish, the six queued are abandoned"
    finally:
        pages.gate.set()
        engine.shutdown()


def test_loads_are_served_before_queued_stores(tmp_path: Path, pages: BytesPages) -> None:
    s = FsOffloadSettings(root=str(tmp_path), threads=1)
    engine = IOEngine(layout(tmp_path), pages, s, max_chunk_blocks=4)
    try:
        engine.submit_store(1, [Chunk(key(1), 0, [0], 0)])
        finish(engine, 1)
        pages.gate = threading.Event()
        engine.submit_store(2, [Chunk(key(100 + i), 0, [i], 0) for i in range(5)])
        time.sleep(0.05)  # the single thread holds the first store
        engine.submit_load(3, [Chunk(key(1), 0, [50], 0)])
        pages.gate.set()
        order = []
        deadline = time.monotonic() + 10
        while len(order) < 2 and time.monotonic() < deadline:
            order += [r.job_id for r in engine.get_finished()]
            time.sleep(0.001)
        assert order[0] == 3, f"the load finished after the stores: {order}"
    finally:
        pages.gate.set()
        engine.shutdown()


def test_o_direct_probe_and_buffered_mode(tmp_path: Path, pages: BytesPages) -> None:
    assert probe_o_direct(str(tmp_path)) is True  # ext4 here; an EINVAL filesystem gives False
    engine = make_engine(tmp_path, pages, o_direct="off")
    try:
        assert engine.o_direct is False
        engine.submit_store(1, [Chunk(key(1), 0, [0], 0)])
        finish(engine, 1)
        engine.submit_load(2, [Chunk(key(1), 0, [9], 0)])
        assert finish(engine, 2).ok
        assert pages.block(9) == pages.block(0)
    finally:
        engine.shutdown()


def test_a_job_that_cannot_be_submitted_fails_its_blocks(engine: IOEngine) -> None:
    engine.fail_job(7, is_load=True, block_ids=[3, 4])
    result = finish(engine, 7)
    assert not result.ok
    assert result.failed_block_ids == [3, 4]
    engine.fail_job(8, is_load=False, block_ids=[])
    assert finish(engine, 8).failed_block_ids == []
    assert engine.counters()[("internal_errors_total", "load")] == 1


def test_a_load_moves_the_lru_clock_of_a_file_not_touched_lately(engine: IOEngine) -> None:
    engine.submit_store(1, [Chunk(key(4), 0, [0], 0), Chunk(key(5), 0, [1], 0)])
    finish(engine, 1)
    old, fresh = engine.layout.path(key(4)), engine.layout.path(key(5))
    os.utime(old, (1_000_000, 1_000_000))
    fresh_mtime = os.stat(fresh).st_mtime_ns
    engine.submit_load(2, [Chunk(key(4), 0, [8], 0), Chunk(key(5), 0, [9], 0)])
    assert finish(engine, 2).ok
    assert os.stat(old).st_mtime > time.time() - 60, "an old file is touched by its load"
    assert os.stat(fresh).st_mtime_ns == fresh_mtime, "a file written just now is left alone"
