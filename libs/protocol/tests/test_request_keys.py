"""llm-d request keys against golden values computed by Go llm-d."""

from __future__ import annotations

import struct

import cbor2
import fnv_c
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from llmd.protocol import ProtocolError
from llmd.protocol.request_keys import model_init_key, request_keys

TOKENS = list(range(1, 41))


def test_cbor_fnv_matches_go_llm_d() -> None:
    assert model_init_key("test-model") == 17515353698173365712
    assert request_keys(TOKENS, "test-model") == [9540012594951042066, 16921089685996993662]
    assert request_keys(TOKENS, "test-model", hash_seed="42") == [
        3239622172847516705,
        18365376266021390534,
    ]
    assert request_keys(TOKENS, "test-model", extras=[["abc"], None]) == [
        12050696698905974389,
        9231155464469877172,
    ]


def reference_cbor_fnv(
    tokens: list[int], model: str, bs: int, extras: list[list[str] | None]
) -> list[int]:
    def h(p: int, toks: list[int] | None, x: object) -> int:
        out: int = fnv_c.fnv1a_64(cbor2.dumps([p, toks, x], canonical=True))
        return out

    p = h(fnv_c.fnv1a_64(b""), None, model)
    keys = []
    for i in range(len(tokens) // bs):
        x = [{"Hash": s} for s in extras[i]] if extras[i] else None
        p = h(p, tokens[i * bs : (i + 1) * bs], x)
        keys.append(p)
    return keys


@settings(max_examples=150)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=120),
    st.sampled_from([1, 16, 23, 24, 64, 300]),
    st.text(min_size=1, max_size=12),
    st.data(),
)
def test_fast_cbor_encoding_equals_a_generic_canonical_encoder(
    tokens: list[int], bs: int, model: str, data: st.DataObject
) -> None:
    n = len(tokens) // bs
    extras = data.draw(
        st.lists(st.none() | st.lists(st.text(max_size=4), max_size=2), min_size=n, max_size=n)
    )
    assert request_keys(tokens, model, block_size=bs, extras=extras) == reference_cbor_fnv(
        tokens, model, bs, extras
    )


def test_xxh64_variant_follows_the_router_formula() -> None:
    def h(p: int, toks: list[int], extras: list[str]) -> int:
        raw = struct.pack("<Q", p) + b"".join(struct.pack("<I", t) for t in toks)
        raw += b"".join(struct.pack("<Q", len(e.encode())) + e.encode() for e in extras)
        return xxhash.xxh64_intdigest(raw)

    init = h(xxhash.xxh64_intdigest(b"7"), [], ["m"])
    k0 = h(init, TOKENS[:16], ["img"])
    k1 = h(k0, TOKENS[16:32], [])
    assert request_keys(TOKENS, "m", hash_seed="7", extras=[["img"], None], algo="xxh64") == [
        k0,
        k1,
    ]


@pytest.mark.parametrize("algo", ["cbor-fnv", "xxh64"])
def test_chains_continue_from_a_parent_key(algo: str) -> None:
    full = request_keys(TOKENS * 2, "m", algo=algo)
    assert request_keys(TOKENS[16:] + TOKENS, "m", parent=full[0], algo=algo) == full[1:]


def test_partial_chunks_get_no_key_and_bad_input_is_reported() -> None:
    assert request_keys(TOKENS[:15], "m") == []
    with pytest.raises(ProtocolError, match="block_size"):
        request_keys(TOKENS, "m", block_size=0)
    with pytest.raises(ProtocolError, match="algorithm"):
        request_keys(TOKENS, "m", algo="md5")
    with pytest.raises(ProtocolError, match="extras"):
        request_keys(TOKENS, "m", extras=[None])
    with pytest.raises(ProtocolError, match="32-bit"):
        request_keys([2**33] * 16, "m", algo="xxh64")


@given(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), max_size=300))
def test_token_chunks_encode_as_canonical_cbor(tokens: list[int]) -> None:
    from llmd.protocol.request_keys import _cbor_tokens

    assert _cbor_tokens(tokens) == cbor2.dumps(tokens, canonical=True)
