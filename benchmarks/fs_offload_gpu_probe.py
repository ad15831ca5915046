"""Where the GPU load path's time goes on a memory-backed filesystem.

Measures, with N threads each moving whole files of KV (32 MiB: Llama-3.1-8B, 256 tokens):

- `read`:       pread from the filesystem into a pinned buffer (the CPU copy alone);
- `read+h2d`:   the same, then one host-to-device DMA per file on the thread's stream (the tier's
                current shape, without its header checks and scatter);
- `mmap+h2d`:   the file mapped, the mapping registered with CUDA, one DMA straight from the
                page cache, unregistered (no CPU copy at all);
- `memcpy`:     pinned-to-pinned host copies (the machine's memory bandwidth per thread count).

Usage (needs torch with CUDA):

    python benchmarks/fs_offload_gpu_probe.py --dir /dev/shm/llmd-probe --threads 1,4,8,16
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FILE = 32 << 20


def _addr(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    a = ctypes.addressof(view)
    del view
    return a


def run(threads: int, files: list[Path], work: Callable[[int, list[Path]], None]) -> float:
    share = [files[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=work, args=(i, share[i])) for i in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return len(files) * FILE / (time.perf_counter() - t) / 1e9


def measure(threads: int, files: list[Path], dev: torch.device) -> dict[str, Any]:
    pinned = [torch.empty(FILE, dtype=torch.int8, pin_memory=True) for _ in range(threads)]
    other = [torch.empty(FILE, dtype=torch.int8, pin_memory=True) for _ in range(threads)]
    dbuf = [torch.empty(FILE, dtype=torch.int8, device=dev) for _ in range(threads)]
    streams = [torch.cuda.Stream(dev) for _ in range(threads)]

    def read(i: int, mine: list[Path], h2d: bool = False) -> None:
        mv = memoryview(pinned[i].numpy()).cast("B")
        for f in mine:
            fd = os.open(f, os.O_RDONLY)
            got = 0
            while got < FILE:
                got += os.preadv(fd, [mv[got:]], got)
            os.close(fd)
            if h2d:
                with torch.cuda.stream(streams[i]):
                    dbuf[i].copy_(pinned[i], non_blocking=True)
                streams[i].synchronize()

    def mapped(i: int, mine: list[Path]) -> None:
        rt = torch.cuda.cudart()
        for f in mine:
            fd = os.open(f, os.O_RDWR)
            m = mmap.mmap(fd, FILE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            ptr = _addr(m)
            err = rt.cudaHostRegister(ptr, FILE, 0)
            assert int(err) == 0, err
            src = torch.frombuffer(m, dtype=torch.int8)
            with torch.cuda.stream(streams[i]):
                dbuf[i].copy_(src, non_blocking=True)
            streams[i].synchronize()
            del src
            rt.cudaHostUnregister(ptr)
            m.close()

    def memcpy(i: int, mine: list[Path]) -> None:
        for _ in mine:
            other[i].copy_(pinned[i])

    return {
        "threads": threads,
        "read_gbps": round(run(threads, files, read), 2),
        "read_h2d_gbps": round(run(threads, files, lambda i, m: read(i, m, True)), 2),
        "mmap_h2d_gbps": round(run(threads, files, mapped), 2),
        "memcpy_gbps": round(run(threads, files, memcpy), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", required=True)
    p.add_argument("--threads", default="1,4,8,16")
    p.add_argument("--gib", type=float, default=8)
    p.add_argument("--out")
    a = p.parse_args()
    d = Path(a.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n = int(a.gib * (1 << 30)) // FILE
    blob = os.urandom(FILE)
    files = []
    for i in range(n):
        f = d / f"{i}.bin"
        f.write_bytes(blob)
        files.append(f)
    dev = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    for threads in [int(x) for x in a.threads.split(",")]:
        row = measure(threads, files, dev)
        print(row, flush=True)
        rows.append(row)
    shutil.rmtree(d, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(
            json.dumps({"dir": a.dir, "file_bytes": FILE, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
