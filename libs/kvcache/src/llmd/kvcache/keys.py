"""Request keys: what the index is keyed by, computable from a prompt's tokens alone.

llm-d's dual-key design: the index's primary keys are *request keys* (a chained hash of token
chunks, the model name and per-block extra features, `llmd.protocol.request_keys`), so scoring
needs neither vLLM's hash algorithm nor its seed. KV events carry vLLM's *engine keys*; ingestion
re-hashes the event's `token_ids` into request keys and remembers engine -> request for removals.

Extra features per block are the strings that distinguish equal tokens: multimodal item ids and
the cache salt (block 0 only). vLLM 0.32 publishes a block's extra keys untyped: the bare LoRA
name (every block of a LoRA request), `(mm_id, offset)` pairs, the bare salt string and the
prompt-embeds digest bytes. llm-d reads the LoRA name as a multimodal id, so LoRA prefixes never
match (a known llm-d defect); `event_block_extras` strips it, and the digest bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmd.protocol.errors import ProtocolError
from llmd.protocol.request_keys import (
    DEFAULT_BLOCK_SIZE,
    EMPTY_KEY,
    REQUEST_KEY_ALGOS,
    request_keys,
)

BlockExtras = list[list[str] | None]


@dataclass(frozen=True, slots=True)
class TokenProcessorConfig:
    """llm-d's `tokenProcessorConfig`: must be equal on the read and write paths (and across
    replicas sharing a Valkey index)."""

    block_size_tokens: int = DEFAULT_BLOCK_SIZE
    hash_seed: str = ""
    algo: str = "cbor-fnv"

    def __post_init__(self) -> None:
        if self.block_size_tokens <= 0:
            raise ValueError(f"blockSizeTokens must be positive, got {self.block_size_tokens}")
        if self.algo not in REQUEST_KEY_ALGOS:
            raise ValueError(f"hashAlgorithm {self.algo!r} is not one of {REQUEST_KEY_ALGOS}")


class TokenProcessor:
    """Tokens (+ extras) -> request keys, for prompts and for event payloads alike."""

    def __init__(self, config: TokenProcessorConfig | None = None) -> None:
        self.config = config or TokenProcessorConfig()

    @property
    def block_size(self) -> int:
        return self.config.block_size_tokens

    def keys(
        self,
        tokens: Sequence[int],
        model: str,
        *,
        extras: BlockExtras | None = None,
        parent: int = EMPTY_KEY,
    ) -> list[int]:
        """Request keys of every full block; `parent` continues a chain (0: from the model)."""
        c = self.config
        try:
            return request_keys(
                tokens,
                model,
                block_size=c.block_size_tokens,
                hash_seed=c.hash_seed,
                extras=extras,
                parent=parent,
                algo=c.algo,
            )
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None

    def prompt_keys(
        self,
        tokens: Sequence[int],
        model: str,
        *,
        cache_salt: str | None = None,
        mm_items: Sequence[tuple[str, int, int]] = (),
    ) -> list[int]:
        """Keys for a prompt about to be scheduled (read path).

        `mm_items` are `(id, offset, length)` placeholders; an item's id is an extra feature of
        every block it overlaps. The cache salt is folded into block 0, after the items, as vLLM
        orders block 0's extra keys.
        """
        n_blocks = len(tokens) // self.block_size
        extras = prompt_extras(n_blocks, self.block_size, cache_salt, mm_items)
        return self.keys(tokens, model, extras=extras)


def prompt_extras(
    n_blocks: int,
    block_size: int,
    cache_salt: str | None,
    mm_items: Sequence[tuple[str, int, int]] = (),
) -> BlockExtras | None:
    """Per-block extra features of a prompt (None when there are none)."""
    if n_blocks == 0 or (not cache_salt and not mm_items):
        return None
    extras: BlockExtras = [None] * n_blocks
    for item_id, offset, length in sorted(mm_items, key=lambda m: m[1]):
        first = max(0, offset // block_size)
        last = min(n_blocks - 1, (offset + max(length, 1) - 1) // block_size)
        for b in range(first, last + 1):
            extras[b] = [*(extras[b] or []), item_id]
    if cache_salt:
        extras[0] = [*(extras[0] or []), cache_salt]
    return extras if any(e for e in extras) else None


def event_block_extras(
    raw: Sequence[tuple[Any, ...] | None] | None,
    lora_name: str | None,
    n_blocks: int,
) -> BlockExtras | None:
    """Extra features per request-key block from a BlockStored's `extra_keys`.

    Keeps strings (multimodal ids, the cache salt) and the id of `(id, offset)` pairs; drops the
    LoRA name (the first element when `lora_name` is set: the model name already carries it),
    bytes (prompt-embeds digests) and anything else. The event's block count may differ from
    `n_blocks` (engine blocks of another size): fewer engine blocks are replicated, more are
    merged, as llm-d realigns them.
    """
    if not raw:
        return None
    parsed: list[list[str] | None] = []
    for block in raw:
        items: list[str] = []
        if block:
            elems = list(block)
            if lora_name and elems and elems[0] == lora_name:
                elems = elems[1:]
            for e in elems:
                if isinstance(e, str):
                    items.append(e)
                elif isinstance(e, (list, tuple)) and e and isinstance(e[0], str):
                    items.append(e[0])
        parsed.append(items or None)
    if not any(parsed) or n_blocks == 0:
        return None
    engine = len(parsed)
    if engine == n_blocks:
        return parsed
    out: list[list[str] | None] = [None] * n_blocks
    if engine < n_blocks:
        for i in range(n_blocks):
            out[i] = parsed[i * engine // n_blocks]
    else:
        for i, block_items in enumerate(parsed):
            if block_items:
                j = i * n_blocks // engine
                out[j] = [*(out[j] or []), *block_items]
    return out
