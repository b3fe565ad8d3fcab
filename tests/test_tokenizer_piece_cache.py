"""The tokenizer piece cache encodes every text exactly as the tokenizer encodes the whole text.

`HFTokenizer` splits a text at its added tokens and remembers each piece's ids
(`interlock.processing._tokenizer._PieceCache`). These tests prove, on adversarial text
(partial and overlapping added tokens, added tokens with a leading space or a trailing newline,
combining accents, ideographic spaces, random unicode, empty pieces), with and without
``add_special_tokens``, that the ids are the ones ``tokenizers.Tokenizer.encode`` gives for the
whole text: for the real Qwen3 tokenizer and for small tokenizers trained here, one per
normalizer / pre-tokenizer / model / post-processor family the cache must handle or refuse.
A tokenizer whose pieces do not encode apart must get no cache (and still encode exactly),
and threads sharing one small cache get exact ids while its byte count stays true.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import AddedToken, models, normalizers, pre_tokenizers, processors, trainers

from interlock.processing import HFTokenizer, TokenizerError
from interlock.processing._ids_cache import entry_bytes

QWEN3 = Path(__file__).parents[1] / ".." / "shared" / "data" / "tokenizers" / "qwen3"

_CORPUS = [
    "Hello world, this is a test of the tokenizer. café naïve Grüße 世界 123 456",
    "The quick brown fox jumps over the lazy dog's back; it's 12:30.",
    "  leading spaces\n\nnewlines\ttabs   and  more   ",
] * 50

# Added tokens that overlap ("<a>" in "<a><b>", "b>" at its end), carry a leading space or a
# trailing newline, or are text a normalizer would change ("é" composed or not, the "ﬁ" ligature).
_EXTRA_ADDED = ["<a>", "<a><b>", "b>", "[X]", " <sp>", "<nl>\n", "é", "e\u0301", "ﬁ"]

# Short text that makes piece edges interesting: whitespace of every kind, a lone combining
# accent, contractions, digits, emoji joined by ZWJ, the Metaspace marker, bracket halves.
_EDGES = [
    *[" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u0301", "\u00a0", "\u3000"],
    *["'s", "'", "1", "12", "a", "A", "Hello", " world", "é", "ﬁ", "👨\u200d👩", "世界"],
    *["", "▁", "<", ">", "|", "\x00"],
]


def _bpe(kind: str) -> tokenizers.Tokenizer:
    raw = tokenizers.Tokenizer(
        models.BPE(byte_fallback=True, unk_token=None if kind == "bytelevel" else "<unk>")
    )
    if kind == "llama_prepend":
        raw.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    elif kind == "metaspace_always":
        raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    elif kind == "bytelevel":
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif kind == "nfkc_strip_lowercase":
        raw.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Strip(), normalizers.Lowercase()]
        )
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
    elif kind == "nfd_digits_punctuation":
        raw.normalizer = normalizers.NFD()
        raw.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Punctuation(),
                pre_tokenizers.WhitespaceSplit(),
            ]
        )
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind == "bytelevel" else []
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", *bytes_], initial_alphabet=alphabet
        ),
    )
    return raw


def _wordpiece_bert_normalizer() -> tokenizers.Tokenizer:
    raw = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(
        _CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"])
    )
    return raw


def _unigram(split: bool) -> tokenizers.Tokenizer:
    raw = tokenizers.Tokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=split)
    raw.train_from_iterator(
        _CORPUS,
        trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>"], unk_token="<unk>"),
    )
    return raw


def _bert_processing() -> tokenizers.Tokenizer:
    raw = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(
        _CORPUS,
        trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"]),
    )
    raw.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    return raw


def _with_added_tokens(raw: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    raw.add_special_tokens(
        [
            AddedToken("<s>", special=True, normalized=False),
            AddedToken("</s>", special=True, normalized=False),
        ]
    )
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in _EXTRA_ADDED])
    return raw


def _qwen3() -> tokenizers.Tokenizer:
    if not (QWEN3 / "tokenizer.json.gz").is_file():
        pytest.skip(f"Qwen3 tokenizer files not found at {QWEN3.resolve()}")
    return tokenizers.Tokenizer.from_buffer(
        gzip.decompress((QWEN3 / "tokenizer.json.gz").read_bytes())
    )


# Tokenizers whose pieces encode apart: each gets a cache.
_CACHED: dict[str, Callable[[], tokenizers.Tokenizer]] = {
    "qwen3": _qwen3,
    "llama_prepend_byte_fallback": lambda: _with_added_tokens(_bpe("llama_prepend")),
    "metaspace_always": lambda: _with_added_tokens(_bpe("metaspace_always")),
    "bytelevel_prefix_space": lambda: _with_added_tokens(_bpe("bytelevel")),
    "nfkc_strip_lowercase": lambda: _with_added_tokens(_bpe("nfkc_strip_lowercase")),
    "nfd_digits_punctuation": lambda: _with_added_tokens(_bpe("nfd_digits_punctuation")),
    "wordpiece_bert_normalizer": lambda: _with_added_tokens(_wordpiece_bert_normalizer()),
    "unigram_metaspace_split": lambda: _with_added_tokens(_unigram(split=True)),
    "unigram_metaspace_no_split": lambda: _with_added_tokens(_unigram(split=False)),
}

# Tokenizers `_PieceCache.build` must refuse: BertProcessing adds [CLS] and [SEP] around the
# text (so the pieces' ids are not the whole text's with add_special_tokens), and added tokens
# that strip the whitespace around them, match single words only, or are matched after
# normalization take text from the pieces next to them.
_REFUSED: dict[str, Callable[[], tokenizers.Tokenizer]] = {
    "bert_processing": lambda: _with_added_tokens(_bert_processing()),
    "lstrip_added_token": lambda: _bpe_with(AddedToken("<x>", lstrip=True, normalized=False)),
    "rstrip_added_token": lambda: _bpe_with(AddedToken("<x>", rstrip=True, normalized=False)),
    "single_word_added_token": lambda: _bpe_with(
        AddedToken("<x>", single_word=True, normalized=False)
    ),
    "normalized_added_token": lambda: _bpe_with(AddedToken("<x>", normalized=True)),
}


def _bpe_with(added: AddedToken) -> tokenizers.Tokenizer:
    raw = _bpe("metaspace_always")
    raw.add_tokens([added])
    return raw


@cache
def _raw(kind: str) -> tokenizers.Tokenizer:
    """The tokenizer ``kind``, trained (or loaded) once per test run, on first use."""
    return {**_CACHED, **_REFUSED}[kind]()


@cache
def _hf(kind: str) -> HFTokenizer:
    """An `HFTokenizer` for ``kind`` with a small cache, so pieces are also forgotten."""
    return HFTokenizer(_raw(kind), piece_cache_bytes=2_000)


def _adversarial_text(draw: st.DrawFn, raw: tokenizers.Tokenizer) -> str:
    added = [token.content for token in raw.get_added_tokens_decoder().values()]
    halves = [token[: len(token) // 2] for token in added] + [
        token[len(token) // 2 :] for token in added
    ]
    fragment = st.one_of(
        st.sampled_from(added),
        st.sampled_from(halves),
        st.sampled_from(_EDGES),
        st.text(max_size=6),
    )
    return "".join(draw(st.lists(fragment, max_size=14)))


@pytest.mark.parametrize("kind", list(_CACHED))
def test_a_tokenizer_whose_pieces_encode_apart_gets_a_piece_cache(kind: str) -> None:
    assert _hf(kind)._pieces is not None


@pytest.mark.parametrize("kind", list(_REFUSED))
def test_a_tokenizer_whose_pieces_do_not_encode_apart_gets_no_piece_cache(kind: str) -> None:
    assert _hf(kind)._pieces is None


@pytest.mark.parametrize("kind", [*_CACHED, *_REFUSED])
@given(data=st.data())
def test_adversarial_text_encodes_as_the_whole_text_does(kind: str, data: st.DataObject) -> None:
    raw, tokenizer = _raw(kind), _hf(kind)
    text = data.draw(st.composite(_adversarial_text)(raw), label="text")
    for add_special_tokens in (False, True):
        try:
            whole = raw.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception:  # the Rust side raises bare Exception (a lone surrogate)
            with pytest.raises(TokenizerError):
                tokenizer.encode(text, add_special_tokens=add_special_tokens)
            continue
        # Twice: the second time the pieces' ids come from the cache.
        for _ in range(2):
            got = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert got == whole, f"{kind}: {text!r} add_special_tokens={add_special_tokens}"


def test_threads_sharing_a_small_cache_get_exact_ids_and_the_cache_keeps_its_bound() -> None:
    # A frontend tokenizes large requests in worker threads, all through one cache that keeps
    # forgetting pieces: no thread may see another's ids, and the byte count must stay true.
    raw = _raw("qwen3")
    tokenizer = HFTokenizer(raw, piece_cache_bytes=3_000)
    texts = [
        f"<|im_start|>system\nsys {i % 7}<|im_end|>\n<|im_start|>user\n"
        f"{'x' * (i % 13)} q{i}<|im_end|>"
        for i in range(100)
    ]
    expected = {text: raw.encode(text).ids for text in texts}
    wrong: list[str] = []

    def run(offset: int) -> None:
        for j in range(300):
            text = texts[(j * 7 + offset) % len(texts)]
            if tokenizer.encode(text) != expected[text]:
                wrong.append(text)

    threads = [threading.Thread(target=run, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    pieces = tokenizer._pieces
    assert pieces is not None
    counted = sum(entry_bytes(text, ids) for text, ids in pieces._ids.entries())
    assert pieces._ids.bytes_counted() == counted <= 3_000
