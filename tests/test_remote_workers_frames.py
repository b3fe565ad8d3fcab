"""The worker protocol's frame codec: every message round-trips however the byte stream is cut,
and malformed input of any kind raises `ProtocolError`, never anything else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.engines import ActiveSequence, WorkerSnapshot
from interlock.kv import KvCleared, KvRemoved, KvStored, StoredBlock
from interlock.testing.strategies import requests
from interlock.wire import (
    MAX_FRAME_SIZE,
    EngineOutput,
    FrameParser,
    ModelRewriteDecision,
    PrefillResult,
    PreprocessedRequest,
    ProtocolError,
    RoutingHints,
    Usage,
    WorkerJoined,
    WorkerLeft,
    decode_body,
    encode_frame,
)
from interlock.wire._frames import (
    TAGS,
    Auth,
    Broken,
    Cancel,
    Challenge,
    Goodbye,
    Hello,
    Output,
    Outputs,
    Ping,
    Pong,
    Refused,
    SnapshotReply,
    SnapshotRequest,
    Start,
    Welcome,
    WorkerCapacity,
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
IDS = st.integers(0, 2**63 - 1)
ROLE = st.sampled_from(("agg", "prefill", "decode"))
REQUEST = PreprocessedRequest(request_id="r1", token_ids=(1, 2, 3), max_tokens=4)

outputs = st.builds(
    EngineOutput,
    token_ids=st.lists(U32, max_size=8).map(tuple),
    text=st.none() | st.text(max_size=20),
    finish_reason=st.none() | st.sampled_from(("stop", "length", "cancelled", "error")),
    usage=st.none()
    | st.builds(
        Usage,
        prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**6),
        cached_tokens=st.integers(0, 10**6),
    ),
    prefill_result=st.none()
    | st.builds(
        PrefillResult,
        prefill_worker_id=U64,
        prompt_tokens=st.integers(0, 10**6),
        cached_tokens=st.integers(0, 10**6),
        kv_transfer_params=st.none() | st.dictionaries(st.text(max_size=8), IDS, max_size=3),
    ),
)
stored = st.builds(
    KvStored,
    worker_id=U64,
    event_id=IDS,
    parent_hash=st.none() | U64,
    blocks=st.lists(st.builds(StoredBlock, block_hash=U64, tokens_hash=U64), max_size=4),
)
snapshots = st.builds(
    WorkerSnapshot,
    worker_id=U64,
    role=ROLE,
    active=st.lists(
        st.builds(
            ActiveSequence,
            request_id=st.text(max_size=10),
            prompt_tokens=st.integers(0, 10**6),
            cached_tokens=st.integers(0, 10**6),
            generated_tokens=st.integers(0, 10**6),
            prefill_done=st.booleans(),
        ),
        max_size=3,
    ).map(tuple),
    kv_blocks=st.lists(stored, max_size=3).map(tuple),
    kv_last_event_id=st.integers(-1, 2**40),
    block_size=st.none() | st.integers(1, 1024),
)
MESSAGES: dict[type[Any], st.SearchStrategy[Any]] = {
    Hello: st.builds(
        Hello, versions=st.lists(st.integers(0, 2**16), max_size=3).map(tuple), client=st.text()
    ),
    Welcome: st.builds(
        Welcome,
        version=st.integers(0, 2**16),
        worker_id=U64,
        role=ROLE,
        block_size=st.none() | st.integers(1, 1024),
        capacity=st.builds(
            WorkerCapacity,
            kv_blocks=st.none() | st.integers(1, 2**31),
            max_num_seqs=st.none() | st.integers(1, 2**16),
        ),
        registered=st.booleans(),
        vocab_size=st.none() | st.integers(1, 2**20),
        tokenizer=st.none() | st.text(),
        proof=st.none() | st.binary(min_size=32, max_size=32),
    ),
    Start: st.builds(Start, stream=IDS, request=requests(sampling=True)),
    Cancel: st.builds(Cancel, stream=IDS),
    Output: st.builds(Output, stream=IDS, output=outputs),
    Outputs: st.builds(Outputs, outputs=st.lists(st.tuples(IDS, outputs), max_size=5).map(tuple)),
    Refused: st.builds(Refused, stream=IDS, message=st.text()),
    Broken: st.builds(Broken, stream=IDS, message=st.text()),
    SnapshotRequest: st.builds(SnapshotRequest, token=IDS),
    SnapshotReply: st.builds(SnapshotReply, token=IDS, snapshot=snapshots),
    Goodbye: st.builds(Goodbye, reason=st.text()),
    Challenge: st.builds(Challenge, version=st.integers(0, 2**16), nonce=st.binary(max_size=64)),
    Auth: st.builds(Auth, nonce=st.binary(max_size=64), proof=st.binary(max_size=64)),
    Ping: st.builds(Ping, token=IDS),
    Pong: st.builds(Pong, token=IDS),
    KvStored: stored,
    KvRemoved: st.builds(
        KvRemoved, worker_id=U64, event_id=IDS, block_hashes=st.lists(U64, max_size=5)
    ),
    KvCleared: st.builds(KvCleared, worker_id=U64, event_id=IDS),
    WorkerLeft: st.builds(WorkerLeft, worker_id=U64),
    WorkerJoined: st.builds(WorkerJoined, worker_id=U64),
}
any_message = st.one_of(*MESSAGES.values())


def test_every_tagged_type_has_a_generator() -> None:
    assert set(MESSAGES) == set(TAGS.values())


@given(st.lists(any_message, max_size=12), st.data())
def test_messages_round_trip_however_the_stream_is_cut(messages: list[Any], data: Any) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = FrameParser()
    received: list[Any] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        received += parser.feed(stream[start:cut])
        start = cut
    assert received == messages
    assert parser.buffered == 0
    for original, decoded in zip(messages, received, strict=True):
        assert type(decoded) is type(original)


@given(any_message)
def test_a_frame_is_a_length_prefix_and_a_tagged_msgpack_pair(message: Any) -> None:
    frame = encode_frame(message)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    tag, fields = msgpack.unpackb(frame[4:])
    assert TAGS[tag] is type(message)
    assert isinstance(fields, dict)
    assert decode_body(frame[4:]) == message


def test_a_start_frame_leaves_the_admission_queues_fields_in_the_frontend() -> None:
    # priority and fairness_id order the frontend's own queue; a worker from before them
    # (its RoutingHints had only these fields, and decoding is strict) must decode the frame.
    before = {
        "backend_instance_id",
        "prefill_worker_id",
        "decode_worker_id",
        "dp_rank",
        "enable_local_updates",
        "expected_output_tokens",
    }
    request = attrs.evolve(
        REQUEST, routing=RoutingHints(dp_rank=1, priority=5, fairness_id="tenant-a")
    )
    frame = encode_frame(Start(stream=1, request=request))
    _, fields = msgpack.unpackb(frame[4:])
    assert set(fields["request"]["routing"]) <= before
    assert fields["request"]["routing"]["dp_rank"] == 1
    assert decode_body(frame[4:]) == Start(
        stream=1, request=attrs.evolve(request, routing=RoutingHints(dp_rank=1))
    )


def test_a_start_frame_leaves_the_model_rewrite_in_the_frontend() -> None:
    # The rule that chose the model is the frontend's record (the worker gets the target in
    # ``model``), and a worker from before it decodes strictly.
    rewrite = ModelRewriteDecision(rule="r", model="a", target="b", weight=1, total_weight=2)
    request = attrs.evolve(REQUEST, model="b", model_rewrite=rewrite)
    frame = encode_frame(Start(stream=1, request=request))
    _, fields = msgpack.unpackb(frame[4:])
    assert "model_rewrite" not in fields["request"]
    assert fields["request"]["model"] == "b"
    assert decode_body(frame[4:]) == Start(
        stream=1, request=attrs.evolve(request, model_rewrite=None)
    )


@given(any_message, st.integers(1, 3))
def test_an_incomplete_frame_waits_for_the_rest(message: Any, missing: int) -> None:
    frame = encode_frame(message)
    parser = FrameParser()
    assert parser.feed(frame[:-missing]) == []
    assert parser.buffered == len(frame) - missing
    assert parser.feed(frame[-missing:]) == [message]


def test_an_oversized_length_prefix_is_refused_before_its_body_arrives() -> None:
    parser = FrameParser(max_frame_size=1000)
    with pytest.raises(ProtocolError, match="1001 bytes, over the 1000-byte frame limit"):
        parser.feed((1001).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="over the 67108864-byte frame limit"):
        FrameParser().feed((MAX_FRAME_SIZE + 1).to_bytes(4, "big") + b"x")


def test_encoding_refuses_a_frame_over_the_limit_and_a_foreign_type() -> None:
    big = Goodbye(reason="x" * 2000)
    with pytest.raises(ProtocolError, match="exceeds the 1000-byte frame limit"):
        encode_frame(big, max_frame_size=1000)
    with pytest.raises(TypeError, match="dict is not a worker-protocol message"):
        encode_frame({"stream": 1})


def _body(value: Any) -> bytes:
    return msgpack.packb(value)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x92\xa5", "not valid msgpack"),
        (_body({"tag": "cancel"}), "must be a \\[tag, fields\\] pair"),
        (_body(["cancel"]), "must be a \\[tag, fields\\] pair"),
        (_body([1, {}]), "must be a \\[tag, fields\\] pair"),
        (_body(["teleport", {}]), "unknown frame tag 'teleport'"),
        (_body(["cancel", [1]]), "fields of a 'cancel' frame must be a map"),
        (_body(["cancel", {}]), "missing field 'stream'"),
        (_body(["cancel", {"stream": 1, "urgent": True}]), "unknown field 'urgent'"),
        (_body(["cancel", {"stream": "1"}]), "stream: must be int"),
        (_body(["start", {"stream": 1, "request": {"token_ids": []}}]), "token_ids must not"),
        (_body(["start", {"stream": 1, "request": {"token_ids": [-1]}}]), "unsigned 32-bit"),
        (
            _body(["output", {"stream": 1, "output": {"finish_reason": "done"}}]),
            "malformed 'output' frame: finish_reason",
        ),
        (_body(["outputs", {"outputs": [[1, [2], None]]}]), "output 0 must be \\[stream, "),
        (_body(["outputs", {"outputs": [[1, [2.0], None, None]]}]), "output 0 must be"),
        (_body(["outputs", {"outputs": [[1, {"text": 3}]]}]), "output 0: text: must be str"),
        (_body(["outputs", {"outputs": [], "more": 1}]), "unknown field 'more'"),
        (_body(["outputs", {"outputs": {}}]), "'outputs' must be a list"),
        (
            _body(["snapshot_reply", {"token": 1, "snapshot": {"worker_id": 1, "role": "x"}}]),
            "malformed 'snapshot_reply' frame",
        ),
        (
            _body(
                [
                    "snapshot_reply",
                    {"token": 1, "snapshot": {"worker_id": 1, "role": "agg", "kv_blocks": [{}]}},
                ]
            ),
            "missing field 'worker_id'",
        ),
    ],
)
def test_malformed_bodies_raise_protocol_errors_that_say_what_is_wrong(
    body: bytes, error: str
) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_body(body)
    with pytest.raises(ProtocolError, match=error):
        FrameParser().feed(len(body).to_bytes(4, "big") + body)


@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_message_or_a_protocol_error(body: bytes) -> None:
    try:
        message = decode_body(body)
    except ProtocolError:
        return
    assert type(message) in TAGS.values()


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.sampled_from(sorted(TAGS)), st.dictionaries(st.text(max_size=12), _plain, max_size=5))
def test_random_fields_under_a_known_tag_decode_or_raise_a_protocol_error(
    tag: str, fields: dict[str, Any]
) -> None:
    try:
        message = decode_body(_body([tag, fields]))
    except ProtocolError:
        return
    assert type(message) is TAGS[tag]


@given(st.lists(any_message, min_size=1, max_size=4), st.binary(min_size=1, max_size=40))
def test_garbage_after_good_frames_raises_only_protocol_errors(
    messages: list[Any], garbage: bytes
) -> None:
    parser = FrameParser()
    assert parser.feed(b"".join(encode_frame(m) for m in messages)) == messages
    try:
        parser.feed(len(garbage).to_bytes(4, "big") + garbage)
    except ProtocolError:
        pass


def test_the_protocol_page_lists_every_message_with_its_fields() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "wire-protocol.md").read_text(
        encoding="utf-8"
    )
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (.+?) \| [^|]+ \|$", page, re.MULTILINE)
    documented = {tag: re.findall(r"`(\w+): ", fields) for tag, fields in rows}
    assert documented == {
        tag: [field.name for field in attrs.fields(kind)] for tag, kind in TAGS.items()
    }
