"""Where a chunk's file lives, following vLLM's FileMapper scheme.

`<root>/<model with / as _>_<12 hex of sha256(fields)>/config.json` describes a namespace, and a
chunk with offload key `K` (block hash bytes + 4-byte group index) of rank `r` lives at
`<base>_r<r>/<hex[:3]>/<hex[3:5]>_g<group>/<hex>.bin` where `hex` is the block hash in hex.

The fields are vLLM's (model, tokens per hash, blocks per file, parallel sizes, dtype, KV groups,
engine) plus `file_format`, so llmd's files (which carry a header) never share a directory with
vLLM's own `fs` tier or llm-d's connector (raw payloads): the tree has the same shape, the
namespaces differ. The SHA-256 of the same fields, with the per-block byte layout, is the
fingerprint written in every file header, so a file copied or linked into the wrong namespace is
still refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

FILE_FORMAT = "llmd-kv/1"
_BASE_HASH_LEN = 12
GROUP_BYTES = 4


def split_key(key: bytes) -> tuple[bytes, int]:
    """An offload key's block hash and KV-cache group index."""
    return key[:-GROUP_BYTES], int.from_bytes(key[-GROUP_BYTES:], "big")


def make_key(block_hash: bytes, group: int) -> bytes:
    return block_hash + group.to_bytes(GROUP_BYTES, "big")


def event_hash(block_hash: bytes) -> int:
    """The 64-bit hash vLLM puts in KV events for these bytes (low 64 bits, big-endian)."""
    return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)


@dataclass(frozen=True)
class StorageLayout:
    """The namespace of one model configuration under a shared root, for one rank.

    Its digest, directories and fingerprint are computed once (every lookup, load and store
    names a path)."""

    root: Path
    fields: Mapping[str, Any]
    rank: int
    block_bytes: tuple[int, ...]
    """Bytes of one block of each KV-cache group, as this rank lays them out in a file."""

    @cached_property
    def digest(self) -> str:
        canonical = json.dumps(dict(self.fields), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:_BASE_HASH_LEN]

    @cached_property
    def base(self) -> Path:
        model = str(self.fields["model_name"]).replace("/", "_")
        return self.root / f"{model}_{self.digest}"

    @cached_property
    def rank_dir(self) -> Path:
        return Path(f"{self.base}_r{self.rank}")

    @cached_property
    def fingerprint(self) -> bytes:
        doc = {"fields": dict(self.fields), "rank": self.rank, "block_bytes": self.block_bytes}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()

    def path(self, key: bytes) -> str:
        block_hash, group = split_key(key)
        h = block_hash.hex()
        return f"{self.rank_dir}/{h[:3]}/{h[3:5]}_g{group}/{h}.bin"

    def write_config(self) -> None:
        """Write `config.json` once (atomically; a concurrent writer's copy is identical)."""
        path = self.base / "config.json"
        if path.exists():
            return
        self.base.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"config.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(self.fields), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def parse_chunk_path(path: str) -> tuple[bytes, int] | None:
    """(block hash, group) of a chunk file named by `StorageLayout.path`, or None for any other
    file (temp files, config.json, quarantine)."""
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    if not name.endswith(".bin") or "_g" not in parent:
        return None
    h = name[:-4]
    try:
        block_hash = bytes.fromhex(h)
        group = int(parent.rsplit("_g", 1)[1])
    except ValueError:
        return None
    if not block_hash or parent.split("_g")[0] != h[3:5]:
        return None
    return block_hash, group
