from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmd.fs_offload.fileformat import (
    CHECKSUM_CRC32,
    CHECKSUM_XXH3,
    HEADER_SIZE,
    CorruptFileError,
    FileHeader,
    check_file,
    decode_header,
    encode_header,
    file_size,
    payload_checksum,
)
from llmd.fs_offload.layout import StorageLayout, event_hash, make_key, parse_chunk_path, split_key

FP = bytes(range(32))
KEY = make_key(bytes.fromhex("ab" * 32), 0)


def _file(
    payload: bytes, *, first: int = 0, blocks: int = 2, key: bytes = KEY, kind: int = CHECKSUM_CRC32
) -> bytearray:
    buf = bytearray(file_size(len(payload)))
    buf[HEADER_SIZE : HEADER_SIZE + len(payload)] = payload
    header = FileHeader(
        FP,
        key,
        len(payload),
        payload_checksum(kind, payload),
        first,
        blocks,
        len(payload) // blocks,
        kind,
    )
    encode_header(memoryview(buf), header)
    return buf


def _check(buf: bytearray, **overrides: object) -> FileHeader:
    args: dict[str, object] = {
        "size": len(buf),
        "fingerprint": FP,
        "key": KEY,
        "block_bytes": 4096,
        "need_first": 0,
        "need_count": 2,
    }
    args.update(overrides)
    return check_file(memoryview(buf), **args)  # type: ignore[arg-type]


def test_a_written_file_reads_back() -> None:
    payload = os.urandom(8192)
    buf = _file(payload)
    assert len(buf) % 4096 == 0
    header = _check(buf)
    assert header.key == KEY
    assert header.num_blocks == 2
    assert header.checksum == payload_checksum(CHECKSUM_CRC32, payload)
    assert decode_header(bytes(buf[:HEADER_SIZE])) == header


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.__setitem__(HEADER_SIZE + 100, b[HEADER_SIZE + 100] ^ 1), "checksum"),
        (lambda b: b.__setitem__(0, 0), "magic"),
        (lambda b: b.__setitem__(20, b[20] ^ 1), "header-checksum"),
    ],
    ids=["payload-bit", "magic", "header-bit"],
)
def test_corruption_is_named(mutate: object, reason: str) -> None:
    buf = _file(os.urandom(8192))
    assert callable(mutate)
    mutate(buf)
    with pytest.raises(CorruptFileError) as err:
        _check(buf)
    assert err.value.reason == reason


def test_truncated_foreign_and_partial_files_are_refused() -> None:
    buf = _file(os.urandom(8192))
    with pytest.raises(CorruptFileError, match="truncated"):
        _check(buf[:-1], size=len(buf) - 1)
    with pytest.raises(CorruptFileError, match="short"):
        _check(buf[:100], size=100)
    with pytest.raises(CorruptFileError, match="fingerprint"):
        _check(buf, fingerprint=bytes(32))
    with pytest.raises(CorruptFileError, match="key"):
        _check(buf, key=make_key(bytes(32), 0))
    with pytest.raises(CorruptFileError, match="layout"):
        _check(buf, block_bytes=2048)
    with pytest.raises(CorruptFileError, match="partial"):
        _check(buf, need_first=1, need_count=2)
    # a suffix of the stored blocks is fine
    assert _check(buf, need_first=1, need_count=1).first_block == 0


def test_layout_follows_vllm_file_mapper_naming(tmp_path: Path) -> None:
    fields = {"model_name": "org/model", "tokens_per_hash": 16}
    layout = StorageLayout(tmp_path, fields, rank=1, block_bytes=(4096,))
    path = layout.path(make_key(bytes.fromhex("0123456789" + "ab" * 27), 3))
    rel = Path(path).relative_to(tmp_path)
    assert rel.parts[0] == f"org_model_{layout.digest}_r1"
    assert rel.parts[1:3] == ("012", "34_g3")
    assert parse_chunk_path(path) == (bytes.fromhex("0123456789" + "ab" * 27), 3)
    assert parse_chunk_path(path + ".1234.tmp") is None
    assert parse_chunk_path(str(tmp_path / "config.json")) is None
    layout.write_config()
    assert (layout.base / "config.json").is_file()
    assert split_key(make_key(b"\x01" * 32, 7)) == (b"\x01" * 32, 7)
    assert event_hash(bytes(24) + (5).to_bytes(8, "big")) == 5
    other = StorageLayout(tmp_path, {**fields, "dtype": "bfloat16"}, rank=1, block_bytes=(4096,))
    assert other.base != layout.base
    assert other.fingerprint != layout.fingerprint


def test_xxh3_checksums_and_a_reader_without_xxhash(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmd.fs_offload.fileformat as ff

    payload = os.urandom(8192)
    buf = _file(payload, kind=CHECKSUM_XXH3)
    assert _check(buf).checksum_kind == CHECKSUM_XXH3
    buf[HEADER_SIZE + 7] ^= 1
    with pytest.raises(CorruptFileError, match="checksum"):
        _check(buf)
    buf[HEADER_SIZE + 7] ^= 1
    monkeypatch.setattr(ff, "_xxh3", None)
    with pytest.raises(CorruptFileError) as err:
        _check(buf)
    assert err.value.reason == "unverifiable", "what cannot be checked is not served"


def test_xxh3_is_hashed_without_the_gil_and_equals_the_packages_value() -> None:
    """Large writable payloads (the staging buffers) are hashed through the extension's C
    `XXH3_64bits` by ctypes, which releases the GIL: I/O threads hash in parallel. The value is
    the package's, for every size and for read-only payloads (which take the package's call)."""
    import mmap

    import xxhash

    from llmd.fs_offload import fileformat

    assert fileformat._xxh3 is not xxhash.xxh3_64_intdigest, "the GIL-free call is in use"
    for size in (0, 100, 65536, (1 << 20) + 7):
        data = os.urandom(size)
        buf = mmap.mmap(-1, max(size, 1))
        buf[:size] = data
        view = memoryview(buf)[:size]
        want = xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF
        assert payload_checksum(CHECKSUM_XXH3, view) == want
        assert payload_checksum(CHECKSUM_XXH3, data) == want
        view.release()
        buf.close()  # no export is left behind on the buffer
