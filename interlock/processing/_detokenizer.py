"""Incremental detokenization: turn a stream of token ids into a stream of text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

from ._tokenizer import HFTokenizer, Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT: Final = "\ufffd"
# Prompt tokens kept as left context, so the first generated token decodes with the spacing it
# has after the prompt (vLLM uses the same number).
_PROMPT_CONTEXT_TOKENS: Final = 5
# A UTF-8 character is at most 4 bytes and every token carries at least one, so text that still
# ends in U+FFFD this many tokens after the last clean boundary is a run of invalid bytes, not
# one unfinished character; see _release_invalid_run.
_MAX_HELD_TOKENS: Final = 16
_SETTLED_TAIL_TOKENS: Final = 8


@final
class IncrementalDetokenizer:
    """Turns generated token ids into text, piece by piece, as they arrive.

    Uses the prefix-offset/read-offset technique (as in TGI and vLLM): each step decodes a small
    window that starts a few tokens back (the prefix) and returns only the text beyond what the
    prefix decodes to. The left context gives tokens whose spacing or merging depends on the
    preceding tokens (SentencePiece's "▁", byte-level BPE) the same text as in a full decode,
    and the window stays small, so each token costs O(1) amortised, not a re-decode of the whole
    output.

    A character whose UTF-8 bytes span several tokens is held back until its last byte arrives,
    so ``push`` never returns U+FFFD for an unfinished character. For byte-level tokenizers
    (GPT-2/Qwen/Llama 3 style, and ``ByteTokenizer``) the concatenation of everything returned by
    ``push`` and ``flush`` equals ``tokenizer.decode(all_ids)``; for other decoders it is the
    standard approximation.
    """

    __slots__ = (
        "_ids",
        "_prefix_len",
        "_raw_decode",
        "_read",
        "_skip_special_tokens",
        "_tokenizer",
        "ids_checked",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        #: Set by the owner when every id pushed is known to be in the vocabulary (the
        #: engine's worker proved it at its handshake): decoding then skips the range check.
        self.ids_checked = False
        # The Rust decode itself, without the range check `HFTokenizer.decode` adds.
        self._raw_decode = (
            tokenizer._tokenizer.decode if isinstance(tokenizer, HFTokenizer) else None
        )
        # _ids holds only the window: the prefix tokens, then the tokens not yet turned into
        # text from _read on. _prefix_len is the length of the prefix's decoded text.
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._ids)
        self._prefix_len = len(self._decode(self._ids)) if self._ids else 0

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly ``""``).

        Raises:
            TokenizerError: an id is outside the tokenizer's vocabulary.
        """
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        try:
            text = self._decode(self._ids)
        except BaseException:
            # Leave the window as it was, so one bad id does not poison every later push.
            del self._ids[len(self._ids) - len(token_ids) :]
            raise
        if text.endswith(_REPLACEMENT):
            # Possibly an unfinished character; wait for the bytes that complete it.
            if len(self._ids) - self._read > _MAX_HELD_TOKENS:
                return self._release_invalid_run(text)
            return ""
        return self._advance(text, len(self._ids))

    def flush(self) -> str:
        """Return the text still held back; call once at the end of the stream.

        An unfinished character at the very end comes out as U+FFFD, as in a full decode.
        """
        if len(self._ids) == self._read:
            return ""
        return self._advance(self._decode(self._ids), len(self._ids))

    def _decode(self, ids: Sequence[int]) -> str:
        raw = self._raw_decode
        if raw is not None and self.ids_checked:
            try:
                text: str = raw(ids, skip_special_tokens=self._skip_special_tokens)
                return text
            except OverflowError:
                pass  # an id that is no u32 after all: the checked decode says which
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, text: str, read: int) -> str:
        """Emit ``text`` (the decode of ``_ids[:read]``) past the prefix; slide the window.

        ``read`` must be a clean boundary: no character is split there.
        """
        new_text = text[self._prefix_len :]
        # The tokens just emitted become the next prefix.
        del self._ids[: self._read]
        self._read = read - self._read
        self._prefix_len = len(self._decode(self._ids[: self._read]))
        return new_text

    def _release_invalid_run(self, text: str) -> str:
        """Emit the settled part of a long run of text that keeps ending in U+FFFD.

        Without this, a model emitting invalid bytes would grow the window without bound and
        make each step O(n). Lossy UTF-8 decoding only ever changes the trailing incomplete
        sequence (at most 3 bytes), so once several more tokens have been appended and the text
        up to a boundary is still a prefix of the full text, nothing can change it any more.
        """
        boundary = len(self._ids) - _SETTLED_TAIL_TOKENS
        settled = self._decode(self._ids[:boundary])
        if not text.startswith(settled):
            return ""  # the boundary splits a character; try again after the next push
        return self._advance(settled, boundary)
