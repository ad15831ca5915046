"""The FS tier's torch page mover round-trips scattered blocks: runs of consecutive block ids,
repeated ids, two KV groups, rows wider than their pages, and block ids out of range refused.

Needs torch only. `python fs_pages_round_trip.py [cpu|cuda] [auto|dma|kernels]` prints `ok`;
the vLLM tier runs it on CPU tensors, and on a CUDA machine it checks both GPU copy paths.
"""

from __future__ import annotations

import sys

import torch

from llmd.fs_offload.torch_pages import TorchPages, runs


def main(device: str, copy: str) -> None:
    assert runs([3, 4, 5, 9, 2, 3]) == [(0, 3, 3), (3, 9, 1), (4, 2, 2)]
    torch.manual_seed(0)

    def tensors(count: int, width: int) -> list[torch.Tensor]:
        return [
            torch.randint(-128, 127, (40, width), dtype=torch.int8, device=device)
            for _ in range(count)
        ]

    # two groups; in the second, each tensor's rows are wider than its page (vLLM pads some
    # layouts), and its tensors are views with a row stride larger than their width
    a = tensors(3, 96)
    b = [t[:, :80] for t in tensors(2, 112)]
    pages = TorchPages([[(t, 96) for t in a], [(t, 64) for t in b]], max_chunk_blocks=8, copy=copy)
    expected = {"cpu": "cpu"}.get(device, "kernels" if copy == "kernels" else "dma")
    assert pages.copy_mode == expected, (pages.copy_mode, expected)
    assert pages.sizes == (288, 128)
    for group, group_tensors, page in ((0, a, 96), (1, b, 64)):
        src, dst = [3, 4, 5, 9, 2, 3], [30, 31, 20, 21, 22, 39]
        bb = pages.block_bytes(group)
        buf = torch.zeros(len(src) * bb, dtype=torch.int8, pin_memory=device == "cuda")
        view = memoryview(buf.numpy()).cast("B")
        pages.gather(group, src, view, pages.store_token())
        got = bytes(view)
        for i, blk in enumerate(src):
            want = b"".join(t[blk, :page].cpu().numpy().tobytes() for t in group_tensors)
            assert got[i * bb : (i + 1) * bb] == want, (group, blk)
        untouched = [t[:, page:].clone() for t in group_tensors]
        pages.scatter(group, dst, view)
        for s, d in zip(src, dst, strict=True):
            for t in group_tensors:
                assert torch.equal(t[d, :page], t[s, :page]), (group, s, d)
        for t, u in zip(group_tensors, untouched, strict=True):
            assert torch.equal(t[:, page:], u), "bytes past a page are never written"
        # consecutive ids (one 2-D DMA per tensor on CUDA; the scattered ones above take the
        # indexed path there)
        pages.scatter(group, list(range(10, 16)), view)
        for s, d in zip(src, range(10, 16), strict=True):
            for t in group_tensors:
                assert torch.equal(t[d, :page], t[s, :page]), (group, s, d)
        before = [t.clone() for t in group_tensors]
        for bad in ([38, 39, 40], [-1]):
            try:
                pages.scatter(group, bad, view)
            except (IndexError, RuntimeError):
                pass
            else:
                raise AssertionError(f"block ids {bad} outside 0..39 were accepted")
        if device == "cuda":
            torch.cuda.synchronize()
        # a refused scatter may have copied the in-range runs before the bad one; nothing
        # outside the tensors was written (the process is still healthy)
        assert all(t.shape == u.shape for t, u in zip(group_tensors, before, strict=True))
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu", sys.argv[2] if len(sys.argv) > 2 else "auto")
