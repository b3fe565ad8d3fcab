"""vLLM's KV-event wire shapes: the 12 messages captured from a real vLLM 0.32 decode to what
vLLM's own decoder (msgspec) made of them, re-encode byte for byte, and every batch round-trips in
both event layouts (maps keyed "type", as 0.26+ send; tag-first arrays, as older versions send)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.wire import (
    REPLAY_END_SEQ,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    VllmKvDecodeError,
    VllmKvMessage,
    decode_kv_batch,
    encode_kv_batch,
    kv_message_frames,
    parse_kv_message,
    parse_replay_reply,
    parse_replay_request,
    replay_end_frames,
    replay_reply_frames,
    replay_request_frames,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "vllm"
U64 = 2**64


def captured_messages() -> list[list[bytes]]:
    """vllm_kv_events.msgpack: per message a u32-BE frame count, then per frame u32-BE length +
    bytes (reference/vllm-cpu.md section 4, "Event samples saved")."""
    data = (SAMPLES / "vllm_kv_events.msgpack").read_bytes()
    messages: list[list[bytes]] = []
    offset = 0
    while offset < len(data):
        (count,) = struct.unpack_from(">I", data, offset)
        offset += 4
        frames = []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", data, offset)
            offset += 4
            frames.append(data[offset : offset + length])
            offset += length
        messages.append(frames)
    return messages


def read_message(frames: list[bytes]) -> VllmKvMessage | None:
    """Live messages have 3 frames; replay replies, as the DEALER got them, 4."""
    return parse_kv_message(frames) if len(frames) == 3 else parse_replay_reply(frames)


def as_plain(batch: VllmKvBatch) -> list[Any]:
    """A decoded batch in the shape of vllm_kv_events.decoded.json (msgspec's view)."""
    events: list[dict[str, Any]] = []
    for event in batch.events:
        if isinstance(event, VllmBlockStored):
            fields = {
                "type": "BlockStored",
                "block_hashes": list(event.block_hashes),
                "parent_block_hash": event.parent_block_hash,
                "token_ids": list(event.token_ids),
                "block_size": event.block_size,
                "lora_id": event.lora_id,
                "medium": event.medium,
                "lora_name": event.lora_name,
                "extra_keys": None if event.extra_keys is None else list(event.extra_keys),
                "group_idx": event.group_idx,
                "kv_cache_spec_kind": event.kv_cache_spec_kind,
                "kv_cache_spec_sliding_window": event.kv_cache_spec_sliding_window,
            }
        elif isinstance(event, VllmBlockRemoved):
            fields = {
                "type": "BlockRemoved",
                "block_hashes": list(event.block_hashes),
                "medium": event.medium,
                "group_idx": event.group_idx,
            }
        else:
            fields = {"type": "AllBlocksCleared"}
        # msgspec's decoded view omits what the wire omitted.
        events.append({k: v for k, v in fields.items() if v is not None or k in _ALWAYS})
    return [batch.ts, events, batch.data_parallel_rank]


_ALWAYS = {"parent_block_hash", "lora_id", "medium", "lora_name"}


# -- the captured messages ----------------------------------------------------------------------


def test_the_twelve_captured_messages_decode_as_vllm_decoded_them() -> None:
    messages = captured_messages()
    expected = json.loads((SAMPLES / "vllm_kv_events.decoded.json").read_text())
    assert len(messages) == len(expected) == 12
    kinds: list[str] = []
    for index, (frames, want) in enumerate(zip(messages, expected, strict=True)):
        assert len(frames) == want["n_frames"], index
        message = read_message(frames)
        if want["payload"] is None:
            assert message is None, f"message {index} is the replay END marker"
            assert int.from_bytes(frames[2], "big") == REPLAY_END_SEQ == want["seq"]
            kinds.append("END")
            continue
        assert message is not None
        assert message.topic == want["topic"].encode()
        assert message.seq == want["seq"]
        batch = decode_kv_batch(message.payload)
        assert batch.unknown_event_types == ()
        assert as_plain(batch) == want["payload"], f"message {index} (seq {message.seq})"
        kinds.extend(type(e).__name__ for e in batch.events)
    # The samples cover every event type, parents, and u64 hashes above 2**63.
    assert {"VllmBlockStored", "VllmBlockRemoved", "VllmAllBlocksCleared", "END"} <= set(kinds)


def test_captured_payloads_re_encode_byte_for_byte_in_the_map_layout() -> None:
    for frames in captured_messages():
        message = read_message(frames)
        if message is not None:
            assert encode_kv_batch(decode_kv_batch(message.payload)) == message.payload


def test_captured_hashes_above_2_63_stay_unsigned() -> None:
    hashes = [
        h
        for frames in captured_messages()
        if (message := read_message(frames)) is not None
        for event in decode_kv_batch(message.payload).events
        if not isinstance(event, VllmAllBlocksCleared)
        for h in event.block_hashes
    ]
    assert 15042275878186439894 in hashes
    assert all(0 <= h < U64 for h in hashes)


def test_a_live_message_re_frames_as_captured() -> None:
    frames = captured_messages()[5]
    message = parse_kv_message(frames)
    assert kv_message_frames(b"kv", message.seq, message.payload) == frames


def test_the_captured_replay_replies_re_frame_as_captured() -> None:
    messages = captured_messages()
    reply = messages[8]
    message = parse_replay_reply(reply)
    assert message is not None
    assert replay_reply_frames(message.seq, message.payload, topic=b"kv") == reply
    assert replay_end_frames() == messages[11]


# -- layouts and hash forms ---------------------------------------------------------------------


def stored_array(**changes: Any) -> list[Any]:
    fields: dict[str, Any] = {
        "block_hashes": [1, 2],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
    } | changes
    return ["BlockStored", *fields.values()]


def test_a_tag_first_array_event_from_vllm_0_9_decodes() -> None:
    # v0.9: [tag, block_hashes, parent, token_ids, block_size, lora_id], no medium yet.
    payload = msgpack.packb([1.5, [[*stored_array(), None]]])
    (event,) = decode_kv_batch(payload).events
    assert event == VllmBlockStored(
        block_hashes=(1, 2), parent_block_hash=None, token_ids=range(8), block_size=4, medium=None
    )


def test_a_batch_map_decodes_like_a_batch_array() -> None:
    events = [stored_array(), ["BlockRemoved", [1], "GPU"], ["AllBlocksCleared"]]
    as_array = decode_kv_batch(msgpack.packb([2.0, events, 1]))
    as_map = decode_kv_batch(msgpack.packb({"ts": 2.0, "events": events, "data_parallel_rank": 1}))
    assert as_array == as_map
    assert as_array.data_parallel_rank == 1
    assert decode_kv_batch(msgpack.packb([2.0, events])).data_parallel_rank is None


def test_a_negative_i64_hash_reads_as_the_same_64_bits_unsigned() -> None:
    payload = msgpack.packb(
        [0.0, [stored_array(block_hashes=[-1, -(2**63)], parent_block_hash=-2)]]
    )
    (event,) = decode_kv_batch(payload).events
    assert event.block_hashes == (U64 - 1, 2**63)
    assert event.parent_block_hash == U64 - 2


def test_a_bytes_hash_reads_as_its_last_8_bytes_big_endian() -> None:
    # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 sends the 32-byte digest; its key is what vLLM would
    # have sent as an int (maybe_convert_block_hash).
    digest = bytes(range(32))
    payload = msgpack.packb(
        [0.0, [stored_array(block_hashes=[digest, b"\x01"], parent_block_hash=digest)]],
        use_bin_type=True,
    )
    (event,) = decode_kv_batch(payload).events
    assert event.block_hashes == (int.from_bytes(digest, "big") % U64, 1)
    assert event.parent_block_hash == int.from_bytes(digest[-8:], "big")


def test_unknown_event_types_are_skipped_and_named() -> None:
    events = [
        {"type": "BlockTierMoved", "block_hashes": [1]},
        ["SomethingNew", 1, 2],
        {"type": "AllBlocksCleared"},
    ]
    batch = decode_kv_batch(msgpack.packb([0.0, events, 0]))
    assert batch.events == (VllmAllBlocksCleared(),)
    assert batch.unknown_event_types == ("BlockTierMoved", "SomethingNew")


def test_fields_newer_than_this_decoder_are_ignored() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [3],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "locality": "LOCAL",
        "session_id": "s",
    }
    (decoded,) = decode_kv_batch(msgpack.packb([0.0, [event], 0])).events
    assert decoded == VllmBlockStored(
        block_hashes=(3,), parent_block_hash=None, token_ids=(1, 2), block_size=2
    )


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb(7), "array or map"),
        (msgpack.packb([1.0]), "array of 1 items"),
        (msgpack.packb({"ts": 1.0}), "'ts' and 'events'"),
        (msgpack.packb(["x", []]), "'ts' must be a number"),
        (msgpack.packb([1.0, {}]), "'events' must be an array"),
        (msgpack.packb([1.0, [], "0"]), "'data_parallel_rank'"),
        (msgpack.packb([1.0, [7]]), "event 0 must be a map"),
        (msgpack.packb([1.0, [{"block_hashes": []}]]), "no string type tag"),
        (msgpack.packb([1.0, [["BlockStored", [1], None]]]), "lacks field 'token_ids'"),
        (msgpack.packb([1.0, [{"type": "BlockRemoved"}]]), "lacks field 'block_hashes'"),
        (msgpack.packb([1.0, [stored_array(block_hashes=[True])]]), "'block_hashes'"),
        (msgpack.packb([1.0, [stored_array(block_hashes=[b""])]]), "non-empty bytes"),
        (msgpack.packb([1.0, [stored_array(block_hashes=[1.5])]]), "'block_hashes'"),
        (msgpack.packb([1.0, [stored_array(block_hashes=7)]]), "'block_hashes' must be an array"),
        (msgpack.packb([1.0, [stored_array(parent_block_hash="p")]]), "'parent_block_hash'"),
        (msgpack.packb([1.0, [stored_array(token_ids=[-1])]]), "'token_ids'"),
        (msgpack.packb([1.0, [stored_array(token_ids=[2**32])]]), "'token_ids'"),
        (msgpack.packb([1.0, [stored_array(block_size=0)]]), "'block_size'"),
        (msgpack.packb([1.0, [[*stored_array(), "7"]]]), "'lora_id'"),
        (msgpack.packb([1.0, [[*stored_array(), None, 5]]]), "'medium'"),
        (msgpack.packb([1.0, [["BlockRemoved", [1], "GPU", "0"]]]), "'group_idx'"),
    ],
)
def test_a_malformed_payload_raises_naming_what_is_wrong(payload: bytes, names: str) -> None:
    with pytest.raises(VllmKvDecodeError, match=names):
        decode_kv_batch(payload)


# -- frames -------------------------------------------------------------------------------------


def test_a_live_message_needs_three_frames_and_an_8_byte_seq() -> None:
    with pytest.raises(VllmKvDecodeError, match="3 frames"):
        parse_kv_message([b"kv", b"\x00" * 8])
    with pytest.raises(VllmKvDecodeError, match="8 bytes"):
        parse_kv_message([b"kv", b"\x00" * 4, b"x"])


def test_replay_replies_parse_in_both_layouts() -> None:
    new = parse_replay_reply(replay_reply_frames(5, b"p", topic=b"kv@1"))
    old = parse_replay_reply(replay_reply_frames(5, b"p", topic=None))
    assert new == VllmKvMessage(topic=b"kv@1", seq=5, payload=b"p")
    assert old == VllmKvMessage(topic=None, seq=5, payload=b"p")
    assert parse_replay_reply(replay_end_frames()) is None
    assert parse_replay_reply(replay_end_frames(topic_frame=False)) is None
    assert replay_end_frames(topic_frame=False) == [b"", b"\xff" * 8, b""]
    with pytest.raises(VllmKvDecodeError, match="no delimiter"):
        parse_replay_reply([b"kv", b"\x00" * 8, b"p"])
    with pytest.raises(VllmKvDecodeError, match="got 2 frames"):
        parse_replay_reply([b"", b"p"])


def test_a_replay_request_round_trips() -> None:
    frames = replay_request_frames(2**64 - 2)
    assert frames == [b"", b"\xff" * 7 + b"\xfe"]
    assert parse_replay_request(frames) == 2**64 - 2
    with pytest.raises(VllmKvDecodeError, match="replay request"):
        parse_replay_request([b"\x00" * 8])


# -- round trips --------------------------------------------------------------------------------

HASHES = st.integers(0, U64 - 1)
OPTIONAL_INT = st.none() | st.integers(0, 2**31)
OPTIONAL_TEXT = st.none() | st.text(max_size=8)


@st.composite
def stored(draw: st.DrawFn) -> VllmBlockStored:
    block_size = draw(st.integers(1, 4))
    hashes = draw(st.lists(HASHES, max_size=3))
    return VllmBlockStored(
        block_hashes=hashes,
        parent_block_hash=draw(st.none() | HASHES),
        token_ids=draw(
            st.lists(
                st.integers(0, 2**32 - 1),
                min_size=len(hashes) * block_size,
                max_size=len(hashes) * block_size,
            )
        ),
        block_size=block_size,
        lora_id=draw(OPTIONAL_INT),
        medium=draw(OPTIONAL_TEXT),
        lora_name=draw(OPTIONAL_TEXT),
        extra_keys=draw(
            st.none()
            | st.lists(st.none() | st.tuples(st.text(max_size=4), st.integers(0, 9)), max_size=3)
        ),
        group_idx=draw(OPTIONAL_INT),
        kv_cache_spec_kind=draw(OPTIONAL_TEXT),
        kv_cache_spec_sliding_window=draw(OPTIONAL_INT),
    )


EVENTS = st.one_of(
    stored(),
    st.builds(
        VllmBlockRemoved,
        block_hashes=st.lists(HASHES, max_size=3),
        medium=OPTIONAL_TEXT,
        group_idx=OPTIONAL_INT,
    ),
    st.just(VllmAllBlocksCleared()),
)
BATCHES = st.builds(
    VllmKvBatch,
    ts=st.floats(allow_nan=False),
    events=st.lists(EVENTS, max_size=5),
    data_parallel_rank=OPTIONAL_INT,
)


@given(BATCHES, st.sampled_from(["map", "array"]))
def test_every_batch_round_trips_in_both_layouts(batch: VllmKvBatch, layout: Any) -> None:
    payload = encode_kv_batch(batch, layout=layout)
    assert decode_kv_batch(payload) == batch
    # The two layouts differ only in how events are written.
    first = msgpack.unpackb(payload)[1]
    assert all(isinstance(e, dict if layout == "map" else list) for e in first)


@given(BATCHES, st.integers(0, U64 - 1), st.binary(max_size=8))
def test_every_batch_round_trips_through_frames(batch: VllmKvBatch, seq: int, topic: bytes) -> None:
    payload = encode_kv_batch(batch)
    live = parse_kv_message(kv_message_frames(topic, seq, payload))
    assert live == VllmKvMessage(topic=topic, seq=seq, payload=payload)
    replayed = parse_replay_reply(replay_reply_frames(seq, payload, topic=topic))
    assert replayed == live
    assert decode_kv_batch(live.payload) == batch


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        encode_kv_batch(VllmKvBatch(ts=0.0, events=()), layout="json")  # type: ignore[arg-type]


def merged(events: tuple[Any, ...]) -> list[Any]:
    """The events with each run of removals of one medium and group as one (a reference)."""
    out: list[Any] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, VllmBlockRemoved)
            and isinstance(last, VllmBlockRemoved)
            and (event.medium, event.group_idx) == (last.medium, last.group_idx)
        ):
            out[-1] = VllmBlockRemoved(
                [*last.block_hashes, *event.block_hashes], last.medium, last.group_idx
            )
        else:
            out.append(event)
    return out


@given(BATCHES, st.sampled_from(["map", "array"]))
def test_merged_removals_hold_the_same_hashes_in_the_same_order(
    batch: VllmKvBatch, layout: Any
) -> None:
    payload = encode_kv_batch(batch, layout=layout)
    got = decode_kv_batch(payload, merge_removals=True)
    assert list(got.events) == merged(batch.events)
    assert (got.ts, got.data_parallel_rank) == (batch.ts, batch.data_parallel_rank)


def test_merged_removals_also_come_from_payloads_the_careful_path_reads() -> None:
    # A batch map (no released vLLM sends one) with an unknown event between removals.
    events = [
        ["BlockRemoved", [1], "GPU"],
        ["BlockRemoved", [2], "GPU"],
        ["BlockRemoved", [3], "CPU"],
        ["Unknown"],
        ["BlockRemoved", [4], "CPU"],
    ]
    got = decode_kv_batch(msgpack.packb({"ts": 1.0, "events": events}), merge_removals=True)
    assert got.events == (
        VllmBlockRemoved([1, 2], "GPU"),
        VllmBlockRemoved([3, 4], "CPU"),
    )
    assert got.unknown_event_types == ("Unknown",)


def long_stored(blocks: int, **changes: Any) -> dict[str, Any]:
    """A map-layout BlockStored of ``blocks`` blocks of 16, as vLLM 0.32 writes it."""
    return {
        "type": "BlockStored",
        "block_hashes": [2**63 + n for n in range(blocks)],
        "parent_block_hash": None,
        "token_ids": [n % 151_936 for n in range(blocks * 16)],
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None] * blocks,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    } | changes


def test_a_long_prompts_block_stored_decodes_whole() -> None:
    (event,) = decode_kv_batch(msgpack.packb([1.0, [long_stored(6_250)], 0])).events
    assert isinstance(event, VllmBlockStored)
    assert event.block_hashes == tuple(2**63 + n for n in range(6_250))
    assert event.token_ids == tuple(n % 151_936 for n in range(100_000))
    assert event.extra_keys == (None,) * 6_250


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"token_ids": [*range(99_999), 2**32]}, "'token_ids'"),
        ({"token_ids": [*range(99_999), "7"]}, "'token_ids'"),
        ({"block_hashes": [*range(6_249), 1.5]}, "'block_hashes'"),
        ({"block_size": -16}, "'block_size'"),
        ({"medium": 7}, "'medium'"),
    ],
)
def test_one_bad_value_in_a_long_event_is_named(changes: dict[str, Any], names: str) -> None:
    payload = msgpack.packb([1.0, [long_stored(6_250), long_stored(6_250, **changes)], 0])
    with pytest.raises(VllmKvDecodeError, match=f"event 1 \\(BlockStored\\) field {names}"):
        decode_kv_batch(payload)


def test_signed_hashes_in_a_long_event_read_unsigned() -> None:
    event = long_stored(3, block_hashes=[-1, 5, -(2**63)], parent_block_hash=-2)
    (decoded,) = decode_kv_batch(msgpack.packb([1.0, [event]])).events
    assert decoded.block_hashes == (U64 - 1, 5, 2**63)
    assert decoded.parent_block_hash == U64 - 2
