"""Incremental detokenization: streamed text equals a full decode, however the ids arrive."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import tokenizers
from helpers import qwen3_tokenizer
from hypothesis import given
from hypothesis import strategies as st

from interlock.processing import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
)

# Characters that stress detokenization: multi-token emoji (ZWJ sequences, skin tones, flags),
# CJK, combining marks, Hangul, right-to-left text, a literal U+FFFD, and special-token text.
INTERESTING = [
    "😀",
    "🫠",
    "👍🏽",
    "👨‍👩‍👧",
    "🇳🇴",
    "你好",
    "龘",
    "𝔘",
    "é",
    "e\u0301",
    "a\u0308\u0323",
    "한국어",
    "שלום",
    "\ufffd",
    " ",
    "\n",
    "hello",
    " world",
    "<|im_end|>",
]
TEXTS = st.lists(
    st.one_of(st.characters(codec="utf-8"), st.sampled_from(INTERESTING)), max_size=30
).map("".join)
CHUNK_SIZES = st.lists(st.integers(1, 7), min_size=1, max_size=10)


@pytest.fixture(scope="module")
def qwen3() -> HFTokenizer:
    return qwen3_tokenizer()


def chunked(ids: Sequence[int], sizes: Sequence[int]) -> list[Sequence[int]]:
    chunks = []
    start = 0
    index = 0
    while start < len(ids):
        size = sizes[index % len(sizes)]
        chunks.append(ids[start : start + size])
        start += size
        index += 1
    return chunks


def stream(
    tokenizer: Tokenizer,
    chunks: Sequence[Sequence[int]],
    *,
    skip_special_tokens: bool = True,
    prompt_ids: Sequence[int] = (),
) -> list[str]:
    """Every piece of text the detokenizer returns, flush included."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens
    )
    pieces = [detokenizer.push(chunk) for chunk in chunks]
    pieces.append(detokenizer.flush())
    return pieces


def check_stream_matches_full_decode(
    tokenizer: Tokenizer, ids: list[int], sizes: list[int], skip_special_tokens: bool
) -> None:
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    one_at_a_time = stream(tokenizer, [[i] for i in ids], skip_special_tokens=skip_special_tokens)
    assert "".join(one_at_a_time) == expected
    in_chunks = stream(tokenizer, chunked(ids, sizes), skip_special_tokens=skip_special_tokens)
    assert "".join(in_chunks) == expected
    if "\ufffd" not in expected:
        # An unfinished character is held back, never emitted as U+FFFD.
        assert not any("\ufffd" in piece for piece in one_at_a_time + in_chunks)


# --- Properties: streamed text == full decode --------------------------------------------------


@given(TEXTS, CHUNK_SIZES, st.booleans())
def test_byte_tokenizer_stream_equals_full_decode(
    text: str, sizes: list[int], skip_special_tokens: bool
) -> None:
    tokenizer = ByteTokenizer()
    check_stream_matches_full_decode(tokenizer, tokenizer.encode(text), sizes, skip_special_tokens)


@given(text=TEXTS, sizes=CHUNK_SIZES, skip_special_tokens=st.booleans())
def test_qwen3_stream_equals_full_decode(
    qwen3: HFTokenizer, text: str, sizes: list[int], skip_special_tokens: bool
) -> None:
    check_stream_matches_full_decode(qwen3, qwen3.encode(text), sizes, skip_special_tokens)


@given(st.lists(st.integers(0, 258), max_size=80), CHUNK_SIZES)
def test_byte_tokenizer_arbitrary_ids_stream_equals_full_decode(
    ids: list[int], sizes: list[int]
) -> None:
    # A model may emit any ids, including invalid and truncated UTF-8.
    check_stream_matches_full_decode(ByteTokenizer(), ids, sizes, skip_special_tokens=True)


@given(
    ids=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 151_668)), max_size=60),
    sizes=CHUNK_SIZES,
)
def test_qwen3_arbitrary_ids_stream_equals_full_decode(
    qwen3: HFTokenizer, ids: list[int], sizes: list[int]
) -> None:
    # Ids 0..255 are Qwen's single-byte tokens, the ones that make broken UTF-8.
    check_stream_matches_full_decode(qwen3, ids, sizes, skip_special_tokens=True)


@given(
    ids=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 151_668)), max_size=60),
    sizes=CHUNK_SIZES,
)
def test_ids_checked_at_a_handshake_stream_the_same_text_without_the_range_check(
    qwen3: HFTokenizer, ids: list[int], sizes: list[int]
) -> None:
    checked = IncrementalDetokenizer(qwen3)
    checked.ids_checked = True
    pieces = [checked.push(chunk) for chunk in chunked(ids, sizes)] + [checked.flush()]
    assert pieces == stream(qwen3, chunked(ids, sizes))


def test_an_id_no_tokenizer_has_is_still_an_error_when_ids_are_said_to_be_checked(
    qwen3: HFTokenizer,
) -> None:
    # A worker that breaks its handshake's word gets the error a checked decode gives.
    detokenizer = IncrementalDetokenizer(qwen3)
    detokenizer.ids_checked = True
    for bad in (-1, 2**40):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            detokenizer.push([bad])
    assert detokenizer.push(qwen3.encode("fine")) == "fine"


@given(prompt=TEXTS, completion=TEXTS)
def test_qwen3_prompt_context_does_not_change_the_completion_text(
    qwen3: HFTokenizer, prompt: str, completion: str
) -> None:
    prompt_ids = qwen3.encode(prompt + "<|im_start|>assistant\n")
    ids = qwen3.encode(completion)
    pieces = stream(qwen3, [[i] for i in ids], prompt_ids=prompt_ids)
    assert "".join(pieces) == qwen3.decode(ids)


# --- Examples -----------------------------------------------------------------------------------


def test_a_character_split_across_byte_tokens_is_held_until_complete() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detokenizer.push([b]) for b in "a😀".encode()]
    assert pieces == ["a", "", "", "", "😀"]
    assert detokenizer.flush() == ""


def test_a_character_split_across_qwen3_tokens_is_held_until_complete(qwen3: HFTokenizer) -> None:
    ids = qwen3.encode("🫠!")
    assert len(ids) >= 3, "the test needs a character that spans several tokens"
    detokenizer = IncrementalDetokenizer(qwen3)
    pieces = [detokenizer.push([i]) for i in ids]
    assert "".join(pieces) == "🫠!"
    assert all(piece in ("", "🫠", "!", "🫠!") for piece in pieces)


def test_an_unfinished_character_at_the_end_is_flushed_as_replacement_character() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert [detokenizer.push([b]) for b in b"ok\xf0\x9f"] == ["o", "k", "", ""]
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""


def test_special_tokens_are_skipped_or_kept() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("hi<|im_end|>")
    assert "".join(stream(tokenizer, [[i] for i in ids])) == "hi"
    assert "".join(stream(tokenizer, [ids], skip_special_tokens=False)) == "hi<|im_end|>"


def metaspace_tokenizer() -> HFTokenizer:
    """A SentencePiece-style tokenizer: "▁" marks a space, dropped at the start of a decode."""
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "[UNK]": 3}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    raw.decoder = tokenizers.decoders.Metaspace()
    return HFTokenizer(raw)


def test_spacing_that_depends_on_the_preceding_token_is_kept() -> None:
    tokenizer = metaspace_tokenizer()
    assert tokenizer.decode([1]) == "world"  # the leading space only exists after a token
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push([i]) for i in (0, 1, 2)] == ["Hello", " world", "!"]
    after_prompt = IncrementalDetokenizer(tokenizer, prompt_ids=[0])
    assert after_prompt.push([1]) == " world"


def test_empty_push_returns_nothing() -> None:
    assert IncrementalDetokenizer(ByteTokenizer()).push([]) == ""


def test_an_id_outside_the_vocabulary_is_a_tokenizer_error_and_is_not_kept() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.push([0xC3]) == ""
    with pytest.raises(TokenizerError):
        detokenizer.push([65, 999])
    assert detokenizer.push([0xA9]) == "é"


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode call."""

    def __init__(self, inner: ByteTokenizer) -> None:
        self.inner = inner
        self.decode_lengths: list[int] = []
        self.vocab_size = inner.vocab_size
        self.eos_token_ids = inner.eos_token_ids
        self.chat_template = inner.chat_template

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)


@pytest.mark.parametrize(
    "ids",
    [
        list(b"plain ascii text, one byte per token. " * 50),
        list(b"\xe2" * 2000 + "😀 done".encode()),  # a long run of unfinished lead bytes
        [*b"\x80" * 2000, 256, 65],  # a long run of stray continuation bytes
    ],
    ids=["ascii", "lead-byte-run", "continuation-run"],
)
def test_each_step_decodes_a_bounded_window(ids: list[int]) -> None:
    tokenizer = CountingTokenizer(ByteTokenizer())
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=list(b"prompt"))
    pieces = [detokenizer.push([i]) for i in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == ByteTokenizer().decode(ids)
    assert max(tokenizer.decode_lengths) <= 32
    assert len(tokenizer.decode_lengths) <= 3 * len(ids) + 3
