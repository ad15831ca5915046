"""The on-disk format of one offloaded KV chunk: a checked header, then a page-aligned payload.

A file is `HEADER_SIZE` bytes of header followed by the payload, padded with zeros to a multiple
of `ALIGN` so that the whole file can be written and read with O_DIRECT. The header names what the
payload is (a fingerprint of the model, dtype, parallelism and block layout, the chunk's offload
key, which blocks of the chunk it holds) and how to check it (payload length and CRC-32, and a
CRC-32 of the header itself). A reader that finds anything unexpected raises `CorruptFileError`
with a short machine-readable reason; it never hands back bytes it could not check.

Layout (little-endian):

| offset | size | field |
|---|---|---|
| 0 | 8 | magic `LLMDKVF\\0` |
| 8 | 2 | format version (1) |
| 10 | 2 | header size (4096) |
| 12 | 4 | payload checksum kind (0 none, 1 CRC-32, 2 low 32 bits of XXH3-64) |
| 16 | 32 | layout fingerprint (SHA-256) |
| 48 | 8 | payload length in bytes |
| 56 | 4 | payload checksum |
| 60 | 4 | index in the chunk of the first stored block |
| 64 | 4 | number of stored blocks |
| 68 | 8 | bytes per block |
| 76 | 2 | key length |
| 78 | key length | the offload key (block hash + 4-byte group index) |
| 78 + key length | 4 | CRC-32 of every header byte before it |
"""

from __future__ import annotations

import ctypes
import importlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAGIC = b"LLMDKVF\x00"
VERSION = 1
HEADER_SIZE = 4096
ALIGN = 4096
MAX_KEY_LEN = 256
CHECKSUM_NONE = 0
CHECKSUM_CRC32 = 1
CHECKSUM_XXH3 = 2
CHECKSUMS = {"none": CHECKSUM_NONE, "crc32": CHECKSUM_CRC32, "xxh3": CHECKSUM_XXH3}

try:  # XXH3 is ~10x faster than zlib's CRC-32; optional (the engine images install xxhash)
    import xxhash

    _xxh3: Callable[[Any], int] | None = xxhash.xxh3_64_intdigest
except ImportError:  # pragma: no cover - depends on the environment
    _xxh3 = None


def _xxh3_without_gil() -> Callable[[Any], int] | None:
    """XXH3-64 through ctypes on the xxhash package's own extension, which exports the C API
    (`XXH3_64bits`, and `XXH3_64bits_dispatch` choosing the CPU's widest vectors): ctypes
    releases the GIL for the call, so I/O threads hash their files in parallel. The package's
    Python function holds the GIL: on a 16-core H200 host, 16 threads hashing 32 MiB buffers
    reached 7 GiB/s together through it and 67 GiB/s through this. Same function, same value;
    small, read-only or non-contiguous inputs take the package's call. None where the symbols
    are not exported."""
    python = _xxh3
    if python is None:
        return None
    try:
        lib = ctypes.CDLL(importlib.import_module("xxhash._xxhash").__file__)
        fn = getattr(lib, "XXH3_64bits_dispatch", None) or lib.XXH3_64bits
    except (ImportError, OSError, AttributeError, TypeError):  # pragma: no cover - the build
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_uint64

    def digest(data: Any) -> int:
        view = memoryview(data)
        if view.readonly or not view.c_contiguous or view.nbytes < 1 << 16:
            return int(python(data))
        buf = (ctypes.c_char * view.nbytes).from_buffer(view.cast("B"))
        try:
            return int(fn(ctypes.addressof(buf), view.nbytes))
        finally:
            del buf  # the export on the buffer: an mmap cannot close while one is held

    return digest


_xxh3 = _xxh3_without_gil() or _xxh3


def xxh3_available() -> bool:
    return _xxh3 is not None


_FIXED = struct.Struct("<8sHHI32sQIIIQH")
_CRC = struct.Struct("<I")


class CorruptFileError(Exception):
    """A file that cannot be trusted; `reason` is a short label used in metrics and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def file_size(payload_len: int) -> int:
    """The exact size of a well-formed file holding `payload_len` payload bytes."""
    return HEADER_SIZE + round_up(payload_len)


def payload_checksum(kind: int, payload: memoryview | bytes) -> int:
    """The payload checksum of `kind` (CHECKSUM_CRC32 or CHECKSUM_XXH3) as a 32-bit integer."""
    if kind == CHECKSUM_CRC32:
        return zlib.crc32(payload) & 0xFFFFFFFF
    if kind == CHECKSUM_XXH3 and _xxh3 is not None:
        return _xxh3(payload) & 0xFFFFFFFF
    raise ValueError(f"checksum kind {kind} is not available here")


@dataclass(frozen=True, slots=True)
class FileHeader:
    fingerprint: bytes
    key: bytes
    payload_len: int
    checksum: int | None
    """None when the writer stored no checksum."""
    first_block: int
    num_blocks: int
    block_bytes: int
    checksum_kind: int = CHECKSUM_CRC32


def encode_header(buf: memoryview, header: FileHeader) -> None:
    """Write `header` into `buf[:HEADER_SIZE]` (the rest of the header page is zeroed)."""
    if len(header.fingerprint) != 32:
        raise ValueError("fingerprint must be 32 bytes")
    if len(header.key) > MAX_KEY_LEN:
        raise ValueError(f"offload key of {len(header.key)} bytes exceeds {MAX_KEY_LEN}")
    if header.payload_len != header.num_blocks * header.block_bytes:
        raise ValueError("payload length must equal blocks x bytes per block")
    kind = header.checksum_kind if header.checksum is not None else CHECKSUM_NONE
    fixed = _FIXED.pack(
        MAGIC,
        VERSION,
        HEADER_SIZE,
        kind,
        header.fingerprint,
        header.payload_len,
        header.checksum or 0,
        header.first_block,
        header.num_blocks,
        header.block_bytes,
        len(header.key),
    )
    body = fixed + header.key
    end = len(body) + _CRC.size
    buf[: len(body)] = body
    buf[len(body) : end] = _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)
    buf[end:HEADER_SIZE] = bytes(HEADER_SIZE - end)


def decode_header(buf: memoryview | bytes) -> FileHeader:
    """Parse and check a header; raises `CorruptFileError` on any inconsistency."""
    if len(buf) < HEADER_SIZE:
        raise CorruptFileError("short", f"{len(buf)} bytes, a header needs {HEADER_SIZE}")
    (magic, version, hsize, kind, fingerprint, plen, pcrc, first, nblocks, bbytes, klen) = (
        _FIXED.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise CorruptFileError("magic", "not an llmd KV file")
    if version != VERSION:
        raise CorruptFileError("version", f"format version {version}, this reader knows {VERSION}")
    if hsize != HEADER_SIZE or klen > MAX_KEY_LEN:
        raise CorruptFileError("header", f"header size {hsize}, key length {klen}")
    end = _FIXED.size + klen
    (stored_crc,) = _CRC.unpack_from(buf, end)
    if zlib.crc32(bytes(buf[:end])) & 0xFFFFFFFF != stored_crc:
        raise CorruptFileError("header-checksum", "header CRC-32 mismatch")
    if kind not in CHECKSUMS.values():
        raise CorruptFileError("header", f"unknown checksum kind {kind}")
    if plen != nblocks * bbytes:
        raise CorruptFileError("header", f"payload {plen} != {nblocks} blocks x {bbytes} bytes")
    return FileHeader(
        fingerprint=bytes(fingerprint),
        key=bytes(buf[_FIXED.size : end]),
        payload_len=plen,
        checksum=pcrc if kind != CHECKSUM_NONE else None,
        first_block=first,
        num_blocks=nblocks,
        block_bytes=bbytes,
        checksum_kind=kind,
    )


def check_file(
    data: memoryview,
    *,
    size: int,
    fingerprint: bytes,
    key: bytes,
    block_bytes: int,
    need_first: int,
    need_count: int,
    verify: bool = True,
) -> FileHeader:
    """Check a whole file read into `data` (`size` bytes of it valid) against what the reader
    expects: its layout, its key, its length, the blocks it must hold and its payload checksum.
    Returns the header; raises `CorruptFileError` naming the first problem found."""
    header = decode_header(data[:size])
    if header.fingerprint != fingerprint:
        raise CorruptFileError(
            "fingerprint", "written by another model, dtype, parallelism or layout"
        )
    if header.key != key:
        raise CorruptFileError("key", "the file holds another chunk than its name")
    if header.block_bytes != block_bytes:
        raise CorruptFileError(
            "layout", f"{header.block_bytes} bytes per block, expected {block_bytes}"
        )
    expected = file_size(header.payload_len)
    if size != expected:
        reason = "truncated" if size < expected else "oversize"
        raise CorruptFileError(reason, f"{size} bytes, a complete file has {expected}")
    if need_first < header.first_block or (
        need_first + need_count > header.first_block + header.num_blocks
    ):
        raise CorruptFileError(
            "partial",
            f"holds blocks {header.first_block}..{header.first_block + header.num_blocks - 1} "
            f"of the chunk, the load needs {need_first}..{need_first + need_count - 1}",
        )
    if verify and header.checksum is not None:
        if header.checksum_kind == CHECKSUM_XXH3 and _xxh3 is None:
            raise CorruptFileError(
                "unverifiable", "written with an XXH3 checksum; this reader lacks xxhash"
            )
        payload = data[HEADER_SIZE : HEADER_SIZE + header.payload_len]
        if payload_checksum(header.checksum_kind, payload) != header.checksum:
            raise CorruptFileError("checksum", "payload checksum mismatch")
    return header
