"""`tokenizer_fingerprint`: a short string that tells tokenizers apart (for the worker
handshake's tokenization parity check)."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

from ._byte_tokenizer import ByteTokenizer
from ._tokenizer import HFTokenizer, Tokenizer

__all__ = ["tokenizer_fingerprint"]

#: The ``kind`` part of a fingerprint, by tokenizer class (others: the class name, lowercased).
_KINDS: dict[type, str] = {ByteTokenizer: "builtin", HFTokenizer: "hf"}

_byte_fingerprint: str | None = None


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """``"<kind>:<vocab_size>:<digest>"``: ``kind`` is ``builtin`` (`ByteTokenizer`), ``hf``
    (`HFTokenizer`) or the class name lowercased; ``digest`` is the xxh3_64 (16 hex digits)
    of the vocabulary, every ``(id, token)`` pair in id order (added and special tokens
    included).

    Equal tokenizers give equal strings, in any process; tokenizers whose vocabularies differ
    in any id or entry give different ones. Computed once per `ByteTokenizer` class and per
    `HFTokenizer` object (a 150k-entry vocabulary takes a few tens of milliseconds); other
    tokenizers are hashed through ``id_to_token`` on every call.
    """
    global _byte_fingerprint
    if type(tokenizer) is ByteTokenizer:
        if _byte_fingerprint is None:
            _byte_fingerprint = _fingerprint(tokenizer, _by_id(tokenizer))
        return _byte_fingerprint
    if isinstance(tokenizer, HFTokenizer):
        cached = tokenizer._fingerprint
        if cached is None:
            vocab = tokenizer._tokenizer.get_vocab(with_added_tokens=True)
            pairs = sorted((token_id, token) for token, token_id in vocab.items())
            cached = tokenizer._fingerprint = _fingerprint(tokenizer, pairs)
        return cached
    return _fingerprint(tokenizer, _by_id(tokenizer))


def _by_id(tokenizer: Tokenizer) -> list[tuple[int, str]]:
    pairs = ((i, tokenizer.id_to_token(i)) for i in range(tokenizer.vocab_size))
    return [(i, token) for i, token in pairs if token is not None]


def _fingerprint(tokenizer: Tokenizer, pairs: Iterable[tuple[int, str]]) -> str:
    # Length-prefixed entries, so that no two vocabularies serialise alike.
    text = "".join(f"{token_id}:{len(token)}:{token}" for token_id, token in pairs)
    digest = xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))
    kind = _KINDS.get(type(tokenizer), type(tokenizer).__name__.lower())
    return f"{kind}:{tokenizer.vocab_size}:{digest}"
