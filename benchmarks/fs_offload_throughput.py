"""Throughput of the llmd FS tier's data path (KV pages to files and back) against the raw disk.

The tier's I/O engine and torch page mover (`llmd.fs_offload.engine`, `.torch_pages`), exactly as
the vLLM plugin runs them, on KV tensors shaped like a model's (default Llama-3.1-8B: 32 layers,
8 KV heads of 128, bf16, 16-token blocks, 256-token files = 32 MiB each). For each directory:

- raw: `dd` writing and reading files of the same size with O_DIRECT where the filesystem takes
  it (the ceiling a file-based tier can reach), and for CUDA tensors a pinned host-to-device copy
  (the ceiling of the copy into the GPU);
- the tier: every chunk stored (gather, CRC-32, write, rename) then loaded into other blocks
  (read, check, scatter), per I/O thread count; the loaded blocks are compared with the stored.

Needs torch (not vLLM); run it with vLLM's environment here, or any Python with torch:

    make bench-fs-offload
    PYTHONPATH=services/fs-offload/src python3 benchmarks/fs_offload_throughput.py \\
        --device cuda --dir /tmp/llmd-fs-bench --dir /dev/shm/llmd-fs-bench --threads 4,8,16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmd.fs_offload.engine import Chunk, IOEngine, probe_o_direct
from llmd.fs_offload.layout import StorageLayout, make_key
from llmd.fs_offload.settings import FsOffloadSettings
from llmd.fs_offload.torch_pages import TorchPages

ROOT = Path(__file__).resolve().parent.parent
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def dd_gbps(args: list[str]) -> float:
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    assert m, out
    return int(m.group(1)) / float(m.group(2)) / 1e9


def raw_disk(directory: Path, file_bytes: int, files: int, direct: bool) -> dict[str, float]:
    """dd write then read of `files` files of `file_bytes`, O_DIRECT when `direct`."""
    bs = f"{file_bytes // (1 << 20)}M"
    path = directory / "dd.raw"
    oflag = ["oflag=direct"] if direct else []
    iflag = ["iflag=direct"] if direct else []
    write = dd_gbps(["if=/dev/zero", f"of={path}", f"bs={bs}", f"count={files}", *oflag])
    if not direct:
        os.sync()
    read = dd_gbps([f"if={path}", "of=/dev/null", f"bs={bs}", *iflag])
    path.unlink()
    return {"write_gbps": round(write, 3), "read_gbps": round(read, 3)}


def pinned_h2d_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.int8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.int8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def run_tier(
    directory: Path,
    tensors: list[torch.Tensor],
    page: int,
    blocks_per_file: int,
    files: int,
    threads: int,
    direct: bool,
    checksum: str,
    poll_s: float = 0.002,
    copy: str = "auto",
    shuffled: bool = False,
) -> dict[str, Any]:
    shutil.rmtree(directory / "tier", ignore_errors=True)
    pages = TorchPages([[(t, page) for t in tensors]], blocks_per_file, copy=copy)
    settings = FsOffloadSettings(
        root=str(directory / "tier"),
        threads=threads,
        o_direct="on" if direct else "off",
        max_write_queued_s=0,
        checksum=checksum,
    )
    layout = StorageLayout(directory / "tier", {"model_name": "bench"}, 0, pages.sizes)
    engine = IOEngine(layout, pages, settings, max_chunk_blocks=blocks_per_file)
    file_bytes = blocks_per_file * pages.sizes[0]
    per_job = 8

    n = files * blocks_per_file
    # Loads go to the second half of the blocks: in order, or (shuffled) each block of a file
    # somewhere else, so that no two are consecutive (the page mover's worst case: a copy per
    # block and layer instead of per file and layer).
    targets = list(range(n, 2 * n))
    if shuffled:
        targets = [n + (i * 7919) % n for i in range(n)]  # 7919 is prime: a permutation

    def chunks(ids: list[int]) -> list[Chunk]:
        return [
            Chunk(
                make_key(i.to_bytes(32, "big"), 0),
                0,
                ids[i * blocks_per_file : (i + 1) * blocks_per_file],
                0,
            )
            for i in range(files)
        ]

    def timed(submit: Any, all_chunks: list[Chunk]) -> float:
        if pages.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        jobs = 0
        for j in range(0, len(all_chunks), per_job):
            submit(jobs, all_chunks[j : j + per_job])
            jobs += 1
        done: list[Any] = []
        while len(done) < jobs:
            done += engine.get_finished()
            time.sleep(poll_s)
        elapsed = time.perf_counter() - t
        assert all(r.ok for r in done), [r for r in done if not r.ok]
        return elapsed

    try:
        store_s = timed(engine.submit_store, chunks(list(range(n))))
        load_s = timed(engine.submit_load, chunks(targets))
        counters = engine.counters()
    finally:
        engine.shutdown()
    where = torch.tensor(targets, device=tensors[0].device)
    same = all(torch.equal(t[:n, :page], t.index_select(0, where)[:, :page]) for t in tensors)
    shutil.rmtree(directory / "tier", ignore_errors=True)
    total = files * file_bytes
    return {
        "threads": threads,
        "checksum": checksum,
        "copy": pages.copy_mode,
        "load_blocks": "shuffled" if shuffled else "in order",
        "store_gbps": round(total / store_s / 1e9, 3),
        "load_gbps": round(total / load_s / 1e9, 3),
        "loaded_equals_stored": same,
        "stores": counters.get(("stores_total", ""), 0),
        "loads": counters.get(("loads_total", ""), 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dir",
        action="append",
        type=Path,
        help="a directory on the filesystem to measure (repeatable)",
    )
    p.add_argument(
        "--threads",
        default="",
        help="I/O thread counts, comma-separated (default 1,2,4 on cpu; 4,8,16 on cuda)",
    )
    p.add_argument(
        "--gib", type=float, default=0, help="GiB of files per pass (default 1 on cpu, 8 on cuda)"
    )
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--file-tokens", type=int, default=256)
    p.add_argument(
        "--checksum",
        default="crc32",
        help="payload checksums to run, comma-separated (crc32, xxh3, none)",
    )
    p.add_argument(
        "--o-direct",
        choices=["auto", "off"],
        default="auto",
        help="auto: where the filesystem takes it",
    )
    p.add_argument(
        "--poll-ms",
        type=float,
        default=2.0,
        help="how often finished jobs are collected (vLLM does it once per engine step)",
    )
    p.add_argument(
        "--gpu-copy",
        default="auto",
        help="CUDA page movers to run, comma-separated (auto, dma, kernels)",
    )
    p.add_argument(
        "--load-order",
        default="sequential",
        help="where loads put a file's blocks, comma-separated: sequential (consecutive ids), "
        "shuffled (no two consecutive: one copy per block and layer)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    for value, allowed, flag in (
        (args.load_order, {"sequential", "shuffled"}, "--load-order"),
        (args.gpu_copy, {"auto", "dma", "kernels"}, "--gpu-copy"),
        (args.checksum, {"crc32", "xxh3", "none"}, "--checksum"),
    ):
        bad = set(value.split(",")) - allowed
        if bad:
            p.error(f"{flag}: unknown {sorted(bad)}; one or more of {sorted(allowed)}")
    dirs = args.dir or [Path("/var/tmp/llmd-fs-bench")]
    threads = [int(t) for t in (args.threads or ("4,8,16" if cuda else "1,2,4")).split(",")]
    gib = args.gib or (8.0 if cuda else 1.0)
    page = 2 * args.block_tokens * args.kv_heads * args.head_dim * DTYPE_BYTES[args.dtype]
    blocks_per_file = args.file_tokens // args.block_tokens
    file_bytes = page * args.layers * blocks_per_file
    files = max(1, int(gib * (1 << 30)) // file_bytes)
    num_blocks = 2 * files * blocks_per_file
    device = "cuda" if cuda else "cpu"
    print(
        f"KV: {args.layers} layers x {page // 1024} KiB pages, {file_bytes >> 20} MiB files, "
        f"{files} files per pass",
        flush=True,
    )
    tensors = [
        torch.randint(-128, 127, (num_blocks, page), dtype=torch.int8, device=device)
        for _ in range(args.layers)
    ]
    results = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        direct = args.o_direct == "auto" and probe_o_direct(str(d))
        row: dict[str, Any] = {"dir": str(d), "o_direct": direct, "tier": []}
        if cuda:
            row["pinned_h2d_gbps"] = round(pinned_h2d_gbps(file_bytes * 8), 2)
            print(f"pinned host-to-device copy: {row['pinned_h2d_gbps']} GB/s", flush=True)
        passes = [
            (n, c, copy, order)
            for order in args.load_order.split(",")
            for c in args.checksum.split(",")
            for n in threads
            for copy in args.gpu_copy.split(",")
        ]
        for n, checksum, copy, order in passes:
            # dd right before each pass: the disk's speed drifts, so compare neighbours.
            raw = raw_disk(d, file_bytes, files, direct)
            r = run_tier(
                d,
                tensors,
                page,
                blocks_per_file,
                files,
                n,
                direct,
                checksum,
                args.poll_ms / 1000,
                copy=copy,
                shuffled=order == "shuffled",
            )
            r["raw_dd"] = raw
            r["store_vs_raw"] = round(r["store_gbps"] / raw["write_gbps"], 3)
            r["load_vs_raw"] = round(r["load_gbps"] / raw["read_gbps"], 3)
            row["tier"].append(r)
            print(
                f"{d} O_DIRECT={direct} {checksum} {r['copy']} {order} {n:>2} threads: "
                f"store {r['store_gbps']} GB/s vs dd {raw['write_gbps']} "
                f"({r['store_vs_raw']:.0%}), "
                f"load {r['load_gbps']} GB/s vs dd {raw['read_gbps']} ({r['load_vs_raw']:.0%}), "
                f"loaded == stored: {r['loaded_equals_stored']}",
                flush=True,
            )
        results.append(row)
    command = "PYTHONPATH=services/fs-offload/src python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    report = {
        "benchmark": "fs-offload-throughput",
        "command": command,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if cuda else None,
        },
        "kv": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "block_tokens": args.block_tokens,
            "file_tokens": args.file_tokens,
            "file_bytes": file_bytes,
            "files_per_pass": files,
        },
        "device": device,
        "results": results,
    }
    out = args.out or ROOT / "benchmarks" / "reports" / f"fs-offload-{device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
