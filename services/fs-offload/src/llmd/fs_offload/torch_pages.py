"""`PageIO` over torch KV tensors (CPU or CUDA), for the I/O engine. Imports torch only.

Each KV-cache group is a list of `(tensor, page_bytes)`: int8 tensors of shape
`(num_blocks, >= page_bytes)` (vLLM's canonical per-layer views), and a block of the group is the
concatenation of its first `page_bytes` bytes in each tensor, in order. CPU tensors are copied
straight into / out of the staging buffer.

CUDA tensors are moved on the I/O thread's own stream (after the compute stream's event for
stores), by one of two means:

- `dma` (the default where it is available): for each run of consecutive block ids and each
  tensor, one `cudaMemcpy2DAsync` between the pinned staging buffer (pitch: the block's bytes)
  and the tensor's rows (pitch: the tensor's row stride). The copy engine does the strided copy;
  there is no device buffer and no copy kernel. It needs the CUDA runtime torch loaded (found in
  the process's mappings) and int8 views whose rows are contiguous.
- `kernels`: the pages are gathered into (scattered from) a device buffer owned by the thread,
  with one `torch._foreach_copy_`, and one DMA moves the buffer to (from) the staging buffer.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("llmd.fs_offload")

COPY_MODES = ("auto", "dma", "kernels")
# Past this many runs of consecutive block ids in one file, `dma` moves the file in one DMA
# through the thread's device buffer and places its blocks with one indexed copy per tensor:
# a 2-D DMA per run and tensor costs a CUDA call each (16 runs x 32 layers = 512 per file).
DMA_MAX_RUNS = 2
_H2D, _D2H = 1, 2  # cudaMemcpyKind


def _loaded_cudart() -> str | None:
    """The path of the CUDA runtime library this process has mapped (torch's), if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcudart.so" in path:
                    return path
    except OSError:
        return None
    return None


class Dma2D:
    """`cudaMemcpy2DAsync` of the CUDA runtime that torch loaded (the same library instance, so
    torch's streams and the current device apply). ctypes releases the GIL during the call."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        fn = lib.cudaMemcpy2DAsync
        size = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_void_p,
            size,
            ctypes.c_void_p,
            size,
            size,
            size,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        fn.restype = ctypes.c_int
        self._fn = fn

    @classmethod
    def load(cls) -> Dma2D | None:
        path = _loaded_cudart()
        if path is None:
            return None
        try:
            return cls(path)
        except (OSError, AttributeError):
            return None

    def copy(
        self,
        dst: int,
        dpitch: int,
        src: int,
        spitch: int,
        width: int,
        height: int,
        kind: int,
        stream: int,
    ) -> None:
        err = self._fn(dst, dpitch, src, spitch, width, height, kind, stream)
        if err != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")


def runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) of each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for pos, b in enumerate(block_ids):
        if out and out[-1][1] + out[-1][2] == b:
            p0, b0, n = out[-1]
            out[-1] = (p0, b0, n + 1)
        else:
            out.append((pos, b, 1))
    return out


def _address(buf: mmap.mmap) -> int:
    """The address of an mmap's memory (the ctypes view is dropped at once, so the mmap can
    still be closed)."""
    view = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(view)
    del view
    return address


class TorchPages:
    def __init__(
        self,
        groups: Sequence[Sequence[tuple[torch.Tensor, int]]],
        max_chunk_blocks: int,
        copy: str = "auto",
    ) -> None:
        if copy not in COPY_MODES:
            raise ValueError(f"copy must be one of {', '.join(COPY_MODES)}, not {copy!r}")
        self.parts: list[list[tuple[torch.Tensor, int, int]]] = []
        sizes: list[int] = []
        for group in groups:
            parts = []
            offset = 0
            for tensor, page in group:
                parts.append((tensor, page, offset))
                offset += page
            self.parts.append(parts)
            sizes.append(offset)
        self.sizes = tuple(sizes)
        self.device = self.parts[0][0][0].device
        self.cuda = self.device.type == "cuda"
        self.max_chunk_blocks = max_chunk_blocks
        self._local = threading.local()
        self._registered: set[int] = set()
        # The highest block id + 1 every tensor of a group holds: raw DMA addresses are
        # bounds-checked against it (narrow() checks the kernel path).
        self._blocks = tuple(min(t.shape[0] for t, _, _ in parts) for parts in self.parts)
        self.dma: Dma2D | None = None
        if self.cuda and copy != "kernels":
            self.dma = self._load_dma(copy == "dma")
        self.copy_mode = "dma" if self.dma is not None else ("kernels" if self.cuda else "cpu")

    def _load_dma(self, required: bool) -> Dma2D | None:
        strided = all(
            t.dtype == torch.int8 and t.dim() == 2 and t.stride(1) == 1
            for parts in self.parts
            for t, _, _ in parts
        )
        torch.cuda.init()
        dma = Dma2D.load() if strided else None
        if dma is None:
            why = (
                "the KV views are not int8 rows with contiguous bytes"
                if not strided
                else "the CUDA runtime torch uses was not found in this process"
            )
            if required:
                raise RuntimeError(f"llmd-fs-offload: copy 'dma' is not available: {why}")
            log.warning("llmd-fs-offload: 2-D DMA not available (%s); using copy kernels", why)
        return dma

    def block_bytes(self, group: int) -> int:
        return self.sizes[group]

    def store_token(self) -> object:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def register_staging(self, buf: mmap.mmap) -> None:
        """Pin the staging buffer so that copies to and from the GPU are DMA, not staged twice."""
        if not self.cuda:
            return
        ptr = _address(buf)
        err = torch.cuda.cudart().cudaHostRegister(ptr, len(buf), 0)
        if int(err) != 0:
            log.warning("llmd-fs-offload: cudaHostRegister failed (%s); copies will be slower", err)
            return
        self._registered.add(ptr)

    def release_staging(self, buf: mmap.mmap) -> None:
        """Unpin before the buffer is unmapped: the address may be mapped again later, and
        registering a range that is still registered fails."""
        if not self.cuda:
            return
        ptr = _address(buf)
        if ptr in self._registered:
            self._registered.discard(ptr)
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def _stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
            # The current stream is per thread: this I/O thread's copies all go to its own
            # stream, with no context manager on each call.
            torch.cuda.set_stream(stream)
            self._local.stream = stream
        return stream

    def _device_buffer(self) -> torch.Tensor:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            size = self.max_chunk_blocks * max(self.sizes)
            buf = self._local.buffer = torch.empty(size, dtype=torch.int8, device=self.device)
        return buf

    def _dma(self, group: int, block_ids: Sequence[int], host: torch.Tensor, kind: int) -> None:
        """One 2-D DMA per run of consecutive block ids and tensor, between the staging rows
        `host` (n, block bytes) and the tensors' rows, enqueued on this thread's stream."""
        assert self.dma is not None
        stream = self._stream()
        spans = self._runs(group, block_ids)
        if len(spans) > DMA_MAX_RUNS and len(set(block_ids)) == len(block_ids):
            self._indexed(group, block_ids, host, kind == _H2D)
            stream.synchronize()
            return
        handle = stream.cuda_stream
        bb = self.sizes[group]
        base = host.data_ptr()
        copy = self.dma.copy
        for pos, first, count in spans:
            row = base + pos * bb
            for tensor, page, off in self.parts[group]:
                pitch = tensor.stride(0)
                dev = tensor.data_ptr() + first * pitch
                if kind == _H2D:
                    copy(dev, pitch, row + off, bb, page, count, _H2D, handle)
                else:
                    copy(row + off, bb, dev, pitch, page, count, _D2H, handle)
        stream.synchronize()

    def _runs(self, group: int, block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """`runs`, each checked against the group's tensors (a raw DMA address is not, and
        narrow() would take a negative id as counted from the end)."""
        limit = self._blocks[group]
        out = runs(block_ids)
        for _, first, count in out:
            if first < 0 or first + count > limit:
                raise IndexError(f"block ids {first}..{first + count - 1} outside 0..{limit - 1}")
        return out

    def _pairs(
        self, group: int, block_ids: Sequence[int], rows_of: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The KV pages of the blocks and their rows in `rows_of` (n, block bytes), as views:
        one pair per run of consecutive block ids and tensor."""
        pages: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        parts = self.parts[group]
        for pos, first, count in self._runs(group, block_ids):
            run_rows = rows_of.narrow(0, pos, count)
            for tensor, page, off in parts:
                span = tensor.narrow(0, first, count)
                pages.append(span if span.shape[1] == page else span.narrow(1, 0, page))
                rows.append(run_rows.narrow(1, off, page))
        return pages, rows

    def _gather_into(self, group: int, block_ids: Sequence[int], rows_of: torch.Tensor) -> None:
        """Copy the blocks into `rows_of`: one call for all the copies (on CUDA the launches
        are made in C++, not one Python call per layer), no temporaries."""
        pages, rows = self._pairs(group, block_ids, rows_of)
        torch._foreach_copy_(rows, pages)

    def _scatter_from(self, group: int, block_ids: Sequence[int], rows_of: torch.Tensor) -> None:
        pages, rows = self._pairs(group, block_ids, rows_of)
        torch._foreach_copy_(pages, rows)

    def _indexed(
        self, group: int, block_ids: Sequence[int], host: torch.Tensor, load: bool
    ) -> None:
        """Scattered block ids: one DMA of the whole file between `host` and the device buffer,
        and one indexed copy per tensor (ids already checked; none repeated)."""
        n, bb = len(block_ids), self.sizes[group]
        staged = self._device_buffer()[: n * bb].view(n, bb)
        index = torch.as_tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)
        if load:
            staged.copy_(host, non_blocking=True)
            for tensor, page, off in self.parts[group]:
                tensor.narrow(1, 0, page).index_copy_(0, index, staged.narrow(1, off, page))
        else:
            for tensor, page, off in self.parts[group]:
                staged.narrow(1, off, page).copy_(tensor.narrow(1, 0, page).index_select(0, index))
            host.copy_(staged, non_blocking=True)

    def gather(self, group: int, block_ids: Sequence[int], out: memoryview, token: object) -> None:
        n, bb = len(block_ids), self.sizes[group]
        host = torch.frombuffer(out, dtype=torch.int8, count=n * bb).view(n, bb)
        if not self.cuda:
            self._gather_into(group, block_ids, host)
            return
        stream = self._stream()
        if token is not None:
            stream.wait_event(token)
        if self.dma is not None:
            self._dma(group, block_ids, host, _D2H)
            return
        staged = self._device_buffer()[: n * bb].view(n, bb)
        self._gather_into(group, block_ids, staged)
        host.copy_(staged, non_blocking=True)
        stream.synchronize()

    def scatter(self, group: int, block_ids: Sequence[int], src: memoryview) -> None:
        n, bb = len(block_ids), self.sizes[group]
        host = torch.frombuffer(src, dtype=torch.int8, count=n * bb).view(n, bb)
        if not self.cuda:
            self._scatter_from(group, block_ids, host)
            return
        if self.dma is not None:
            self._dma(group, block_ids, host, _H2D)
            return
        stream = self._stream()
        staged = self._device_buffer()[: n * bb].view(n, bb)
        staged.copy_(host, non_blocking=True)
        self._scatter_from(group, block_ids, staged)
        stream.synchronize()
