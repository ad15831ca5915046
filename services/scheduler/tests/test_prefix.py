"""The approximate prefix index: llm-d's hashing, contiguous matching, bounded LRUs."""

from __future__ import annotations

import struct

import xxhash

from llmd.scheduler.prefix import ApproxPrefixIndex, prompt_hashes


def reference_hashes(text: bytes, model: str, salt: str, block: int) -> list[int]:
    """llm-d's scheme spelled out: pad to 4 bytes, uint32 LE tokens, chained xxh64."""
    padded = text + b"\0" * (-len(text) % 4)
    tokens = list(struct.unpack(f"<{len(padded) // 4}I", padded))
    prev = xxhash.xxh64_intdigest((model + salt).encode())
    out = []
    for i in range(0, len(tokens), block):
        chunk = tokens[i : i + block]
        block_id = xxhash.xxh64_intdigest(struct.pack(f"<{len(chunk)}I", *chunk))
        prev = xxhash.xxh64_intdigest(struct.pack("<QQ", block_id, prev))
        out.append(prev)
    return out


def test_hashes_follow_llm_d_scheme_including_partial_last_block() -> None:
    text = b"the quick brown fox jumps over the lazy dog " * 20 + b"xyz"
    got = prompt_hashes([text], "qwen", "salt", 64, 0)
    assert got == reference_hashes(text, "qwen", "salt", 64)
    assert len(got) == -(-len(text) // 256)


def test_model_and_salt_seed_the_chain() -> None:
    text = [b"a" * 1000]
    assert prompt_hashes(text, "m1", "", 64, 0) != prompt_hashes(text, "m2", "", 64, 0)
    assert prompt_hashes(text, "m1", "", 64, 0) != prompt_hashes(text, "m1", "s", 64, 0)


def test_max_blocks_caps_each_prompt() -> None:
    assert len(prompt_hashes([b"a" * 10_000], "m", "", 64, 5)) == 5


def test_match_counts_only_contiguous_blocks_per_endpoint() -> None:
    idx = ApproxPrefixIndex(100)
    hashes = [1, 2, 3, 4]
    idx.add("a", hashes)
    idx.add("b", [1, 3, 4])  # b lacks block 2
    assert idx.match(hashes) == {"a": 4, "b": 1}
    assert idx.match([9, 1]) == {}


def test_lru_is_bounded_and_evicts_oldest() -> None:
    idx = ApproxPrefixIndex(3)
    idx.add("a", [1, 2, 3])
    idx.add("a", [4])
    assert idx.entries == 3
    assert idx.match([1]) == {}
    assert idx.match([2, 3, 4]) == {"a": 3}
    idx.set_capacity("a", 1)
    assert idx.entries == 1
    assert idx.evictions == 3


def test_removed_endpoint_leaves_the_index() -> None:
    idx = ApproxPrefixIndex(10)
    idx.add("a", [1, 2])
    idx.add("b", [1])
    idx.remove_endpoint("a")
    assert idx.match([1, 2]) == {"b": 1}
    assert len(idx) == 1
