"""ASCII text is encoded word by word in Python for Qwen2-family tokenizers, with exactly the
ids the tokenizer's own ``encode`` gives (`interlock.processing._ascii_words.AsciiWords`).

Proved on adversarial ASCII (every kind of ASCII whitespace, control characters, contractions
in both cases, digits, punctuation runs, words past the remembered length) against the real
Qwen3 tokenizer, with the words' ids remembered and forgotten; tokenizers whose normalizer,
pre-tokenizer or model it does not know get none, and still encode exactly.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from test_tokenizer_piece_cache import _raw

from interlock.processing import HFTokenizer, _ascii_words
from interlock.processing._ascii_words import AsciiWords

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


def test_qwen3_gets_the_word_encoder_and_the_other_families_do_not() -> None:
    assert AsciiWords.build(qwen3()) is not None
    for kind in ("bytelevel_prefix_space", "metaspace_always", "wordpiece_bert_normalizer"):
        assert AsciiWords.build(_raw(kind)) is None, kind


def test_a_pre_tokenizer_regex_it_does_not_know_gets_no_word_encoder() -> None:
    raw = qwen3()
    state = json.loads(raw.to_str())
    split = state["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}|", r"\p{N}{1,3}|")
    changed = tokenizers.Tokenizer.from_str(json.dumps(state))
    assert AsciiWords.build(changed) is None
    state["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    assert AsciiWords.build(tokenizers.Tokenizer.from_str(json.dumps(state))) is None


@given(text=ascii_text())
def test_ascii_text_encodes_to_the_tokenizers_own_ids(text: str) -> None:
    raw = qwen3()
    words = AsciiWords.build(raw)
    assert words is not None
    whole = raw.encode(text, add_special_tokens=False).ids
    # Twice: the second time the words' ids come from what it remembered.
    assert words.encode(text) == whole, repr(text)
    assert words.encode(text) == whole, repr(text)


@given(text=ascii_text())
def test_a_chat_prompt_with_an_ascii_message_encodes_as_the_whole_text_does(text: str) -> None:
    raw = qwen3()
    tokenizer = HFTokenizer(raw, piece_cache_bytes=4_000)
    assert tokenizer._pieces is not None and tokenizer._pieces._words is not None
    prompt = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
    assert tokenizer.encode(prompt) == raw.encode(prompt).ids, repr(prompt)


def test_it_remembers_at_most_max_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ascii_words, "MAX_WORDS", 5)
    raw = qwen3()
    words = AsciiWords.build(raw)
    assert words is not None
    text = " ".join(f"w{chr(97 + i)}x" for i in range(20)) + " " + "b" * 70
    assert words.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert len(words._words) == 5
    assert all(len(word) <= _ascii_words.MAX_WORD_CHARS for word in words._words)
    assert words.encode(text) == raw.encode(text, add_special_tokens=False).ids
