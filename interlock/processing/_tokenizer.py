"""The Tokenizer protocol and its Hugging Face `tokenizers` implementation."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, final, runtime_checkable

import tokenizers

from ._ascii_words import AsciiWords
from ._chat_template import ChatTemplate, _find_template, _special_token_text
from ._errors import TokenizerError
from ._ids_cache import IdsCache

__all__ = ["HFTokenizer", "Tokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer.

    Special tokens written as text (e.g. ``<|im_start|>`` in a rendered chat prompt) are always
    encoded to their ids, as Hugging Face does; ``add_special_tokens`` only controls the tokens a
    tokenizer adds around the text (BOS/EOS). Ids outside ``range(vocab_size)`` are errors.
    """

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added and special tokens included."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation; may be empty when the tokenizer files name none."""
        ...

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The chat template that belongs with this tokenizer, or None when it has none."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Return the token ids of ``text``; raises TokenizerError if it cannot be encoded."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids``; an incomplete UTF-8 sequence decodes to U+FFFD.

        Raises TokenizerError for an id outside ``range(vocab_size)``.
        """
        ...

    def id_to_token(self, token_id: int) -> str | None:
        """Return the vocabulary entry for ``token_id``, or None if there is none."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """Return the id of vocabulary entry ``token``, or None if there is none."""
        ...


def check_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise TokenizerError unless every id is in ``range(vocab_size)``."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise TokenizerError(
            f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}); the model and "
            "the tokenizer do not match, or the id is corrupt"
        )


#: What `HFTokenizer` keeps of prompt pieces' and words' ids by default, in (estimated) bytes.
PIECE_CACHE_BYTES: Final = 16 * 2**20
# Text to check a tokenizer's pieces against its whole-text encoding with, around an added
# token (ADDED): a piece's start and end, whitespace and newlines at the edges, a combining
# accent after the token (NFC), numbers and contractions that the pre-tokenizer splits.
_PROBES: Final = (
    "ADDED",
    "ADDEDADDED",
    "a ADDED b",
    "ADDEDsystem\nYou are a helpful assistant.ADDED\nADDEDuser\nHi!ADDED\nADDEDassistant\n",
    "x  ADDED  \n\n y",
    "ADDED\u0301e\u0301 café ADDED's 123456 ADDED\t",
    " Hello world ADDED\n\n\nHello",
)


class _PieceCache:
    """Encodes a text as its pieces between added tokens (which a Hugging Face tokenizer
    splits off first and normalizes and pre-tokenizes apart, so each piece's ids do not
    depend on the others) and remembers the pieces' ids, least recently used first out, in an
    `IdsCache` shared with the ASCII words' ids (`AsciiWords`): ``max_bytes`` bounds both.

    Thread-safe: a frontend tokenizes large requests in worker threads.
    """

    __slots__ = ("_added", "_encode", "_ids", "_split", "_words")

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, added: dict[str, int], max_bytes: int
    ) -> None:
        self._added = added
        pattern = "|".join(re.escape(token) for token in sorted(added, key=len, reverse=True))
        # A capturing group: the split keeps the tokens, at the odd positions.
        self._split = re.compile(f"({pattern})").split if added else None
        self._encode = tokenizer.encode
        #: The pieces' and the words' ids.
        self._ids = IdsCache(max_bytes)
        #: Encodes an ASCII piece word by word in Python (`AsciiWords`), several times
        #: faster than the tokenizer's own encode; None for a tokenizer it does not know.
        self._words = AsciiWords.build(tokenizer, self._ids)

    @classmethod
    def build(cls, tokenizer: tokenizers.Tokenizer, max_bytes: int) -> _PieceCache | None:
        """A cache for ``tokenizer``, or None when ``max_bytes`` is 0 or its pieces cannot
        be encoded apart: an added token that strips the whitespace around it, matches single
        words only or is matched after normalization; a pre-tokenizer that treats the text's
        first piece differently (Metaspace's ``prepend_scheme="first"``); truncation or
        padding; special tokens added around the text; or any probe text (`_PROBES`) whose
        ids differ from the whole text's."""
        if max_bytes <= 0:
            return None
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            return None
        if tokenizer.encode_special_tokens or tokenizer.num_special_tokens_to_add(False):
            return None
        pre_tokenizer = tokenizer.pre_tokenizer
        if pre_tokenizer is not None and b'"first"' in pre_tokenizer.__getstate__():
            return None
        added = {}
        for token_id, token in tokenizer.get_added_tokens_decoder().items():
            if token.lstrip or token.rstrip or token.single_word or token.normalized:
                return None
            added[token.content] = token_id
        cache = cls(tokenizer, added, max_bytes)
        for token in list(added)[:3] or [""]:
            for probe in _PROBES:
                text = probe.replace("ADDED", token)
                for special in (False, True):
                    whole = tokenizer.encode(text, add_special_tokens=special).ids
                    if cache.encode(text) != whole:
                        return None
        cache.clear()
        return cache

    def clear(self) -> None:
        """Forget every piece and word."""
        self._ids.clear()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (as the tokenizer's ``encode`` without added special tokens).

        Raises:
            Exception: whatever the tokenizer raises for a piece (a lone surrogate).
        """
        if self._split is None:
            return list(self._piece(text))
        ids: list[int] = []
        added = self._added
        for index, piece in enumerate(self._split(text)):
            if index & 1:
                ids.append(added[piece])
            elif piece:
                ids.extend(self._piece(piece))
        return ids

    def _piece(self, piece: str) -> tuple[int, ...]:
        ids = self._ids.get(piece)
        if ids is not None:
            return ids
        words = self._words
        if words is not None and piece.isascii():
            ids = tuple(words.encode(piece))
        else:
            ids = tuple(self._encode(piece, add_special_tokens=False).ids)
        self._ids.put(piece, ids)
        return ids


@final
class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the settings from its model directory.

    Build one with ``load_tokenizer``; the constructor is for tokenizers already in memory.
    """

    __slots__ = (
        "_chat_template",
        "_eos_token_ids",
        "_fingerprint",
        "_pieces",
        "_tokenizer",
        "_vocab_size",
        "source",
    )

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token_ids: Iterable[int] = (),
        chat_template: ChatTemplate | None = None,
        source: str = "<memory>",
        piece_cache_bytes: int = PIECE_CACHE_BYTES,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        check_ids(self._eos_token_ids, self._vocab_size)
        self._chat_template = chat_template
        self.source = source
        #: `tokenizer_fingerprint`'s answer, once computed.
        self._fingerprint: str | None = None
        #: Encodes text piece by piece between added tokens, remembering the pieces' ids;
        #: None when this tokenizer's pieces do not encode apart (`_PieceCache.build`).
        self._pieces = _PieceCache.build(tokenizer, piece_cache_bytes)

    def __repr__(self) -> str:
        return f"HFTokenizer(source={self.source!r}, vocab_size={self._vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._chat_template

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Return the token ids of ``text``.

        Text between added tokens (a chat prompt's messages) is encoded piece by piece and
        the pieces' ids (and an ASCII piece's words' ids) are remembered (up to
        ``piece_cache_bytes`` in all, least recently used out): a system prompt, or the
        earlier turns of a conversation, is tokenized once, not on every request. The ids are
        the same as the whole text's; a tokenizer for which they would not be gets no cache.

        Raises:
            TokenizerError: ``text`` is not a string of valid Unicode (e.g. a lone surrogate).
        """
        try:
            if self._pieces is not None:
                return self._pieces.encode(text)
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as exc:  # the Rust side raises bare Exception/TypeError
            raise TokenizerError(f"{self.source}: cannot encode text: {exc}") from exc

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids``.

        Raises:
            TokenizerError: an id is outside ``range(vocab_size)``.
        """
        check_ids(ids, self._vocab_size)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def load_tokenizer(path: str | os.PathLike[str]) -> HFTokenizer:
    """Load a Hugging Face tokenizer from ``path`` without network access.

    ``path`` is a ``tokenizer.json``, a gzipped ``tokenizer.json.gz`` (decompressed in memory),
    or a model directory holding either. Next to the tokenizer file, ``tokenizer_config.json``
    (optional) supplies the EOS/BOS tokens and the chat template (``chat_template.jinja`` wins
    over the config's ``chat_template`` key), and ``generation_config.json`` (optional) supplies
    extra EOS ids, as Hugging Face generation does.

    Returns:
        The tokenizer. ``eos_token_ids`` is empty and ``chat_template`` is None when the files
        do not name them; the caller decides whether that is acceptable.

    Raises:
        TokenizerError: the tokenizer file is missing (the message names the path and what was
            looked for), unreadable, not valid gzip/JSON, or not a tokenizer; or a config file
            is unreadable or names an EOS token that the vocabulary lacks.
        ChatTemplateError: the chat template does not compile.
    """
    path = Path(path)
    tokenizer_path = _find_tokenizer_file(path)
    directory = tokenizer_path.parent
    tokenizer = _read_tokenizer_file(tokenizer_path)

    config_path = directory / "tokenizer_config.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}
    eos_ids: list[int] = []
    eos_text = _special_token_text(config.get("eos_token"))
    if eos_text is not None:
        eos_id = tokenizer.token_to_id(eos_text)
        if eos_id is None:
            raise TokenizerError(
                f"{config_path}: eos_token {eos_text!r} is not in the vocabulary of "
                f"{tokenizer_path}; the two files belong to different tokenizers"
            )
        eos_ids.append(eos_id)
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        eos_ids.extend(_generation_eos_ids(generation_path))

    return HFTokenizer(
        tokenizer,
        eos_token_ids=eos_ids,
        chat_template=_find_template(directory, config, config_path),
        source=str(tokenizer_path),
    )


def _find_tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.json.gz"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(
            f"{path}: no tokenizer.json or tokenizer.json.gz in this directory; point the "
            "tokenizer setting at a Hugging Face model directory or at a tokenizer.json file"
        )
    if not path.is_file():
        raise TokenizerError(
            f"{path}: no such file or directory; expected a tokenizer.json, a "
            "tokenizer.json.gz, or a model directory holding one"
        )
    return path


def _read_tokenizer_file(path: Path) -> tokenizers.Tokenizer:
    """Read a tokenizer.json, gzipped when the name ends in ``.gz``; raises TokenizerError."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TokenizerError(f"{path}: cannot read the tokenizer file: {exc}") from exc
    try:
        # From the bytes: decoding them to a str first costs a large vocabulary's process
        # ~80 MB of RSS that stays (Qwen3's: 181 MB against 100 MB).
        return tokenizers.Tokenizer.from_buffer(raw)
    except Exception as exc:  # the Rust parser raises bare Exception
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as not_text:
            raise TokenizerError(
                f"{path}: cannot read the tokenizer file: {not_text}"
            ) from not_text
        raise TokenizerError(
            f"{path}: not a Hugging Face tokenizer.json (the tokenizers library says: {exc})"
        ) from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _generation_eos_ids(path: Path) -> list[int]:
    value = _read_json_object(path).get("eos_token_id")
    ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{path}: eos_token_id must be an integer or a list of integers")
    return ids
