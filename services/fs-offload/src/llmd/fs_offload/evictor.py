"""The evictor's core: keep a shared KV volume between its watermarks, oldest files first.

When the filesystem is at or above the high watermark (default 85% used), a pass lists every
chunk file, orders them by last access (the later of atime and mtime: the tier refreshes both on
every hit, because `relatime` makes atime alone useless) and removes the least recently used
until usage would be at the low watermark (default 70%). It never removes

- a file accessed within `min_age_s` (a scheduler may just have looked it up), nor
- a file being read: readers hold a shared `flock` while they read, and the evictor removes a
  file only while holding the exclusive lock (taken without waiting; a busy file is skipped).

Temp files left by writers that died (`*.tmp` older than `stale_temp_age_s`) are removed too.
Every removed chunk is reported, per namespace, so the caller can publish `BlockRemoved`.
`dry_run` does everything but remove.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmd.fs_offload.layout import parse_chunk_path

log = logging.getLogger(__name__)

_RANK_DIR = re.compile(r"^(?P<base>.+)_r\d+$")


@dataclass(frozen=True, slots=True)
class ChunkFile:
    path: str
    last_access: float
    size: int
    """Bytes it occupies on disk."""


@dataclass(frozen=True, slots=True)
class Removed:
    model: str
    block_hash: bytes
    group: int
    size: int


@dataclass
class PassReport:
    usage_before: float
    usage_after: float
    files_seen: int = 0
    removed: list[Removed] = field(default_factory=list)
    bytes_removed: int = 0
    skipped_in_use: int = 0
    skipped_recent: int = 0
    stale_temps_removed: int = 0
    errors: int = 0
    dry_run: bool = False
    seconds: float = 0.0


def disk_usage(root: str) -> tuple[int, int]:
    """(used, capacity) bytes of the filesystem holding `root`, as `df` counts them."""
    st = os.statvfs(root)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return used, used + st.f_bavail * st.f_frsize


def _walk(root: str) -> Iterator[os.DirEntry[str]]:
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name != "quarantine":
                            stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry
        except FileNotFoundError:
            continue


def remove_unless_busy(path: str) -> bool:
    """Remove `path` while holding its exclusive flock; False when a reader holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


class Evictor:
    def __init__(
        self,
        root: str,
        *,
        high: float = 0.85,
        low: float = 0.70,
        min_age_s: float = 60.0,
        stale_temp_age_s: float = 3600.0,
        dry_run: bool = False,
        capacity_bytes: int = 0,
        usage: Callable[[str], tuple[int, int]] = disk_usage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < low < high <= 1:
            raise ValueError(f"watermarks must satisfy 0 < low ({low}) < high ({high}) <= 1")
        self.root = root
        self.high = high
        self.low = low
        self.min_age_s = min_age_s
        self.stale_temp_age_s = stale_temp_age_s
        self.dry_run = dry_run
        self.capacity_bytes = capacity_bytes
        """When set, usage is the bytes of the tier's files against this quota, not the
        filesystem's (a KV cache sharing a larger volume)."""
        self._usage = usage
        self._clock = clock
        self._models: dict[str, str] = {}

    def model_of(self, path: str) -> str:
        """The model of a chunk file's namespace (from its `config.json`), cached."""
        rank_dir = os.path.relpath(path, self.root).split(os.sep, 1)[0]
        model = self._models.get(rank_dir)
        if model is None:
            m = _RANK_DIR.match(rank_dir)
            base = m.group("base") if m else rank_dir
            try:
                with open(os.path.join(self.root, base, "config.json")) as f:
                    model = str(json.load(f)["model_name"])
            except (OSError, ValueError, KeyError):
                model = base
            if len(self._models) > 10_000:
                self._models.clear()
            self._models[rank_dir] = model
        return model

    def _scan(self, report: PassReport, now: float) -> tuple[list[ChunkFile], int, int]:
        """Chunk files (LRU first), bytes of every file seen, bytes of stale temps removed."""
        files: list[ChunkFile] = []
        total = 0
        stale = 0
        for entry in _walk(self.root):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            size = st.st_blocks * 512
            total += size
            if entry.name.endswith(".tmp"):
                if now - st.st_mtime > self.stale_temp_age_s:
                    if not self.dry_run:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                    report.stale_temps_removed += 1
                    stale += size
                continue
            if parse_chunk_path(entry.path) is None:
                continue
            files.append(ChunkFile(entry.path, max(st.st_atime, st.st_mtime), size))
        files.sort(key=lambda f: f.last_access)
        report.files_seen = len(files)
        return files, total, stale

    def run_once(self) -> PassReport:
        """One pass: nothing below the high watermark, else remove LRU files down to the low."""
        started = time.monotonic()
        now = self._clock()
        report = PassReport(usage_before=0.0, usage_after=0.0, dry_run=self.dry_run)
        files: list[ChunkFile] | None = None
        if self.capacity_bytes:
            files, used, stale = self._scan(report, now)
            capacity = self.capacity_bytes
        else:
            used, capacity = self._usage(self.root)
        ratio = used / capacity if capacity else 0.0
        report.usage_before = report.usage_after = ratio
        if ratio < self.high or capacity == 0:
            report.seconds = time.monotonic() - started
            return report
        if files is None:
            files, _, stale = self._scan(report, now)
        used -= stale
        target = self.low * capacity
        for i, f in enumerate(files):
            if used <= target:
                break
            if now - f.last_access < self.min_age_s:
                report.skipped_recent = len(files) - i
                break
            if not self.dry_run:
                try:
                    if not remove_unless_busy(f.path):
                        report.skipped_in_use += 1
                        continue
                except OSError as exc:
                    report.errors += 1
                    if exc.errno != errno.ENOENT:
                        log.warning("could not remove %s: %s", f.path, exc)
                    continue
            parsed = parse_chunk_path(f.path)
            assert parsed is not None
            report.removed.append(Removed(self.model_of(f.path), parsed[0], parsed[1], f.size))
            report.bytes_removed += f.size
            used -= f.size
        report.usage_after = used / capacity
        report.seconds = time.monotonic() - started
        return report
