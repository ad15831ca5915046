"""The I/O engine: a pool of threads that moves KV chunks between the engine's pages and files.

Loads are served before stores: `read_preferring_ratio` of the threads take a queued load before
any store, the others take stores first, and every thread takes whatever is queued when its
preferred queue is empty. Each thread owns one page-aligned staging buffer big enough for one file
(header + payload), so staging memory is `threads x file size`, bounded by `max_staging_bytes`.

A store gathers the chunk's blocks into the staging buffer, checksums them, writes a temp file
(O_DIRECT when the filesystem allows it) and renames it into place, so a reader sees a whole file
or none. A store whose file already exists only refreshes its access time. Stores are dropped, and
counted, when the queue would take longer than `max_write_queued_s` to drain at the measured
write speed (a dropped store is a future cache miss, never wrong data).

A load reads the whole file, checks it (`fileformat.check_file`) and only then copies the blocks
into the engine's pages. A missing, short, corrupt or foreign file fails the chunk: its blocks
are reported as failed so vLLM recomputes them, the file is deleted or quarantined, and a counter
and one log line name the reason.

The engine is independent of torch and vLLM: pages are reached through a `PageIO`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmd.fs_offload.fileformat import (
    ALIGN,
    CHECKSUMS,
    HEADER_SIZE,
    CorruptFileError,
    FileHeader,
    check_file,
    encode_header,
    file_size,
    payload_checksum,
    round_up,
)
from llmd.fs_offload.layout import StorageLayout
from llmd.fs_offload.settings import FsOffloadSettings

log = logging.getLogger("llmd.fs_offload")

EMA_ALPHA = 0.05
TOUCH_INTERVAL_S = 30.0
"""The evictor's LRU clock resolution: a load touches a file written or touched longer ago."""
MAX_DIR_CACHE = 65_536


class PageIO(Protocol):
    """Access to the engine's KV pages, by KV-cache group and block id."""

    def block_bytes(self, group: int) -> int: ...

    def gather(self, group: int, block_ids: Sequence[int], out: memoryview, token: object) -> None:
        """Copy the blocks, in order, into `out` (len(block_ids) x block_bytes(group) bytes).
        `token` is what `store_token()` returned when the store was submitted."""

    def scatter(self, group: int, block_ids: Sequence[int], src: memoryview) -> None:
        """Copy `src` (len(block_ids) x block_bytes(group) bytes) into the blocks, in order."""

    def store_token(self) -> object:
        """Taken on the submitting thread: whatever `gather` must wait for (a CUDA event)."""

    def register_staging(self, buf: mmap.mmap) -> None:
        """Called once per staging buffer (pins it for DMA where that applies)."""

    def release_staging(self, buf: mmap.mmap) -> None:
        """Called when the thread owning a staging buffer ends, before the buffer is freed."""


@dataclass(slots=True)
class Chunk:
    """One file's worth of work: `block_ids` are engine blocks holding chunk blocks
    `first .. first + len(block_ids) - 1` of the chunk named by `key`."""

    key: bytes
    group: int
    block_ids: list[int]
    first: int


@dataclass(slots=True)
class JobResult:
    job_id: int
    is_load: bool
    ok: bool
    failed_block_ids: list[int]
    num_bytes: int
    seconds: float


@dataclass
class _Job:
    job_id: int
    is_load: bool
    remaining: int
    token: object = None
    started: float = field(default_factory=time.perf_counter)
    failed_block_ids: list[int] = field(default_factory=list)
    num_bytes: int = 0
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


def probe_o_direct(directory: str) -> bool:
    """Whether files in `directory` can be written and read with O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f".o_direct_probe.{os.getpid()}.{secrets.token_hex(4)}")
    buf = mmap.mmap(-1, ALIGN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o600)
        try:
            os.write(fd, buf)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY | flag)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        buf.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class IOEngine:
    """Thread pool moving chunks between pages and files; see the module docstring."""

    def __init__(
        self,
        layout: StorageLayout,
        pages: PageIO,
        settings: FsOffloadSettings,
        *,
        max_chunk_blocks: int,
    ) -> None:
        self.layout = layout
        self.pages = pages
        self.settings = settings
        groups = len(layout.block_bytes)
        max_payload = max_chunk_blocks * max(layout.block_bytes[g] for g in range(groups))
        self.staging_bytes = HEADER_SIZE + round_up(max_payload)
        by_memory = max(1, settings.max_staging_bytes // self.staging_bytes)
        self.threads = max(1, min(settings.threads, by_memory))
        self.read_preferring = max(1, int(self.threads * settings.read_preferring_ratio))
        layout.rank_dir.mkdir(parents=True, exist_ok=True)
        layout.write_config()
        if settings.o_direct == "off":
            self.o_direct = False
        else:
            self.o_direct = probe_o_direct(str(layout.rank_dir))
            if not self.o_direct:
                if settings.o_direct == "on":
                    raise OSError(f"o_direct=on but {layout.rank_dir} does not support O_DIRECT")
                log.warning(
                    "llmd-fs-offload: %s does not support O_DIRECT; using buffered I/O",
                    layout.rank_dir,
                )
        self._direct_flag = getattr(os, "O_DIRECT", 0) if self.o_direct else 0
        self._cond = threading.Condition()
        self._loads: deque[tuple[_Job, Chunk]] = deque()
        self._stores: deque[tuple[_Job, Chunk]] = deque()
        self._jobs: dict[int, _Job] = {}
        self._finished: list[JobResult] = []
        self._stopping = False
        self._ema_store_s = 0.0
        self._dirs: set[str] = set()
        self._counters: Counter[tuple[str, str]] = Counter()
        self._reported: Counter[tuple[str, str]] = Counter()
        self._workers = [
            threading.Thread(
                target=self._run,
                args=(i < self.read_preferring,),
                name=f"llmd-fs-io-{i}",
                daemon=True,
            )
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        log.info(
            "llmd-fs-offload: %d I/O threads (%d prefer loads), %d KiB staging each, O_DIRECT %s, "
            "files under %s",
            self.threads,
            self.read_preferring,
            self.staging_bytes // 1024,
            "on" if self.o_direct else "off",
            layout.rank_dir,
        )

    # -- submission (engine thread) ---------------------------------------------------------

    def submit_store(self, job_id: int, chunks: Sequence[Chunk]) -> None:
        job = _Job(job_id, is_load=False, remaining=len(chunks), token=self.pages.store_token())
        self._submit(job, chunks, self._stores)

    def submit_load(self, job_id: int, chunks: Sequence[Chunk]) -> None:
        self._submit(_Job(job_id, is_load=True, remaining=len(chunks)), chunks, self._loads)

    def _submit(self, job: _Job, chunks: Sequence[Chunk], queue: deque[tuple[_Job, Chunk]]) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the I/O engine is shut down")
            self._jobs[job.job_id] = job
            if not chunks:
                self._finish(job)
                return
            queue.extend((job, chunk) for chunk in chunks)
            self._cond.notify(len(chunks))

    def fail_job(self, job_id: int, *, is_load: bool, block_ids: Sequence[int]) -> None:
        """Finish a job that could not be submitted: a load's blocks all failed (recomputed),
        a store wrote nothing."""
        self._count("internal_errors_total", "load" if is_load else "store")
        with self._cond:
            job = _Job(job_id, is_load=is_load, remaining=0)
            job.failed_block_ids = list(block_ids)
            self._finish(job)

    def get_finished(self) -> list[JobResult]:
        with self._cond:
            out, self._finished = self._finished, []
        return out

    def wait(self, job_ids: Iterable[int]) -> None:
        """Block until the jobs are done; their queued stores are abandoned (a future miss)."""
        with self._cond:
            jobs = [self._jobs[j] for j in job_ids if j in self._jobs]
            for job in jobs:
                if not job.is_load:
                    job.cancelled = True
        for job in jobs:
            job.done.wait()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            for job, _ in self._stores:
                job.cancelled = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout=30)

    def counters(self) -> dict[tuple[str, str], int]:
        """Cumulative counters: (name, label) -> value."""
        with self._cond:
            return dict(self._counters)

    def take_counter_deltas(self) -> dict[tuple[str, str], int]:
        """Counter increases since the previous call."""
        with self._cond:
            delta = {
                k: v - self._reported[k]
                for k, v in self._counters.items()
                if v != self._reported[k]
            }
            self._reported.update(delta)
        return delta

    def queued(self) -> tuple[int, int]:
        with self._cond:
            return len(self._loads), len(self._stores)

    # -- worker threads ---------------------------------------------------------------------

    def _next(self, prefer_loads: bool) -> tuple[_Job, Chunk] | None:
        with self._cond:
            while True:
                first, second = (
                    (self._loads, self._stores) if prefer_loads else (self._stores, self._loads)
                )
                if first:
                    return first.popleft()
                if second:
                    return second.popleft()
                if self._stopping:
                    return None
                self._cond.wait()

    def _run(self, prefer_loads: bool) -> None:
        staging = mmap.mmap(-1, self.staging_bytes)
        self.pages.register_staging(staging)
        view = memoryview(staging)
        try:
            self._serve(prefer_loads, view)
        finally:
            view.release()
            self.pages.release_staging(staging)
            staging.close()

    def _serve(self, prefer_loads: bool, view: memoryview) -> None:
        while (item := self._next(prefer_loads)) is not None:
            job, chunk = item
            ok = True
            try:
                if job.is_load:
                    ok = self._load(job, chunk, view)
                else:
                    self._store(job, chunk, view)
            except Exception:  # a bug must not kill the thread and hang the job
                log.exception(
                    "llmd-fs-offload: unexpected error on %s", self.layout.path(chunk.key)
                )
                ok = False
                self._count("internal_errors_total", "load" if job.is_load else "store")
            with self._cond:
                if not ok:
                    job.failed_block_ids.extend(chunk.block_ids)
                job.remaining -= 1
                if job.remaining == 0:
                    self._finish(job)

    def _finish(self, job: _Job) -> None:
        """Under the lock: move a job to the finished list."""
        self._jobs.pop(job.job_id, None)
        self._finished.append(
            JobResult(
                job_id=job.job_id,
                is_load=job.is_load,
                ok=not job.failed_block_ids,
                failed_block_ids=job.failed_block_ids,
                num_bytes=job.num_bytes,
                seconds=time.perf_counter() - job.started,
            )
        )
        job.done.set()

    def _count(self, name: str, label: str = "", n: int = 1) -> None:
        with self._cond:
            self._counters[(name, label)] += n

    # -- store ------------------------------------------------------------------------------

    def _store(self, job: _Job, chunk: Chunk, view: memoryview) -> None:
        if job.cancelled:
            self._count("stores_abandoned_total")
            return
        path = self.layout.path(chunk.key)
        if self._should_drop():
            self._count("stores_dropped_total")
            return
        try:
            os.utime(path)
            self._count("stores_skipped_existing_total")
            return
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._store_failed(path, exc)
            return
        started = time.perf_counter()
        block_bytes = self.pages.block_bytes(chunk.group)
        payload_len = block_bytes * len(chunk.block_ids)
        total = file_size(payload_len)
        payload = view[HEADER_SIZE : HEADER_SIZE + payload_len]
        self.pages.gather(chunk.group, chunk.block_ids, payload, job.token)
        view[HEADER_SIZE + payload_len : total] = bytes(total - HEADER_SIZE - payload_len)
        kind = CHECKSUMS[self.settings.checksum]
        header = FileHeader(
            fingerprint=self.layout.fingerprint,
            key=chunk.key,
            payload_len=payload_len,
            checksum=payload_checksum(kind, payload) if kind else None,
            first_block=chunk.first,
            num_blocks=len(chunk.block_ids),
            block_bytes=block_bytes,
            checksum_kind=kind,
        )
        encode_header(view, header)
        tmp = f"{path}.{threading.get_ident():x}{secrets.token_hex(3)}.tmp"
        try:
            self._ensure_dir(os.path.dirname(path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | self._direct_flag, 0o644)
            try:
                written = 0
                while written < total:
                    written += os.write(fd, view[written:total])
                if self.settings.fsync != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if self.settings.fsync == "dir":
                dfd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._store_failed(path, exc)
            return
        elapsed = time.perf_counter() - started
        with self._cond:
            self._ema_store_s = (
                elapsed
                if self._ema_store_s == 0
                else (1 - EMA_ALPHA) * self._ema_store_s + EMA_ALPHA * elapsed
            )
            self._counters[("stores_total", "")] += 1
            self._counters[("store_bytes_total", "")] += payload_len
            job.num_bytes += payload_len

    def _should_drop(self) -> bool:
        budget = self.settings.max_write_queued_s
        with self._cond:
            if budget <= 0 or self._ema_store_s <= 0:
                return False
            limit = self.threads * budget / self._ema_store_s
            return len(self._stores) + 1 > limit  # this store counts too

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._dirs:
            return
        os.makedirs(directory, exist_ok=True)
        if len(self._dirs) >= MAX_DIR_CACHE:
            self._dirs.clear()
        self._dirs.add(directory)

    def _store_failed(self, path: str, exc: OSError) -> None:
        reason = errno.errorcode.get(exc.errno or 0, "error")
        self._count("store_failures_total", reason)
        log.warning("llmd-fs-offload: store of %s failed (%s): %s", path, reason, exc)

    # -- load -------------------------------------------------------------------------------

    def _load(self, job: _Job, chunk: Chunk, view: memoryview) -> bool:
        path = self.layout.path(chunk.key)
        block_bytes = self.pages.block_bytes(chunk.group)
        try:
            fd = os.open(path, os.O_RDONLY | self._direct_flag)
        except FileNotFoundError:
            return self._load_failed(path, "missing", "the file is gone", remove=False)
        except OSError as exc:
            return self._load_failed(path, "io", str(exc), remove=False)
        try:
            # A shared lock for the read: the evictor removes a file only under the exclusive one.
            fcntl.flock(fd, fcntl.LOCK_SH)
            stat = os.fstat(fd)
            size = stat.st_size
            if size > self.staging_bytes:
                raise CorruptFileError(
                    "oversize", f"{size} bytes, at most {self.staging_bytes} expected"
                )
            got = 0
            want = round_up(size) if self._direct_flag else size
            while got < size:
                n = os.preadv(fd, [view[got:want]], got)
                if n == 0:
                    break
                got += n
            header = check_file(
                view,
                size=min(got, size),
                fingerprint=self.layout.fingerprint,
                key=chunk.key,
                block_bytes=block_bytes,
                need_first=chunk.first,
                need_count=len(chunk.block_ids),
                verify=self.settings.checksum != "none",
            )
            if time.time() - stat.st_mtime > TOUCH_INTERVAL_S:
                # The evictor's LRU clock (atime is unreliable under relatime). A file touched
                # or written within the interval is left alone: one syscall less on hot files.
                with contextlib.suppress(OSError):
                    os.utime(fd)
        except CorruptFileError as exc:
            return self._load_failed(path, exc.reason, exc.detail, remove=True)
        except OSError as exc:
            return self._load_failed(path, "io", str(exc), remove=False)
        finally:
            os.close(fd)
        start = HEADER_SIZE + (chunk.first - header.first_block) * block_bytes
        nbytes = len(chunk.block_ids) * block_bytes
        self.pages.scatter(chunk.group, chunk.block_ids, view[start : start + nbytes])
        with self._cond:
            self._counters[("loads_total", "")] += 1
            self._counters[("load_bytes_total", "")] += nbytes
            job.num_bytes += nbytes
        return True

    def _load_failed(self, path: str, reason: str, detail: str, *, remove: bool) -> bool:
        self._count("load_failures_total", reason)
        action = ""
        if remove:
            action = self._remove_bad(path)
        log.warning(
            "llmd-fs-offload: refused %s (%s: %s)%s; vLLM recomputes these blocks",
            path,
            reason,
            detail,
            action,
        )
        return False

    def _remove_bad(self, path: str) -> str:
        try:
            if self.settings.on_corrupt == "quarantine":
                qdir = os.path.join(self.layout.root, "quarantine")
                os.makedirs(qdir, exist_ok=True)
                dest = os.path.join(qdir, f"{os.path.basename(path)}.{int(time.time())}")
                os.rename(path, dest)
                self._count("files_quarantined_total")
                return f", moved to {dest}"
            os.unlink(path)
            self._count("files_deleted_total")
            return ", deleted"
        except FileNotFoundError:
            return ""
        except OSError as exc:
            return f", could not remove it: {exc}"
