"""`PageIO` over torch KV tensors (CPU or CUDA), for the I/O engine. Imports torch only.

Each KV-cache group is a list of `(tensor, page_bytes)`: int8 tensors of shape
`(num_blocks, >= page_bytes)` (vLLM's canonical per-layer views), and a block of the group is the
concatenation of its first `page_bytes` bytes in each tensor, in order. CPU tensors are copied
straight into / out of the staging buffer. CUDA tensors go through a device buffer owned by the
I/O thread: the thread's own stream gathers the pages into it (after the compute stream's event
for stores), then one DMA moves it to the pinned staging buffer (and the reverse for loads).
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
        self, groups: Sequence[Sequence[tuple[torch.Tensor, int]]], max_chunk_blocks: int
    ) -> None:
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

    def _thread_state(self) -> tuple[Any, torch.Tensor]:
        state = getattr(self._local, "state", None)
        if state is None:
            torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
            # The current stream is per thread: this I/O thread's copies all go to its own
            # stream, with no context manager on each call.
            torch.cuda.set_stream(stream)
            size = self.max_chunk_blocks * max(self.sizes)
            buf = torch.empty(size, dtype=torch.int8, device=self.device)
            state = self._local.state = (stream, buf)
        return state

    def _pairs(
        self, group: int, block_ids: Sequence[int], rows_of: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The KV pages of the blocks and their rows in `rows_of` (n, block bytes), as views:
        one pair per run of consecutive block ids and tensor."""
        pages: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        parts = self.parts[group]
        for pos, first, count in runs(block_ids):
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

    def gather(self, group: int, block_ids: Sequence[int], out: memoryview, token: object) -> None:
        n, bb = len(block_ids), self.sizes[group]
        host = torch.frombuffer(out, dtype=torch.int8, count=n * bb).view(n, bb)
        if not self.cuda:
            self._gather_into(group, block_ids, host)
            return
        stream, dev = self._thread_state()
        if token is not None:
            stream.wait_event(token)
        staged = dev[: n * bb].view(n, bb)
        self._gather_into(group, block_ids, staged)
        host.copy_(staged, non_blocking=True)
        stream.synchronize()

    def scatter(self, group: int, block_ids: Sequence[int], src: memoryview) -> None:
        n, bb = len(block_ids), self.sizes[group]
        host = torch.frombuffer(src, dtype=torch.int8, count=n * bb).view(n, bb)
        if not self.cuda:
            self._scatter_from(group, block_ids, host)
            return
        stream, dev = self._thread_state()
        staged = dev[: n * bb].view(n, bb)
        staged.copy_(host, non_blocking=True)
        self._scatter_from(group, block_ids, staged)
        stream.synchronize()
