"""KV-event codec: vLLM 0.32 map form, legacy arrays, garbage, topics."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmd.protocol import DecodeError, TopicError
from llmd.protocol.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVTopic,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_batch_legacy,
    encode_seq,
    format_topic,
    parse_topic,
    to_u64,
)

# The exact bytes vLLM 0.32 produces for this batch (captured from its ZMQ publisher).
GOLDEN_BATCH = bytes.fromhex(
    "93cb3ff800000000000093"
    "88a474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739201cf8000000000000005"
    "b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f69647393010203aa626c6f636b5f73697a6510"
    "a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0"
    "83a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739107a66d656469756da3435055"
    "81a474797065b0416c6c426c6f636b73436c6561726564"
    "00"
)


def golden_events() -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    return [
        BlockStored(
            block_hashes=[1, 2**63 + 5],
            parent_block_hash=None,
            token_ids=[1, 2, 3],
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        ),
        BlockRemoved(block_hashes=[7], medium="CPU"),
        AllBlocksCleared(),
    ]


def test_encoder_writes_vllm_032_bytes_exactly() -> None:
    batch = EventBatch(ts=1.5, events=golden_events(), data_parallel_rank=0)
    assert encode_batch(batch) == GOLDEN_BATCH


def test_decoder_reads_vllm_032_map_encoding() -> None:
    batch = decode_batch(GOLDEN_BATCH)
    assert batch.ts == 1.5
    assert batch.data_parallel_rank == 0
    assert batch.events == golden_events()
    stored = batch.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes[1] == 2**63 + 5


def test_decoder_reads_legacy_positional_arrays() -> None:
    batch = EventBatch(ts=2.0, events=golden_events(), data_parallel_rank=3)
    assert decode_batch(encode_batch_legacy(batch)) == batch


def test_legacy_events_with_absent_trailing_fields_default_to_none() -> None:
    payload = msgspec.msgpack.encode(
        [1.0, [["BlockStored", [5, 6], 4, [1, 2, 3, 4], 2, None]], 0]
    )  # only 5 of 14 fields, as the oldest vLLM sent them
    (ev,) = decode_batch(payload).events
    assert isinstance(ev, BlockStored)
    assert ev.parent_block_hash == 4
    assert ev.medium is None
    assert ev.group_idx is None


def test_unknown_fields_and_event_types_are_tolerated_and_counted() -> None:
    payload = msgspec.msgpack.encode(
        [
            1.0,
            [
                {"type": "BlockRemoved", "block_hashes": [9], "medium": "GPU", "future": [1]},
                {"type": "SomethingNew", "x": 1},
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch.events == [BlockRemoved(block_hashes=[9], medium="GPU")]
    assert batch.unknown_events == 1
    assert batch.data_parallel_rank is None


def test_bin_hashes_are_accepted_and_reduce_to_their_last_eight_bytes() -> None:
    digest = bytes(range(32))
    payload = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockRemoved", "block_hashes": [digest], "medium": None}], 0]
    )
    (ev,) = decode_batch(payload).events
    assert isinstance(ev, BlockRemoved)
    assert ev.block_hashes == [digest]
    assert to_u64(ev.block_hashes[0]) == int.from_bytes(digest[-8:], "big")
    assert to_u64(b"\x01") == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not valid msgpack"),
        (GOLDEN_BATCH[:-7], "not valid msgpack"),
        (msgspec.msgpack.encode({"ts": 1}), "must be an array"),
        (msgspec.msgpack.encode([1.0]), "must be an array"),
        (msgspec.msgpack.encode(["x", []]), "ts must be a number"),
        (msgspec.msgpack.encode([1.0, {}]), "events must be an array"),
        (msgspec.msgpack.encode([1.0, [5]]), "map or a non-empty array"),
        (msgspec.msgpack.encode([1.0, [{"type": 5}]]), "event type must be a string"),
        (
            msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "ab"}]]),
            "block_hashes",
        ),
        (
            msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [-1]}]]),
            "unsigned 64-bit",
        ),
        (
            msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "token_ids": [1, "2"]}]]),
            "token ids must be ints",
        ),
        (msgspec.msgpack.encode([1.0, [], "rank"]), "data_parallel_rank"),
        # An array header claiming 2^32-1 elements with nothing behind it.
        (b"\x93\xcb" + b"\x00" * 8 + b"\xdd\xff\xff\xff\xff", "not valid msgpack"),
    ],
)
def test_garbage_raises_one_precise_error(payload: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_batch(payload)


@settings(max_examples=300)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_batch(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.lists(msgpack_values, max_size=4), st.sampled_from(["BlockStored", "BlockRemoved"]))
def test_wrongly_typed_fields_never_crash_the_decoder(fields: list[object], tag: str) -> None:
    for event in ([tag, *fields], {"type": tag, **{str(i): v for i, v in enumerate(fields)}}):
        with contextlib.suppress(DecodeError):
            decode_batch(msgspec.msgpack.encode([1.0, [event], 0]))


hashes = st.integers(0, 2**64 - 1) | st.binary(min_size=8, max_size=32)
opt_str = st.none() | st.text(max_size=10)
stored = st.builds(
    BlockStored,
    block_hashes=st.lists(hashes, max_size=5),
    parent_block_hash=st.none() | hashes,
    token_ids=st.lists(st.integers(0, 2**31), max_size=20),
    block_size=st.integers(0, 256),
    lora_id=st.none() | st.integers(0, 100),
    medium=st.sampled_from([None, "GPU", "CPU", "STORAGE"]),
    lora_name=opt_str,
    extra_keys=st.none()
    | st.lists(st.none() | st.tuples(st.text(max_size=5), st.integers(0, 9)), max_size=3),
    group_idx=st.none() | st.integers(0, 4),
    kv_cache_spec_kind=st.none() | st.just("full_attention"),
    session_id=opt_str,
)
removed = st.builds(
    BlockRemoved,
    block_hashes=st.lists(hashes, max_size=5),
    medium=st.sampled_from([None, "GPU", "CPU"]),
    group_idx=st.none() | st.integers(0, 4),
)
batches = st.builds(
    EventBatch,
    ts=st.floats(allow_nan=False),
    events=st.lists(stored | removed | st.just(AllBlocksCleared()), max_size=6),
    data_parallel_rank=st.none() | st.integers(0, 7),
)


@settings(max_examples=200)
@given(batches)
def test_map_and_legacy_encodings_round_trip(batch: EventBatch) -> None:
    assert decode_batch(encode_batch(batch)) == batch
    assert decode_batch(encode_batch_legacy(batch)) == batch


def test_sequence_frames() -> None:
    assert encode_seq(0) == b"\x00" * 8
    assert decode_seq(encode_seq(2**40 + 3)) == 2**40 + 3
    assert decode_seq(END_SEQ) == -1
    with pytest.raises(DecodeError, match="8 bytes"):
        decode_seq(b"\x00")


def test_topics_round_trip_with_slashes_and_ports() -> None:
    topic = format_topic("10.0.0.7:8000", "Qwen/Qwen3-32B")
    assert topic == "kv@10.0.0.7:8000@Qwen/Qwen3-32B"
    assert parse_topic(topic.encode()) == KVTopic("10.0.0.7:8000", "Qwen/Qwen3-32B")
    assert parse_topic("kv@pod@org/model@v2").model == "org/model@v2"
    assert KVTopic("p", "m").encode() == b"kv@p@m"


@pytest.mark.parametrize(
    "topic", ["", "kv@", "kv@pod", "kv@pod@", "kv@@model", "xx@pod@model", b"kv@\xff@m"]
)
def test_malformed_topics_are_rejected(topic: str | bytes) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_format_topic_rejects_ambiguous_pod_ids() -> None:
    with pytest.raises(TopicError, match="'@'"):
        format_topic("a@b", "m")
