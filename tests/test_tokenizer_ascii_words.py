"""ASCII text is encoded word by word in Python for Qwen2-family tokenizers, with exactly the
ids the tokenizer's own ``encode`` gives (`interlock.processing._ascii_words.AsciiWords`).

Proved on adversarial ASCII (every kind of ASCII whitespace, control characters, contractions
in both cases, digits, punctuation runs, words past the remembered length) against the real
Qwen3 tokenizer, with the words' ids remembered and forgotten (least recently used out, within
the piece cache's byte budget); tokenizers whose normalizer,
pre-tokenizer or model it does not know get none, and still encode exactly.
"""

from __future__ import annotations

import copy
import json
import random
import string
import tracemalloc
from functools import cache

import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from test_tokenizer_piece_cache import _raw

from interlock.processing import HFTokenizer
from interlock.processing._ascii_words import MAX_WORD_CHARS, AsciiWords
from interlock.processing._ids_cache import IdsCache, entry_bytes

_FRAGMENTS = [
    *[" ", "  ", "\n", "\n\n", "\r\n", "\t", "\x0b", "\x0c", "\r", " \n ", "\x00", "\x1f", "\x7f"],
    *["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'D", "'", "''", "don't", "I'LL"],
    *["0", "7", "123", "3.14", "1e-9", "x2", "a1b2"],
    *["Hello", "world", "question", "snake_case", "camelCase", "ABC", "q"],
    *["!", "...", "?!", "---", "==>", "<|", "|>", "(", ")", "`", '"', "_", "$", "~"],
    "a" * 70,  # longer than MAX_WORD_CHARS: encoded each time, never remembered
]


@st.composite
def ascii_text(draw: st.DrawFn) -> str:
    fragment = st.one_of(
        st.sampled_from(_FRAGMENTS),
        st.text(alphabet=st.characters(max_codepoint=127), max_size=8),
    )
    return "".join(draw(st.lists(fragment, max_size=16)))


def qwen3() -> tokenizers.Tokenizer:
    return _raw("qwen3")


# Built once per test run: building costs ~0.6 s (the gate reads the whole vocabulary), an
# example a few ms.
@cache
def _qwen3_words() -> AsciiWords:
    words = AsciiWords.build(qwen3(), IdsCache(0))
    assert words is not None
    return words


def build(max_bytes: int = 2**20) -> AsciiWords:
    """Qwen3's word encoder, remembering nothing yet, in a cache of ``max_bytes``."""
    words = copy.copy(_qwen3_words())
    words._words = IdsCache(max_bytes)
    return words


@cache
def small_words() -> AsciiWords:
    """Qwen3's word encoder with a small cache, so words are also forgotten."""
    return build(3_000)


@cache
def chat_tokenizer() -> HFTokenizer:
    return HFTokenizer(qwen3(), piece_cache_bytes=2**20)


def test_qwen3_gets_the_word_encoder_and_the_other_families_do_not() -> None:
    assert _qwen3_words() is not None
    for kind in ("bytelevel_prefix_space", "metaspace_always", "wordpiece_bert_normalizer"):
        assert AsciiWords.build(_raw(kind), IdsCache(1_000)) is None, kind


@cache
def _qwen3_json() -> str:
    return qwen3().to_str()


def test_a_pre_tokenizer_regex_it_does_not_know_gets_no_word_encoder() -> None:
    state = json.loads(_qwen3_json())
    split = state["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}|", r"\p{N}{1,3}|")
    changed = tokenizers.Tokenizer.from_str(json.dumps(state))
    assert AsciiWords.build(changed, IdsCache(1_000)) is None


def test_a_byte_level_with_a_prefix_space_gets_no_word_encoder() -> None:
    # Qwen3's own regex, so only the prefix space can be what refuses it.
    state = json.loads(_qwen3_json())
    state["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    assert AsciiWords.build(tokenizers.Tokenizer.from_str(json.dumps(state)), IdsCache(1)) is None


@given(text=ascii_text())
def test_ascii_text_encodes_to_the_tokenizers_own_ids(text: str) -> None:
    raw, words = qwen3(), small_words()
    whole = raw.encode(text, add_special_tokens=False).ids
    # Twice: the second time the words' ids come from what it remembered.
    assert words.encode(text) == whole, repr(text)
    assert words.encode(text) == whole, repr(text)


@given(text=ascii_text())
def test_a_chat_prompt_with_an_ascii_message_encodes_as_the_whole_text_does(text: str) -> None:
    raw, tokenizer = qwen3(), chat_tokenizer()
    pieces = tokenizer._pieces
    assert pieces is not None and pieces._words is not None
    pieces.clear()  # the message's piece is new, so its words are looked up
    prompt = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
    assert tokenizer.encode(prompt) == raw.encode(prompt).ids, repr(prompt)
    # The message went word by word: its piece's words (not too long to keep) are remembered.
    remembered = {word for word, _ in pieces._ids.entries()}
    message = pieces._words._findall(f"user\n{text}")  # the piece after <|im_start|>
    kept = [word for word in message if len(word) <= MAX_WORD_CHARS]
    assert set(kept) <= remembered, repr(text)


def test_words_up_to_max_word_chars_are_remembered_and_longer_ones_are_not() -> None:
    raw = qwen3()
    words = build()
    longest, too_long = " " + "b" * (MAX_WORD_CHARS - 1), " " + "c" * MAX_WORD_CHARS
    text = f"w{longest}{too_long}"
    assert words.encode(text) == raw.encode(text, add_special_tokens=False).ids
    remembered = {word for word, _ in words._words.entries()}
    assert remembered == {"w", longest}
    assert words.encode(text) == raw.encode(text, add_special_tokens=False).ids


def test_a_full_cache_forgets_the_least_recently_used_words_and_keeps_learning() -> None:
    raw = qwen3()
    words = build(20_000)
    tokenized: list[str] = []  # what the BPE model was asked for (byte-level characters)
    tokenize = words._tokenize

    def counting(word: str) -> list[tokenizers.Token]:
        tokenized.append(word)
        return tokenize(word)

    words._tokenize = counting
    rng = random.Random(15)
    fresh = [" " + "".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(400)]
    for start in range(0, len(fresh), 20):
        text = "".join([" hello", *fresh[start : start + 20]])
        assert words.encode(text) == raw.encode(text, add_special_tokens=False).ids
    entries = words._words.entries()
    assert words._words.bytes_counted() == sum(entry_bytes(*e) for e in entries) <= 20_000
    remembered = [word for word, _ in entries]
    # " hello", used in every text, stayed (encoded once); the first words went; the last
    # ones were learnt.
    assert tokenized.count("\u0120hello") == 1
    assert " hello" in remembered and fresh[0] not in remembered
    assert set(fresh[-20:]) <= set(remembered)


def test_the_bytes_counted_are_no_fewer_than_the_bytes_held() -> None:
    # The worst words: MAX_WORD_CHARS random letters, ~42 ids each.
    budget = 2**20
    words = build(budget)
    rng = random.Random(0)
    long_words = [
        " " + "".join(rng.choices(string.ascii_letters, k=MAX_WORD_CHARS - 1)) for _ in range(2_000)
    ]
    texts = ["".join(long_words[i : i + 100]) for i in range(0, len(long_words), 100)]
    tracemalloc.start()
    try:
        for text in texts:
            words.encode(text)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < held <= words._words.bytes_counted() <= budget
