"""Tokenizers: loading Hugging Face files (plain or gzipped), the built-in ByteTokenizer, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import tokenizers
from helpers import QWEN3_DIR, qwen3_tokenizer
from hypothesis import given
from hypothesis import strategies as st

from interlock.processing import (
    ByteTokenizer,
    ChatTemplate,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def qwen3_dir() -> Path:
    if not (QWEN3_DIR / "tokenizer.json.gz").is_file():
        pytest.skip(f"Qwen3 tokenizer files not found at {QWEN3_DIR.resolve()}")
    return QWEN3_DIR


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> HFTokenizer:
    return qwen3_tokenizer()


@pytest.fixture
def plain_qwen3_dir(qwen3_dir: Path, tmp_path: Path) -> Path:
    """A model directory with an uncompressed tokenizer.json (written to pytest's tmp dir)."""
    (tmp_path / "tokenizer.json").write_bytes(
        gzip.decompress((qwen3_dir / "tokenizer.json.gz").read_bytes())
    )
    return tmp_path


# --- Loading ---------------------------------------------------------------------------------


def test_qwen3_directory_with_gzipped_tokenizer_loads_eos_and_template(qwen3: HFTokenizer) -> None:
    assert qwen3.vocab_size == 151_669
    assert qwen3.eos_token_ids == (151_645,)
    assert qwen3.token_to_id("<|im_end|>") == 151_645
    assert qwen3.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert isinstance(qwen3.chat_template, ChatTemplate)
    assert "enable_thinking" in qwen3.chat_template.source


def test_gzipped_file_path_loads_with_the_config_beside_it(qwen3_dir: Path) -> None:
    tokenizer = load_tokenizer(qwen3_dir / "tokenizer.json.gz")
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.eos_token_ids == (151_645,)


def test_plain_tokenizer_json_without_config_has_no_eos_and_no_template(
    plain_qwen3_dir: Path,
) -> None:
    for path in (plain_qwen3_dir, plain_qwen3_dir / "tokenizer.json"):
        tokenizer = load_tokenizer(path)
        assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
        assert tokenizer.eos_token_ids == ()
        assert tokenizer.chat_template is None


def test_generation_config_adds_eos_ids_after_the_config_eos(
    qwen3_dir: Path, plain_qwen3_dir: Path
) -> None:
    (plain_qwen3_dir / "tokenizer_config.json").write_bytes(
        (qwen3_dir / "tokenizer_config.json").read_bytes()
    )
    (plain_qwen3_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643]})
    )
    assert load_tokenizer(plain_qwen3_dir).eos_token_ids == (151_645, 151_643)


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="no such file") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value)


def test_directory_without_tokenizer_names_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message
    assert "tokenizer.json.gz" in message


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("tokenizer.json.gz", b"not gzip at all", "cannot read"),
        ("tokenizer.json.gz", gzip.compress(b"\xff\xfe"), "cannot read"),
        ("tokenizer.json", b'{"hello": "world"}', "not a Hugging Face tokenizer.json"),
        ("tokenizer.json", b"{", "not a Hugging Face tokenizer.json"),
    ],
)
def test_corrupt_tokenizer_file_is_a_tokenizer_error(
    tmp_path: Path, name: str, content: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=problem) as info:
        load_tokenizer(tmp_path)
    assert str(path) in str(info.value)


def test_config_eos_token_missing_from_vocabulary_is_an_error(plain_qwen3_dir: Path) -> None:
    (plain_qwen3_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<｜end▁of▁sentence｜>"})
    )
    with pytest.raises(TokenizerError, match="is not in the vocabulary"):
        load_tokenizer(plain_qwen3_dir)


def test_unreadable_config_is_a_tokenizer_error(plain_qwen3_dir: Path) -> None:
    (plain_qwen3_dir / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        load_tokenizer(plain_qwen3_dir)


# --- Encoding and decoding --------------------------------------------------------------------


def test_special_token_text_encodes_to_one_id_and_is_skipped_on_decode(qwen3: HFTokenizer) -> None:
    ids = qwen3.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 151_644
    assert ids[-1] == 151_645
    assert qwen3.decode(ids) == "user\nHi"
    assert qwen3.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


@pytest.mark.parametrize("ids", [[-1], [151_669], [9707, 10**9]])
def test_decoding_an_id_outside_the_vocabulary_is_an_error(
    qwen3: HFTokenizer, ids: list[int]
) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        qwen3.decode(ids)


@pytest.mark.parametrize("ids", [[-1], [259], [65, 1000]])
def test_byte_tokenizer_rejects_ids_outside_its_vocabulary(ids: list[int]) -> None:
    with pytest.raises(TokenizerError, match=r"outside the vocabulary \(0\.\.258\)"):
        ByteTokenizer().decode(ids)


def test_lone_surrogate_cannot_be_encoded(qwen3: HFTokenizer) -> None:
    for tokenizer in (qwen3, ByteTokenizer()):
        with pytest.raises(TokenizerError, match="encode"):
            tokenizer.encode("ok \ud800")


def test_both_implementations_satisfy_the_protocol(qwen3: HFTokenizer) -> None:
    assert isinstance(qwen3, Tokenizer)
    assert isinstance(ByteTokenizer(), Tokenizer)


def test_hf_tokenizer_can_wrap_an_in_memory_tokenizer() -> None:
    model = tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = HFTokenizer(raw, eos_token_ids=[1])
    assert tokenizer.encode("a b c") == [0, 1, 2]
    assert tokenizer.eos_token_ids == (1,)
    assert tokenizer.vocab_size == 3
    with pytest.raises(TokenizerError):
        HFTokenizer(raw, eos_token_ids=[7])


# --- ByteTokenizer ----------------------------------------------------------------------------


def test_byte_tokenizer_layout() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 259
    assert dict(ByteTokenizer.SPECIAL_TOKENS) == {
        "<|im_start|>": 256,
        "<|im_end|>": 257,
        "<|endoftext|>": 258,
    }
    assert tokenizer.eos_token_ids == (257, 258)
    assert tokenizer.encode("é") == [0xC3, 0xA9]
    assert tokenizer.encode("<|im_start|>a<|im_end|>", add_special_tokens=True) == [256, 97, 257]
    assert tokenizer.chat_template.render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_byte_tokenizer_vocabulary_entries_round_trip() -> None:
    tokenizer = ByteTokenizer()
    for token_id in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(token_id)
        assert token is not None
        assert tokenizer.token_to_id(token) == token_id
    assert tokenizer.id_to_token(0x41) == "<0x41>"
    assert tokenizer.id_to_token(259) is None
    assert tokenizer.token_to_id("A") is None


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    if not any(special in text for special in SPECIALS):
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text


@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIALS)), max_size=12))
def test_byte_tokenizer_round_trips_text_with_special_tokens(pieces: list[str]) -> None:
    tokenizer = ByteTokenizer()
    text = "".join(pieces)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    # Skipping special tokens drops exactly the ids >= 256.
    assert tokenizer.decode(ids) == tokenizer.decode([i for i in ids if i < 256])


@given(st.lists(st.integers(0, 258), max_size=40))
def test_byte_tokenizer_decodes_any_ids_like_lossy_utf8(ids: list[int]) -> None:
    expected = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    assert ByteTokenizer().decode(ids) == expected


def test_qwen3_round_trips_nfc_text(qwen3: HFTokenizer) -> None:
    text = "Grüße, 世界! 👨‍👩‍👧 naïve café\n\tcode = f(x) + 1"
    assert qwen3.decode(qwen3.encode(text)) == text


# --- Prompt pieces between added tokens --------------------------------------------------------

# Text a chat prompt's pieces are made of: words, digits, whitespace and newlines at the
# edges, a combining accent (NFC joins it to the letter before), non-ASCII letters, emoji.
_PIECE_TEXT = st.lists(
    st.sampled_from([*"ab Z09'\n\t.,!?-é", "\u0301", "世", "👨\u200d👩", "'s", "  "]), max_size=24
).map("".join)
_QWEN3_ADDED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")


@pytest.fixture(scope="module")
def raw_qwen3(qwen3_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_buffer(
        gzip.decompress((qwen3_dir / "tokenizer.json.gz").read_bytes())
    )


@given(st.lists(st.one_of(_PIECE_TEXT, st.sampled_from(_QWEN3_ADDED)), max_size=10))
def test_text_between_added_tokens_encodes_as_the_whole_text_does(
    qwen3: HFTokenizer, raw_qwen3: tokenizers.Tokenizer, pieces: list[str]
) -> None:
    text = "".join(pieces)
    whole = raw_qwen3.encode(text, add_special_tokens=False).ids
    # Twice: the second time the pieces' ids come from the cache.
    assert qwen3.encode(text) == whole
    assert qwen3.encode(text) == whole
    assert qwen3.encode(text, add_special_tokens=True) == whole


def test_a_small_piece_cache_forgets_old_pieces_and_still_encodes_exactly(
    raw_qwen3: tokenizers.Tokenizer,
) -> None:
    tokenizer = HFTokenizer(raw_qwen3, piece_cache_bytes=4_000)
    system = "You are a helpful assistant. " * 20
    texts = [
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nquestion {i}<|im_end|>\n"
        for i in range(60)
    ]
    for text in [*texts, *reversed(texts)]:
        assert tokenizer.encode(text) == raw_qwen3.encode(text, add_special_tokens=False).ids
    pieces = tokenizer._pieces
    assert pieces is not None and 0 < pieces._ids.bytes_counted() <= 4_000


def _word_tokenizer(
    pre_tokenizer: tokenizers.pre_tokenizers.PreTokenizer, added: tokenizers.AddedToken
) -> tokenizers.Tokenizer:
    vocab = {"▁a": 0, "a": 1, "▁b": 2, "b": 3, "[UNK]": 4}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizer
    raw.add_special_tokens([added])
    return raw


@pytest.mark.parametrize(
    "raw",
    [
        # SentencePiece style: only the text's first piece gets "▁" in front.
        _word_tokenizer(
            tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first"),
            tokenizers.AddedToken("<s>", special=True),
        ),
        # The token takes the whitespace before it.
        _word_tokenizer(
            tokenizers.pre_tokenizers.Whitespace(),
            tokenizers.AddedToken("<s>", special=True, lstrip=True),
        ),
    ],
    ids=["metaspace-first", "lstrip"],
)
def test_a_tokenizer_whose_pieces_do_not_encode_apart_encodes_the_whole_text(
    raw: tokenizers.Tokenizer,
) -> None:
    tokenizer = HFTokenizer(raw)
    assert tokenizer._pieces is None
    for text in ("a<s>b", "<s>a b", "a <s> b<s>"):
        assert tokenizer.encode(text) == raw.encode(text, add_special_tokens=False).ids
