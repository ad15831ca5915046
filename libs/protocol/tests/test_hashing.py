"""vLLM 0.32 block hashing against golden vectors taken from real vLLM."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from llmd.protocol import ProtocolError
from llmd.protocol.hashing import (
    MultiModalItem,
    block_extra_keys,
    event_hash,
    none_hash,
    to_event_extra_keys,
    vllm_block_hashes,
)

TOKENS = list(range(1, 41))  # 2 full blocks of 16 and a partial one


@pytest.fixture(autouse=True)
def _no_hash_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


@pytest.mark.parametrize(
    ("algo", "seed", "expected"),
    [
        ("sha256", None, [1403909460543360175, 1643945449041937783]),
        ("sha256", "42", [4508471921923631364, 13026579715664180657]),
        ("sha256_cbor", None, [8866452693264111234, 807986237951177663]),
        ("sha256_cbor", "42", [16300212363532267629, 8671309795006503672]),
    ],
)
def test_event_hashes_match_real_vllm(algo: str, seed: str | None, expected: list[int]) -> None:
    digests = vllm_block_hashes(TOKENS, 16, algo=algo, seed=seed)
    assert [event_hash(d) for d in digests] == expected


def test_none_hash_prefixes_match_real_vllm() -> None:
    assert none_hash("sha256").hex().startswith("066b1e8987e0")
    assert none_hash("sha256_cbor").hex().startswith("9bd96a485ad8")
    blocks = vllm_block_hashes(TOKENS, 16)
    assert blocks[0].hex().startswith("7b255da405e1")
    assert blocks[1].hex().startswith("8e717becdc20")


def test_pythonhashseed_in_the_environment_seeds_none_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert [event_hash(d) for d in vllm_block_hashes(TOKENS, 16)] == [
        4508471921923631364,
        13026579715664180657,
    ]


def test_xxhash_needs_an_explicit_seed() -> None:
    with pytest.raises(ProtocolError, match="PYTHONHASHSEED"):
        vllm_block_hashes(TOKENS, 16, algo="xxhash")
    assert len(vllm_block_hashes(TOKENS, 16, algo="xxhash", seed="0")[0]) == 16
    assert len(vllm_block_hashes(TOKENS, 16, algo="xxhash_cbor", seed="0")[0]) == 16


def test_hash_is_the_documented_pickle_of_parent_tokens_and_extras() -> None:
    extra = (("cache_salt", "s"),)
    (digest,) = vllm_block_hashes(TOKENS[:16], 16, extra_keys=[extra])
    payload = pickle.dumps((none_hash(), tuple(TOKENS[:16]), extra), protocol=5)
    assert digest == hashlib.sha256(payload).digest()


def test_chains_continue_from_a_parent() -> None:
    full = vllm_block_hashes(TOKENS, 16)
    tail = vllm_block_hashes(TOKENS[16:], 16, parent=full[0])
    assert tail == full[1:]


def test_extra_keys_change_the_hash_and_must_cover_every_block() -> None:
    plain = vllm_block_hashes(TOKENS, 16)
    salted = vllm_block_hashes(TOKENS, 16, extra_keys=[(("cache_salt", "x"),), None])
    assert salted[0] != plain[0]
    assert salted[1] != plain[1]  # chained through block 0
    with pytest.raises(ProtocolError, match="extra_keys"):
        vllm_block_hashes(TOKENS, 16, extra_keys=[None])


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(ProtocolError, match="block_size"):
        vllm_block_hashes(TOKENS, 0)
    with pytest.raises(ProtocolError, match="unknown hash algorithm"):
        vllm_block_hashes(TOKENS, 16, algo="md5")


def test_block_extra_keys_follow_vllm_order_and_placement() -> None:
    keys = block_extra_keys(
        48,
        16,
        lora=("ad", "/p/ad"),
        mm_items=[MultiModalItem("img", offset=10, length=10)],
        cache_salt="s1",
    )
    assert keys == [
        (("lora", "ad", "/p/ad"), ("mm", "img", 10), ("cache_salt", "s1")),
        (("lora", "ad", "/p/ad"), ("mm", "img", -6)),
        (("lora", "ad", "/p/ad"),),
    ]
    assert block_extra_keys(32, 16) == [None, None]


def test_event_extra_keys_drop_the_lora_path_as_vllm_does() -> None:
    published = to_event_extra_keys(
        [(("lora", "myad", "/p/ad"), ("mm", "imghash", 0), ("cache_salt", "s1")), None]
    )
    assert published == [("myad", ("imghash", 0), "s1"), None]
