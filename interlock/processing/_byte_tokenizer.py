"""The built-in byte-level tokenizer: needs no files, round-trips any text; and
`tokenizer_from_spec`, which decides what a ``--tokenizer`` flag names."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, Final, final

from ._chat_template import ChatTemplate
from ._errors import TokenizerError
from ._tokenizer import HFTokenizer, check_ids, load_tokenizer

__all__ = ["BUILTIN_TOKENIZER", "ByteTokenizer", "tokenizer_from_spec"]

_BYTE_TOKEN: Final = re.compile(r"<0x([0-9A-F]{2})>")


def _utf8(piece: str) -> bytes:
    """``piece``'s UTF-8 bytes.

    Raises:
        TokenizerError: ``piece`` holds a lone surrogate, which has no UTF-8 encoding.
    """
    try:
        return piece.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(
            f"cannot encode text: {exc.reason} at character {exc.start} of a piece; "
            "lone surrogates are not valid Unicode text"
        ) from exc


@final
class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; ChatML special tokens follow at 256..258.

    The default tokenizer when none is configured, and a predictable one for tests: every token
    is one byte, so multi-byte characters always span several tokens. ``decode(encode(s),
    skip_special_tokens=False) == s`` for every string; with the default
    ``skip_special_tokens=True`` the special tokens' text is dropped, so only text without them
    round-trips. Its chat template is the built-in ChatML one.
    """

    SPECIAL_TOKENS: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"<|im_start|>": 256, "<|im_end|>": 257, "<|endoftext|>": 258}
    )
    _SPECIAL_BY_ID: ClassVar[Mapping[int, bytes]] = MappingProxyType(
        {i: text.encode() for text, i in SPECIAL_TOKENS.items()}
    )
    _SPECIAL_PATTERN: ClassVar[re.Pattern[str]] = re.compile(
        "(" + "|".join(re.escape(text) for text in SPECIAL_TOKENS) + ")"
    )
    #: Each special token's id as `encode_u32`'s word.
    _SPECIAL_WORDS: ClassVar[Mapping[str, bytes]] = MappingProxyType(
        {text: struct.pack("<I", i) for text, i in SPECIAL_TOKENS.items()}
    )
    _TEMPLATE: ClassVar[ChatTemplate] = ChatTemplate.chatml(eos_token="<|im_end|>")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``<|im_end|>`` (end of a chat turn) and ``<|endoftext|>`` (end of a document)."""
        return (self.SPECIAL_TOKENS["<|im_end|>"], self.SPECIAL_TOKENS["<|endoftext|>"])

    @property
    def chat_template(self) -> ChatTemplate:
        return self._TEMPLATE

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Return the UTF-8 bytes of ``text``, with special-token text replaced by its id.

        ``add_special_tokens`` has no effect: this tokenizer adds no BOS/EOS.

        Raises:
            TokenizerError: ``text`` holds a lone surrogate, which has no UTF-8 encoding.
        """
        ids: list[int] = []
        for piece, special in self._pieces(text):
            if special:
                ids.append(self.SPECIAL_TOKENS[piece])
            else:
                ids.extend(_utf8(piece))
        return ids

    def encode_u32(self, text: str) -> bytes:
        """The ids `encode` returns, as little-endian unsigned 32-bit words (4 bytes an id:
        the KV-hashing contract's layout), made without an int object per id.

        Raises:
            TokenizerError: as `encode`.
        """
        words: list[bytes] = []
        for piece, special in self._pieces(text):
            if special:
                words.append(self._SPECIAL_WORDS[piece])
            elif piece.isascii():
                # An ASCII character is its one UTF-8 byte: UTF-32 widens each to its word.
                words.append(piece.encode("utf-32-le"))
            else:
                # Latin-1 reads each byte as the character of that number, which UTF-32
                # widens to its word: the UTF-8 bytes as words, in C.
                words.append(_utf8(piece).decode("latin-1").encode("utf-32-le"))
        return words[0] if len(words) == 1 else b"".join(words)

    def _pieces(self, text: str) -> Iterator[tuple[str, bool]]:
        """``text``'s plain pieces and special-token texts, in order, each with whether it is
        a special token's."""
        # re.split with one capture group alternates plain text and special-token text.
        for index, piece in enumerate(self._SPECIAL_PATTERN.split(text)):
            yield piece, bool(index % 2)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids``; invalid or incomplete UTF-8 decodes to U+FFFD.

        Raises:
            TokenizerError: an id is outside ``range(vocab_size)``.
        """
        try:
            return bytes(ids).decode("utf-8", errors="replace")
        except ValueError:
            pass  # some id is >= 256: a special token, or out of range
        check_ids(ids, self.vocab_size)
        data = bytearray()
        for token_id in ids:
            if token_id < 256:
                data.append(token_id)
            elif not skip_special_tokens:
                data += self._SPECIAL_BY_ID[token_id]
        return data.decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        """``"<0xHH>"`` for a byte (the SentencePiece byte-fallback spelling), else the special."""
        if 0 <= token_id < 256:
            return f"<0x{token_id:02X}>"
        special = self._SPECIAL_BY_ID.get(token_id)
        return None if special is None else special.decode()

    def token_to_id(self, token: str) -> int | None:
        match = _BYTE_TOKEN.fullmatch(token)
        if match is not None:
            return int(match.group(1), 16)
        return self.SPECIAL_TOKENS.get(token)


#: What ``--tokenizer`` names the built-in byte tokenizer by (``interlock serve``, ``route``
#: and ``worker`` alike).
BUILTIN_TOKENIZER: Final = "builtin"


def tokenizer_from_spec(spec: str | os.PathLike[str]) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a ``--tokenizer`` flag names: `BUILTIN_TOKENIZER` is the built-in byte
    tokenizer (the frontend's default); anything else is loaded by `load_tokenizer`
    (``./builtin`` for a directory of that name). Reads files; no trio.

    Raises:
        TokenizerError: the files are missing or invalid (the message names the path).
    """
    if isinstance(spec, str) and spec == BUILTIN_TOKENIZER:
        return ByteTokenizer()
    return load_tokenizer(spec)
