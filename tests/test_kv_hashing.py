"""The KV-hashing contract: xxh3_64, seed 1337, little-endian u32 token ids, full blocks only.

Engines and other routers hash the same way; a change here silently turns every cache hit into a
miss, so the published test vectors (reference/dynamo.md section 2.2) are pinned exactly.
"""

from __future__ import annotations

import struct
from array import array

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from interlock.kv import (
    XXH3_SEED,
    KvIndexer,
    KvStored,
    StoredBlock,
    _hashing,
    compute_block_hashes,
    compute_sequence_hashes,
    kv_salt,
)
from interlock.kv._hashing import iter_block_hashes, known_u32, trust_u32, u32_words
from interlock.wire import PreprocessedRequest

BLOCK_1_16 = 16863443419780771464
BLOCK_17_32 = 2287610619914608821
SEQ_1_32 = [16863443419780771464, 12466389667045779788]

token_ids = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=300)
block_sizes = st.integers(min_value=1, max_value=64)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


def reference_block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The contract written the slow, obvious way."""
    return [
        xxhash.xxh3_64_intdigest(
            struct.pack(f"<{block_size}I", *tokens[i : i + block_size]), seed=1337
        )
        for i in range(0, len(tokens) - block_size + 1, block_size)
    ]


def test_seed_vector() -> None:
    assert XXH3_SEED == 1337
    assert xxhash.xxh3_64_intdigest(b"test data", seed=XXH3_SEED) == 13226331709069118873


def test_block_vectors() -> None:
    assert compute_block_hashes(list(range(1, 17)), 16) == [BLOCK_1_16]
    assert compute_block_hashes(list(range(17, 33)), 16) == [BLOCK_17_32]
    assert compute_block_hashes(list(range(1, 33)), 16) == [BLOCK_1_16, BLOCK_17_32]


def test_sequence_vector() -> None:
    assert compute_sequence_hashes([BLOCK_1_16, BLOCK_17_32]) == SEQ_1_32


@pytest.mark.parametrize("tail", range(16))
def test_partial_tail_is_never_hashed(tail: int) -> None:
    assert compute_block_hashes(list(range(1, 17 + tail)), 16) == [BLOCK_1_16]
    assert compute_block_hashes(list(range(1, 1 + tail)), 16) == []


@given(token_ids, block_sizes)
def test_matches_the_contract_written_plainly(tokens: list[int], block_size: int) -> None:
    hashes = compute_block_hashes(tokens, block_size)
    assert len(hashes) == len(tokens) // block_size
    assert hashes == reference_block_hashes(tokens, block_size)


@given(token_ids, block_sizes, st.data())
def test_a_prefix_hashes_to_a_prefix(
    tokens: list[int], block_size: int, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(tokens)))
    whole = compute_block_hashes(tokens, block_size)
    assert compute_block_hashes(tokens[:cut], block_size) == whole[: cut // block_size]


def test_accepts_any_integer_sequence() -> None:
    tokens = list(range(1, 33))
    expected = [BLOCK_1_16, BLOCK_17_32]
    assert compute_block_hashes(tuple(tokens), 16) == expected
    assert compute_block_hashes(array("q", tokens), 16) == expected
    assert compute_block_hashes(range(1, 33), 16) == expected


@pytest.mark.parametrize("bad", [-1, 2**32, 2**64])
def test_out_of_range_token_is_rejected_by_name(bad: int) -> None:
    with pytest.raises(ValueError, match="token_ids") as info:
        compute_block_hashes([1, 2, bad, 4], 2)
    assert repr(bad) in str(info.value)


def test_largest_u32_token_is_accepted() -> None:
    expected = xxhash.xxh3_64_intdigest(b"\xff\xff\xff\xff" * 2, seed=1337)
    assert compute_block_hashes([2**32 - 1, 2**32 - 1], 2) == [expected]


def test_non_integer_token_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="token_ids"):
        compute_block_hashes([1, 2.5, 3], 1)  # type: ignore[list-item]


@pytest.mark.parametrize("block_size", [0, -16, True, 16.0])
def test_block_size_must_be_a_positive_int(block_size: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        compute_block_hashes([1, 2, 3], block_size)  # type: ignore[arg-type]


@given(st.lists(u64, max_size=40))
def test_sequence_hashes_chain_each_block_onto_the_prefix(blocks: list[int]) -> None:
    expected: list[int] = []
    for block in blocks:
        if not expected:
            expected.append(block)
        else:
            packed = struct.pack("<QQ", expected[-1], block)
            expected.append(xxhash.xxh3_64_intdigest(packed, seed=1337))
    assert compute_sequence_hashes(blocks) == expected


@pytest.mark.parametrize("blocks", [[-1], [1, 2**64], [2**64, 1]])
def test_sequence_hashes_reject_non_u64(blocks: list[int]) -> None:
    with pytest.raises(ValueError, match="block_hashes"):
        compute_sequence_hashes(blocks)


# -- hashing as consumed, and the conversion shared with validation -------------------------------


@given(token_ids, block_sizes, st.booleans())
def test_hashes_as_consumed_are_the_contracts(
    tokens: list[int], block_size: int, as_tuple: bool
) -> None:
    ids = tuple(tokens) if as_tuple else tokens
    assert list(iter_block_hashes(ids, block_size)) == reference_block_hashes(tokens, block_size)


def test_hashes_as_consumed_stop_where_the_consumer_stops() -> None:
    tokens = tuple(range(1, 33))
    hashes = iter_block_hashes(tokens, 16)
    assert next(hashes) == BLOCK_1_16
    assert next(hashes) == BLOCK_17_32
    assert next(hashes, None) is None


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_hashes_as_consumed_reject_bad_tokens_before_the_first(bad: int) -> None:
    with pytest.raises(ValueError, match="unsigned 32-bit"):
        iter_block_hashes([1, bad], 1)
    with pytest.raises(TypeError, match="sequence of integers"):
        iter_block_hashes([1, "2"], 1)  # type: ignore[list-item]


def test_a_long_prompt_validated_then_hashed_is_converted_once() -> None:
    # PreprocessedRequest checks the ids and the router hashes them: one conversion serves both.
    tokens = tuple(i % 50_000 for i in range(100_000))
    words = u32_words(tokens)
    assert u32_words(tokens) is words
    assert u32_words(()) is not words  # short ones are not kept: they must not evict it
    assert u32_words(tokens) is words
    assert compute_block_hashes(tokens, 16) == reference_block_hashes(list(tokens), 16)
    # A list may change between calls: never served from the memo.
    listed = list(tokens)
    assert u32_words(listed) is not u32_words(listed)


# -- a tokenizer's ids, trusted: no check, only the blocks hashed converted ------------------------


@given(
    # Long enough to be remembered; drawn as bytes, which hypothesis makes fast.
    st.binary(min_size=4 * 1024, max_size=4 * 1500),
    block_sizes,
    st.integers(min_value=0, max_value=100),
)
def test_trusted_ids_hash_as_the_contract_says_however_far_consumed(
    data: bytes, block_size: int, taken: int
) -> None:
    tokens = list(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4]))
    ids = trust_u32(tuple(tokens))
    assert known_u32(ids)
    hashes = iter_block_hashes(ids, block_size)
    first = [h for _, h in zip(range(taken), hashes, strict=False)]
    expected = reference_block_hashes(tokens, block_size)
    assert first == expected[:taken]
    assert first + list(hashes) == expected


def test_trusted_ids_skip_the_check_and_the_whole_conversion() -> None:
    tokens = trust_u32(tuple(i % 50_000 for i in range(100_000)))
    request = PreprocessedRequest(token_ids=tokens, request_id="r", model="m")
    assert request.token_ids is tokens
    # Neither the check nor a one-block lookup converted the prompt (nor kept it in the memo).
    assert next(iter_block_hashes(tokens, 16)) == reference_block_hashes(list(tokens[:16]), 16)[0]
    assert _hashing._last_words is None or _hashing._last_words[0] is not tokens
    # A block size is still checked before the first hash.
    with pytest.raises(ValueError, match="block_size"):
        iter_block_hashes(tokens, 0)


def test_only_what_was_trusted_is_known() -> None:
    trusted = trust_u32((1, 2, 3))
    assert known_u32(trusted)
    assert trusted == (1, 2, 3) and hash(trusted) == hash((1, 2, 3))  # a tuple all the same
    assert not known_u32(list(range(2000)))
    assert not known_u32(tuple(range(2000)))  # an equal plain tuple was vouched for by nobody


# -- salted blocks (LoRA adapters, cache_salt) ------------------------------------------------

salts = st.sampled_from(
    [(None, None), ("ad1", None), ("ad2", None), (None, "ad1"), (None, "t"), ("ad1", "t")]
)


def test_no_salt_is_the_contract_and_a_salt_changes_block_0_only() -> None:
    tokens = list(range(1, 33))
    assert kv_salt() is None and kv_salt(None, None) is None
    assert compute_block_hashes(tokens, 16, None) == [BLOCK_1_16, BLOCK_17_32]
    salt = kv_salt("ad1")
    assert salt is not None
    salted = compute_block_hashes(tokens, 16, salt)
    assert salted[1] == BLOCK_17_32 and salted[0] not in (BLOCK_1_16, BLOCK_17_32)
    assert salted[0] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", salt, BLOCK_1_16), seed=1337)
    assert list(iter_block_hashes(tokens, 16, salt)) == salted
    assert list(iter_block_hashes(trust_u32(tokens), 16, salt)) == salted
    assert compute_block_hashes(tokens[:15], 16, salt) == []


def test_an_adapter_name_a_cache_salt_and_both_are_distinct_salts() -> None:
    keys = [kv_salt("a"), kv_salt(None, "a"), kv_salt("a", "b"), kv_salt("ab"), kv_salt("a", "")]
    assert len(set(keys)) == len(keys)


@given(
    stored=st.lists(
        st.tuples(salts, st.lists(st.integers(0, 3), min_size=1, max_size=6)), max_size=8
    ),
    query=st.tuples(salts, st.lists(st.integers(0, 3), min_size=1, max_size=6)),
)
def test_requests_under_different_salts_never_share_overlap(
    stored: list[tuple[tuple[str | None, str | None], list[int]]],
    query: tuple[tuple[str | None, str | None], list[int]],
) -> None:
    # Few token values, so the same tokens keep coming back under every salt: only the salt
    # keeps their blocks apart in the index.
    block = 2
    index = KvIndexer()
    for worker, (salt, ids) in enumerate(stored):
        tokens = [t for i in ids for t in (i, i)]
        hashes = compute_block_hashes(tokens, block, kv_salt(*salt))
        blocks = [StoredBlock(block_hash=n, tokens_hash=h) for n, h in enumerate(hashes, 1)]
        index.apply(KvStored(worker, 0, None, blocks))
    salt, ids = query
    tokens = [t for i in ids for t in (i, i)]
    scores = index.find_matches(compute_block_hashes(tokens, block, kv_salt(*salt))).scores
    for worker, (their_salt, their_ids) in enumerate(stored):
        shares = their_salt == salt and their_ids[0] == ids[0]
        assert (worker in scores) == shares, (worker, stored[worker], query, scores)
