"""The OpenAI ``usage`` a response body reports, read as the body passes through the picker,
chunk by chunk, with a bounded part of it kept (`UsageReader`).

Where the usage is: a stream's (SSE) is in its last chunks (the ``usage`` chunk, then
``data: [DONE]``), so the body's last `USAGE_TAIL_BYTES` hold it. A JSON body's is anywhere in
its object: vLLM's chat body (and the mock engine's) puts ``prompt_logprobs``,
``prompt_token_ids`` and ``kv_transfer_params`` after it, so with ``return_token_ids`` and a
long prompt it is far from the end. A JSON body's chunks are therefore searched for its
``"usage"`` key as they pass, and the object after a key is read there, or held across chunks
until it is whole (a usage object is read up to `USAGE_OBJECT_BYTES`). The first valid usage
is the body's (OpenAI's and vLLM's bodies have one, at the top level, after ``choices``): the
bytes after it are not searched, so the cost of the search (~0.5 ns a byte) stays on the
bytes before it, not on the ``prompt_token_ids`` or ``prompt_logprobs`` after it.
"""

from __future__ import annotations

import json
from typing import Final

from ..engines.openai import usage_from
from ..wire import Usage

__all__ = ["USAGE_OBJECT_BYTES", "USAGE_TAIL_BYTES", "UsageReader", "usage_of"]

#: A stream's (SSE) last bytes kept (`UsageReader`): its usage is in them.
USAGE_TAIL_BYTES: Final = 8192
#: The largest ``usage`` object read (OpenAI's and vLLM's are under 300 bytes); a larger one,
#: or one nested more than `_MAX_DEPTH` objects deep, is not a usage and is passed over.
USAGE_OBJECT_BYTES: Final = 4096
_MAX_DEPTH: Final = 3
_KEY: Final = b'"usage"'
_BLANK: Final = b" \t\r\n"
#: What `_usage_at` says when the bytes end before it can tell.
_CUT: Final = object()
#: The most bytes a JSON body's reader holds: a key and its object.
_HOLD_BYTES: Final = len(_KEY) + USAGE_OBJECT_BYTES


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
        if isinstance(usage, Usage):
            return usage


def _usage_at(data: bytes | bytearray, at: int, before: int | None) -> Usage | object | None:
    """The usage whose ``"usage"`` key starts at ``data[at]`` (``before``: the byte before it,
    None at a body's start); None: not one (inside a JSON string: an escaped quote before it;
    no colon after it; not an object; larger than `USAGE_OBJECT_BYTES` or deeper than
    `_MAX_DEPTH`; not a valid usage); `_CUT`: ``data`` ends before it could tell. Never
    raises: the object is found by its braces first (bounded), then decoded."""
    if before == 0x5C:  # \"usage\": inside a JSON string
        return None
    limit = at + len(_KEY) + USAGE_OBJECT_BYTES
    end = min(len(data), limit)
    cut: object = _CUT if end < limit else None
    start = at + len(_KEY)
    while start < end and data[start] in _BLANK:
        start += 1
    if start >= end:
        return cut
    if data[start] != 0x3A:  # ':'
        return None
    start += 1
    while start < end and data[start] in _BLANK:
        start += 1
    if start >= end:
        return cut
    if data[start] != 0x7B:  # '{': "usage": null in a stream's chunks
        return None
    # The object's end by its braces (a usage holds no strings that could hold a brace;
    # one that does fails to decode below and is passed over).
    depth = 0
    index = start
    while True:
        opening = data.find(b"{", index, end)
        closing = data.find(b"}", index, end)
        if closing < 0:
            return cut
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
    (`usage`). Keeps a bounded part of the body: a stream's last `USAGE_TAIL_BYTES`; of a
    JSON body, only a ``"usage"`` key's bytes while its object is not whole yet (at most
    `USAGE_OBJECT_BYTES` after it), else its last 6 bytes (a key cut by a chunk's end)."""

    def __init__(self) -> None:
        #: A stream's last bytes (at most `USAGE_TAIL_BYTES`).
        self.tail = bytearray()
        #: Whether the body is one JSON object (its first non-blank byte is ``{``); None: no
        #: such byte seen yet. Else it is SSE chunks, whose usage is in the tail.
        self._json: bool | None = None
        #: A JSON body's bytes held across chunks: from a key whose object is cut, or the
        #: last `len(_KEY) - 1` (a key may start there); `_before`: the byte before them.
        self._held = b""
        self._before: int | None = None
        #: A JSON body's usage: the first valid one (nothing more is searched then).
        self._found: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        """Read the body's next ``chunk``."""
        if not chunk:
            return
        if self._json is None:
            first = chunk.lstrip(_BLANK)[:1]
            if first:
                self._json = first == b"{"
        if self._json:
            if self._found is None:
                self._scan(chunk)
            return
        tail = self.tail
        if len(chunk) >= USAGE_TAIL_BYTES:
            tail[:] = chunk[-USAGE_TAIL_BYTES:]
        else:
            tail += chunk
            if len(tail) > USAGE_TAIL_BYTES:
                del tail[: len(tail) - USAGE_TAIL_BYTES]

    @property
    def kept(self) -> int:
        """How many of the body's bytes are held now."""
        return len(self.tail) + len(self._held)

    def usage(self) -> Usage | None:
        """The usage the body reported (a stream's last; a JSON body's first valid one), or
        None; call once, at the body's end (it lets what it holds go)."""
        if self._json:
            self._held = b""
            return self._found
        found = usage_of(bytes(self.tail)) if self.tail else None
        self.tail.clear()
        return found

    def _scan(self, chunk: bytes) -> None:
        """Read the ``"usage"`` keys of a JSON body's next ``chunk`` (each chunk's bytes are
        searched once; a key's object is copied out only where one is found)."""
        held = self._held
        if held:
            # The keys that start in the held bytes, read with the chunk's first bytes.
            joined = held + chunk[:_HOLD_BYTES]
            at = joined.find(_KEY, 0, len(held) + len(_KEY) - 1)
            while at >= 0:
                before = joined[at - 1] if at else self._before
                usage = _usage_at(joined, at, before)
                if usage is _CUT:
                    # The chunk is shorter than the object's bound: it is all held, from the key.
                    self._held, self._before = joined[at:], before
                    return
                if isinstance(usage, Usage):
                    self._found, self._held = usage, b""
                    return
                at = joined.find(_KEY, at + 1, len(held) + len(_KEY) - 1)
        at = chunk.find(_KEY)
        while at >= 0:
            before = chunk[at - 1] if at else (held[-1] if held else self._before)
            usage = _usage_at(chunk, at, before)
            if usage is _CUT:
                self._held, self._before = chunk[at:], before
                return
            if isinstance(usage, Usage):
                self._found, self._held = usage, b""
                return
            at = chunk.find(_KEY, at + 1)
        keep = len(_KEY) - 1
        if len(chunk) >= keep:
            self._held = chunk[-keep:]
            self._before = chunk[-keep - 1] if len(chunk) > keep else (held[-1] if held else None)
        else:
            self._held = (held + chunk)[-keep:]
            self._before = None  # a body in chunks this small: the escape check is skipped
