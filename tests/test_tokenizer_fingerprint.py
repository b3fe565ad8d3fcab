"""`tokenizer_fingerprint`: equal tokenizers give equal strings, different ones different ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tokenizers
from helpers import QWEN3_DIR

from interlock.processing import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_fingerprint

FORMAT = re.compile(r"(\w+):(\d+):([0-9a-f]{16})")


def tiny_tokenizer(*words: str) -> HFTokenizer:
    """A word-level Hugging Face tokenizer of ``words`` and ``[UNK]``."""
    vocab = {word: i for i, word in enumerate((*words, "[UNK]"))}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return HFTokenizer(inner, source="tiny")


def save_tiny_tokenizer(path: Path, *words: str) -> Path:
    """`tiny_tokenizer` as a tokenizer.json, for ``--tokenizer PATH``."""
    tiny_tokenizer(*words)._tokenizer.save(str(path))
    return path


def test_the_builtin_tokenizer_has_one_stable_fingerprint() -> None:
    fingerprint = tokenizer_fingerprint(ByteTokenizer())
    match = FORMAT.fullmatch(fingerprint)
    assert match is not None and match.group(1, 2) == ("builtin", "259")
    assert tokenizer_fingerprint(ByteTokenizer()) == fingerprint
    # Pinned: another process, or another release, must compute the same string.
    assert fingerprint == "builtin:259:65ce8face9ff4de6"


def test_hf_tokenizers_are_told_apart_by_their_vocabulary() -> None:
    base = tokenizer_fingerprint(tiny_tokenizer("river", "stone"))
    assert FORMAT.fullmatch(base) is not None and base.startswith("hf:3:")
    assert tokenizer_fingerprint(tiny_tokenizer("river", "stone")) == base
    assert tokenizer_fingerprint(tiny_tokenizer("river", "stones")) != base  # same size
    assert tokenizer_fingerprint(tiny_tokenizer("stone", "river")) != base  # same words
    assert tokenizer_fingerprint(tiny_tokenizer("riv", "erstone")) != base


def test_the_qwen3_fingerprint_is_stable_and_cached() -> None:
    if not (QWEN3_DIR / "tokenizer.json.gz").is_file():
        pytest.skip(f"Qwen3 tokenizer files not found at {QWEN3_DIR.resolve()}")
    qwen3 = load_tokenizer(QWEN3_DIR)
    fingerprint = tokenizer_fingerprint(qwen3)
    match = FORMAT.fullmatch(fingerprint)
    assert match is not None and match.group(1, 2) == ("hf", str(qwen3.vocab_size))
    assert qwen3._fingerprint == fingerprint  # computed once per object
    assert tokenizer_fingerprint(load_tokenizer(QWEN3_DIR)) == fingerprint
    assert fingerprint != tokenizer_fingerprint(ByteTokenizer())
