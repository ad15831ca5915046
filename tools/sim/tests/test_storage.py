"""The simulated shared volume: bandwidth pipes, the write queue, visibility of stored blocks."""

from __future__ import annotations

import pytest

from llmd.sim.storage import StorageConfig, StorageTier

BS = 16
BLOCK_BYTES = BS * 1000  # kv_bytes_per_token=1000 below


def tier(**kw: object) -> StorageTier:
    cfg = StorageConfig.model_validate(
        {"domain": "d", "kv_bytes_per_token": 1000, "latency_ms": 0, **kw}
    )
    return StorageTier(cfg, BS)


def blocks(*names: int) -> list[bytes]:
    return [n.to_bytes(4, "big") for n in names]


def test_loads_on_one_link_queue_behind_each_other() -> None:
    t = tier(read_gbps=1e-3)  # 1 MB/s: one 16 kB block takes 16 ms
    done1, link = t.load_done(1, now=0.0, link_free_at=0.0)
    assert done1 == pytest.approx(0.016)
    done2, link = t.load_done(1, now=0.0, link_free_at=link)
    assert done2 == pytest.approx(0.032), "the second load waits for the link"
    done3, _ = t.load_done(1, now=1.0, link_free_at=link)
    assert done3 == pytest.approx(1.016), "an idle link starts at once"


def test_the_volume_read_limit_is_shared_by_every_engine() -> None:
    t = tier(read_gbps=1.0, volume_read_gbps=1e-3)
    a, _ = t.load_done(1, now=0.0, link_free_at=0.0)  # engine A's own link
    b, _ = t.load_done(1, now=0.0, link_free_at=0.0)  # engine B's own link
    assert a == pytest.approx(0.016)
    assert b == pytest.approx(0.032), "B's link is idle but the volume is busy with A's load"


def test_a_stored_block_is_found_once_its_write_has_finished() -> None:
    t = tier(write_gbps=1e-3)
    res = t.store(blocks(1, 2), now=0.0)
    assert res.stored == blocks(1, 2)
    assert res.done == pytest.approx(0.032)
    assert t.consecutive(blocks(1, 2), 0, 2, now=0.01) == 0, "still being written"
    assert t.consecutive(blocks(1, 2), 0, 2, now=0.04) == 2
    assert t.written(blocks(1)[0], res.done)


def test_a_store_queued_past_the_limit_is_dropped_and_counted() -> None:
    t = tier(write_gbps=1e-3, max_write_queued_s=0.02)
    first = t.store(blocks(1, 2), now=0.0)  # busy until 32 ms
    late = t.store(blocks(3), now=0.0, link_free_at=first.done)
    assert late.dropped
    assert not late.stored
    assert t.dropped_stores == 1
    assert t.consecutive(blocks(3), 0, 1, now=10.0) == 0
    ok = t.store(blocks(3), now=0.02, link_free_at=first.done)  # waits 12 ms: within the limit
    assert not ok.dropped
    assert ok.stored == blocks(3)


def test_the_volume_write_limit_is_shared_and_unannounced_blocks_are_evicted_silently() -> None:
    t = tier(write_gbps=1.0, volume_write_gbps=1e-3, capacity_tokens=2 * BS)
    a = t.store(blocks(1), now=0.0)
    b = t.store(blocks(2), now=0.0)
    assert b.done == pytest.approx(a.done + 0.016), "the second engine's write waits"
    c = t.store(blocks(3), now=0.001)  # evicts block 1, whose write is still running
    assert c.evicted == [], "a block never announced is not announced as removed"
    assert not t.written(blocks(1)[0], a.done)
    d = t.store(blocks(4), now=10.0)  # evicts block 2, written long ago
    assert d.evicted == blocks(2)


def test_a_volume_in_a_directory_is_shared_by_processes(tmp_path: object) -> None:
    """Two tiers on one directory stand for two engine processes: each sees the other's stored
    blocks once their write has finished, and an eviction by one is seen by both."""
    a = tier(dir=str(tmp_path), capacity_tokens=3 * BS, write_gbps=1e-3)
    b = tier(dir=str(tmp_path), capacity_tokens=3 * BS, write_gbps=1e-3)
    try:
        res = a.store(blocks(1, 2), now=0.0)
        assert res.done == pytest.approx(0.032)
        assert b.consecutive(blocks(1, 2), 0, 2, now=0.01) == 0, "not written yet"
        assert b.consecutive(blocks(1, 2), 0, 2, now=0.05) == 2
        res = b.store(blocks(3, 4), now=1.0)  # the volume holds 3 blocks: 1 goes
        assert res.evicted == blocks(1)
        assert a.consecutive(blocks(1, 2), 0, 2, now=2.0) == 0, "B's eviction is seen by A"
        assert a.consecutive(blocks(2, 3, 4), 0, 3, now=2.0) == 3
        c = tier(dir=str(tmp_path), capacity_tokens=3 * BS)  # a process started later
        assert c.consecutive(blocks(2, 3, 4), 0, 3, now=2.0) == 3
        c.close()
    finally:
        a.close()
        b.close()
