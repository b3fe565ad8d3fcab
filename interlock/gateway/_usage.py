"""The OpenAI ``usage`` a response body reports, read as the body passes through the picker,
chunk by chunk, with a bounded part of it kept (`UsageReader`).

Where the usage is: a stream's (SSE) is in its last chunks (the ``usage`` chunk, then
``data: [DONE]``), so the body's last `USAGE_TAIL_BYTES` hold it. A JSON body's is anywhere in
its object: vLLM's chat body (and the mock engine's) puts ``prompt_logprobs``,
``prompt_token_ids`` and ``kv_transfer_params`` after it, so with ``return_token_ids`` and a
long prompt it is far from the end. A JSON body's bytes are therefore looked at as they leave
the kept tail: a ``"usage"`` key among them is read then, with the tail's bytes after it at
hand (a usage object is read whole up to `USAGE_OBJECT_BYTES`).
"""

from __future__ import annotations

import json
from typing import Final

from ..engines.openai import usage_from
from ..wire import Usage

__all__ = ["USAGE_OBJECT_BYTES", "USAGE_TAIL_BYTES", "UsageReader", "usage_of"]

#: The response body's last bytes kept (`UsageReader`): a stream's usage is in them, and every
#: ``"usage"`` key of a JSON body is read before it leaves them.
USAGE_TAIL_BYTES: Final = 8192
#: The largest ``usage`` object read (OpenAI's and vLLM's are under 300 bytes); a larger one,
#: or one nested more than `_MAX_DEPTH` objects deep, is not a usage and is passed over.
USAGE_OBJECT_BYTES: Final = 4096
_MAX_DEPTH: Final = 3
_KEY: Final = b'"usage"'
_BLANK: Final = b" \t\r\n"


def usage_of(tail: bytes) -> Usage | None:
    """The OpenAI ``usage`` last reported in ``tail`` (the end of a response body: a JSON
    object, or SSE chunks), or None when it holds none (no ``usage`` object, or one cut off,
    malformed, or not a valid usage as `usage_from` reads one). Never raises."""
    end = len(tail)
    while True:
        at = tail.rfind(_KEY, 0, end)
        if at < 0:
            return None
        end = at
        usage = _usage_at(tail, at, tail[at - 1] if at > 0 else None)
        if usage is not None:
            return usage


def _usage_at(data: bytes | bytearray, at: int, before: int | None) -> Usage | None:
    """The usage whose ``"usage"`` key starts at ``data[at]`` (``before``: the byte before it,
    None at a body's start), or None: not a key (inside a JSON string: escaped quote before
    it; no colon after it), not an object, cut off, too large or deep, or not a valid usage.
    Never raises: the object is found by its braces first (bounded), then decoded."""
    if before == 0x5C:  # \"usage\": inside a JSON string
        return None
    limit = min(len(data), at + len(_KEY) + USAGE_OBJECT_BYTES)
    start = at + len(_KEY)
    while start < limit and data[start] in _BLANK:
        start += 1
    if start >= limit or data[start] != 0x3A:  # ':'
        return None
    start += 1
    while start < limit and data[start] in _BLANK:
        start += 1
    if start >= limit or data[start] != 0x7B:  # '{': "usage": null in a stream's chunks
        return None
    # The object's end by its braces (a usage holds no strings that could hold a brace;
    # one that does fails to decode below and is passed over).
    depth = 0
    index = start
    while True:
        opening = data.find(b"{", index, limit)
        closing = data.find(b"}", index, limit)
        if closing < 0:
            return None  # cut off, or larger than USAGE_OBJECT_BYTES
        if 0 <= opening < closing:
            depth += 1
            if depth > _MAX_DEPTH:
                return None
            index = opening + 1
            continue
        depth -= 1
        index = closing + 1
        if depth == 0:
            break
    try:
        value = json.loads(bytes(data[start:index]))
    except (ValueError, RecursionError):
        return None
    return usage_from(value)


class UsageReader:
    """The usage of one response body, fed its chunks in order (`feed`), read at its end
    (`usage`). Keeps at most `USAGE_TAIL_BYTES` of the body: its last bytes."""

    def __init__(self) -> None:
        #: The body's last bytes (at most `USAGE_TAIL_BYTES`).
        self.tail = bytearray()
        #: Whether the body is one JSON object (its first non-blank byte is ``{``); None: no
        #: such byte seen yet. Else it is SSE chunks, whose usage is in the tail.
        self._json: bool | None = None
        #: A JSON body's last usage among the bytes already out of the tail.
        self._passed: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        """Read the body's next ``chunk``."""
        if not chunk:
            return
        if self._json is None:
            first = chunk.lstrip(_BLANK)[:1]
            if first:
                self._json = first == b"{"
        tail = self.tail
        if self._json and len(tail) + len(chunk) > USAGE_TAIL_BYTES:
            self._read_leaving(chunk)
        if len(chunk) >= USAGE_TAIL_BYTES:
            tail[:] = chunk[-USAGE_TAIL_BYTES:]
        else:
            tail += chunk
            if len(tail) > USAGE_TAIL_BYTES:
                del tail[: len(tail) - USAGE_TAIL_BYTES]

    def usage(self) -> Usage | None:
        """The usage the body reported last (None: none); call once, at the body's end (it
        lets the tail go)."""
        found = usage_of(bytes(self.tail)) if self.tail else None
        self.tail.clear()
        return found if found is not None else self._passed

    def _read_leaving(self, chunk: bytes) -> None:
        """Read each ``"usage"`` key that starts in the bytes leaving the tail as ``chunk``
        comes in: the tail then ``chunk`` hold `USAGE_TAIL_BYTES` after it."""
        tail = self.tail
        kept = len(tail)
        # Positions in tail + chunk before `leaving` leave the tail now.
        leaving = kept + len(chunk) - USAGE_TAIL_BYTES
        in_tail = min(leaving, kept)
        at = tail.find(_KEY, 0, in_tail + len(_KEY) - 1)
        while at >= 0:
            self._note(bytes(tail[at:]) + chunk[:USAGE_TAIL_BYTES], tail[at - 1] if at else None)
            at = tail.find(_KEY, at + 1, in_tail + len(_KEY) - 1)
        # A key across the tail's end and the chunk's start.
        edge = max(kept - len(_KEY) + 1, 0)
        if edge < in_tail:
            across = bytes(tail[edge:]) + chunk[: len(_KEY) - 1]
            found = across.find(_KEY)
            if found >= 0 and edge + found < in_tail:
                at = edge + found
                self._note(
                    bytes(tail[at:]) + chunk[:USAGE_TAIL_BYTES], tail[at - 1] if at else None
                )
        # Keys within the chunk whose start leaves at once (a chunk longer than the tail).
        end = len(chunk) - USAGE_TAIL_BYTES
        at = chunk.find(_KEY, 0, end + len(_KEY) - 1) if end > 0 else -1
        while at >= 0:
            before = chunk[at - 1] if at else (tail[-1] if tail else None)
            self._note(chunk[at : at + USAGE_TAIL_BYTES], before)
            at = chunk.find(_KEY, at + 1, end + len(_KEY) - 1)

    def _note(self, data: bytes, before: int | None) -> None:
        usage = _usage_at(data, 0, before)
        if usage is not None:
            self._passed = usage
