"""A pick's prompt as packed token ids (issue 14): the built-in byte tokenizer writes a query's
ids straight into the little-endian u32 words the KV-hashing contract hashes, with no int
object per id. The packed ids are the tokenizer's ids in every way a reader sees them (length,
indexing, iteration, equality and hash with the tuple, the hashes), and a gateway's pick routes
with them as it did with the tuple (`/v1/route`'s answers: tests/test_route_api.py)."""

from __future__ import annotations

import json
import pickle
import struct
import tracemalloc
from collections.abc import Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_gateway_ext_proc import (
    chat_body,
    exchange,
    picking,
    request_body,
    request_headers,
    response_headers,
)
from test_kv_hashing import reference_block_hashes

from interlock.http import HttpLimits
from interlock.kv import compute_block_hashes
from interlock.kv._hashing import PackedTokenIds, iter_block_hashes, known_u32, u32_words
from interlock.processing import ByteTokenizer
from interlock.statemachines._log import estimate_record_bytes
from interlock.wire import PreprocessedRequest, RoutingDecision, to_builtins

#: Text with the byte tokenizer's special tokens, multi-byte characters and plain ASCII.
texts = st.lists(
    st.one_of(
        st.text(),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "|>", "é😀"]),
    ),
    max_size=12,
).map("".join)
block_sizes = st.integers(min_value=1, max_value=64)


@given(texts)
def test_the_byte_tokenizers_words_are_its_ids(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    data = tokenizer.encode_u32(text)
    assert data == struct.pack(f"<{len(ids)}I", *ids)
    packed = PackedTokenIds(data)
    assert known_u32(packed)
    assert len(packed) == len(ids) and list(packed) == ids
    assert packed == tuple(ids) and tuple(ids) == packed and hash(packed) == hash(tuple(ids))
    assert packed == PackedTokenIds(bytes(data)) and packed != list(ids)
    for index in (0, len(ids) // 2, -1):
        if ids:
            assert packed[index] == ids[index]
    assert packed[1:-1:2] == tuple(ids[1:-1:2])
    # A tuple-like `+`, as the migration of a prompt uses it.
    assert packed + (7,) == (*ids, 7) and (7,) + packed == (7, *ids)  # noqa: RUF005
    assert pickle.loads(pickle.dumps(packed)) == packed
    assert list(u32_words(packed)) == ids


def test_a_lone_surrogate_is_refused_as_encode_refuses_it() -> None:
    tokenizer = ByteTokenizer()
    with pytest.raises(Exception, match="lone surrogates") as packed_error:
        tokenizer.encode_u32("ok \ud800")
    with pytest.raises(Exception, match="lone surrogates") as error:
        tokenizer.encode("ok \ud800")
    assert type(packed_error.value) is type(error.value)
    with pytest.raises(ValueError, match="4 bytes each"):
        PackedTokenIds(b"abc")
    with pytest.raises(IndexError):
        PackedTokenIds(b"")[0]


@given(st.binary(max_size=4 * 300), block_sizes, st.integers(min_value=0, max_value=100))
def test_packed_ids_hash_as_the_contract_says_however_far_consumed(
    data: bytes, block_size: int, taken: int
) -> None:
    data = data[: len(data) // 4 * 4]
    tokens = list(struct.unpack(f"<{len(data) // 4}I", data))
    packed = PackedTokenIds(data)
    expected = reference_block_hashes(tokens, block_size)
    assert compute_block_hashes(packed, block_size) == expected
    hashes = iter_block_hashes(packed, block_size)
    first = [h for _, h in zip(range(taken), hashes, strict=False)]
    assert first == expected[:taken]
    assert first + list(hashes) == expected
    with pytest.raises(ValueError, match="block_size"):
        iter_block_hashes(packed, 0)


def test_a_request_and_its_decision_keep_the_packed_ids_as_they_are() -> None:
    packed = PackedTokenIds(ByteTokenizer().encode_u32("signal lever " * 1000))
    request = PreprocessedRequest(token_ids=packed, request_id="r", model="m")
    assert request.token_ids is packed  # neither converted nor checked: vouched for
    assert request == PreprocessedRequest(token_ids=tuple(packed), request_id="r", model="m")
    decision = RoutingDecision(request_id="r", token_ids=packed, decode_worker_id=1)
    # The JSONL log and /v1/route see a list, as they saw the tuple's.
    assert to_builtins(decision)["token_ids"] == list(packed)


async def test_a_pick_routes_with_packed_ids_and_its_record_weighs_their_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    text = "signal lever route switch " * 400
    async with picking(limits=HttpLimits(max_model_len=200_000)) as p:
        body = chat_body(text)
        await exchange(
            p.picker,
            [
                request_headers(extra=[("x-request-id", "packed")]),
                request_body(body, end_of_stream=True),
                response_headers(200, end_of_stream=True),
            ],
        )
        (record,) = [
            r
            for r in p.pipeline.transition_log.records("packed")
            if r.decision is not None and r.dst == "routed"
        ]
        ids = record.decision.token_ids
        assert type(ids) is PackedTokenIds
        assert ids == tuple(p.preprocessor.encode_chat(json.loads(body)["messages"]))
        # 4 bytes a token, not the 40 a tuple's int costs: the memory bound keeps more picks.
        assert estimate_record_bytes(record) < 5 * len(ids) + 1_000


def test_packed_ids_take_about_half_the_memory_of_the_byte_tokenizers_tuple() -> None:
    # The byte tokenizer's ids 0-258 are CPython's cached small ints: its tuple costs a pointer
    # a token (8 bytes), not an int object each, so packing (4) halves a long pick's record
    # (docs/gateway.md), and its real gain is the tuple not being built and converted back.
    tokenizer = ByteTokenizer()
    text = "<|im_start|>user\n" + "signal lever route switch é " * 3600 + "<|im_end|>"

    def kept(make: Callable[[], object]) -> float:
        tracemalloc.start()
        try:
            ids = make()
            size, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return size / len(ids)  # type: ignore[arg-type]

    as_tuple = kept(lambda: tuple(tokenizer.encode(text)))
    packed = kept(lambda: PackedTokenIds(tokenizer.encode_u32(text)))
    assert 7.9 < as_tuple < 8.2 and 3.9 < packed < 4.2, (as_tuple, packed)
