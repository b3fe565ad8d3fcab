"""Server-sent events, pre-encoded.

A stream's chunks differ only in their text, so `ChunkEncoder` encodes everything else once per
request: each chunk costs one string escape and a few byte joins, not a JSON encoding of the
whole object (reference/stack.md section 2: pre-encoded bytes through ``StreamingResponse``-style
sends, not per-event encoding).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any, Final

import msgspec

DONE: Final = b"data: [DONE]\n\n"
_DUMPS: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> bytes:
    """Compact JSON, UTF-8."""
    return _DUMPS(value).encode()


def dumps_plain(value: Any) -> bytes:
    """`dumps`'s bytes for a value without floats (strings, ints, bools, None, and lists,
    tuples and dicts with string keys of those), in a tenth of its time (msgspec: a chat
    answer's body in ~2 µs instead of ~17). Not for a value that may hold a float: msgspec
    writes an equal number in another form (``1e16``, json ``1e+16``) and NaN as ``null``.

    Raises:
        UnicodeEncodeError: a string holds a lone surrogate (as `dumps`).
    """
    return _PLAIN(value)


_PLAIN: Final = msgspec.json.Encoder().encode


def event(value: Any) -> bytes:
    """One ``data:`` event holding ``value`` as JSON."""
    return b"data: " + dumps(value) + b"\n\n"


class ChunkEncoder:
    """Encodes one streaming response's chunks: ``chat.completion.chunk`` for chat,
    ``text_completion`` for completions.

    The first chunk carries ``"role": "assistant"`` in its delta together with the first text
    (one chunk fewer than a separate role chunk; the OpenAI clients accept both). With
    ``include_usage`` every chunk has ``"usage": null`` and a last chunk with no choices carries
    the usage, as OpenAI streams do.
    """

    __slots__ = ("_first", "_head", "_include_usage", "_next", "_suffix", "chat")

    def __init__(
        self, kind: str, *, request_id: str, created: int, model: str, include_usage: bool
    ) -> None:
        self.chat = kind == "chat"
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = dumps({"id": request_id, "object": obj, "created": created, "model": model})
        # ``data: {"id":...,"model":"m"`` without the closing brace: chunks continue it.
        self._head = b"data: " + head[:-1]
        self._include_usage = include_usage
        usage = b',"usage":null' if include_usage else b""
        if self.chat:
            self._first = (
                self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
            )
            self._next = self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        else:
            self._first = self._next = self._head + b',"choices":[{"index":0,"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"

    def text(self, text: str, *, first: bool) -> bytes:
        """A chunk carrying ``text`` (the first chunk of a chat stream also names the role)."""
        return (
            (self._first if first else self._next) + encode_basestring(text).encode() + self._suffix
        )

    def delta(self, text: str, fields: dict[str, Any], *, first: bool) -> bytes:
        """A chat chunk whose delta carries, besides any ``text``, the fields the engine sent
        (`EngineOutput.chat_delta`: ``tool_calls`` deltas, reasoning) as they came."""
        rest = self._chat_choice(text, fields, first, None)
        if self._include_usage:
            rest["usage"] = None
        return self._head + b"," + dumps(rest)[1:] + b"\n\n"

    def _chat_choice(
        self, text: str, fields: dict[str, Any] | None, first: bool, finish_reason: str | None
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or (first and not fields):
            delta["content"] = text
        if fields:
            delta.update(fields)
        return {
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
        }

    def final(
        self,
        text: str,
        finish_reason: str | None,
        *,
        first: bool,
        usage: dict[str, Any] | None,
        nvext: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> bytes:
        """The last chunk (with its finish reason, the ``fields`` the engine sent in its last
        chat delta, and any response ``nvext``), the usage chunk when asked for, and
        ``[DONE]``: everything that ends the stream, in one write."""
        if self.chat:
            rest: dict[str, Any] = self._chat_choice(text, fields, first, finish_reason)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            rest = {"choices": [choice]}
        if self._include_usage:
            rest["usage"] = None
        if nvext is not None:
            rest["nvext"] = nvext
        # The engine's fields and the nvext may hold floats; the rest are strings and ints.
        encode = dumps if fields or nvext else dumps_plain
        out = self._head + b"," + encode(rest)[1:] + b"\n\n"
        if self._include_usage and usage is not None:
            out += self._head + b',"choices":[],"usage":' + dumps_plain(usage) + b"}\n\n"
        return out + DONE

    def query(self, nvext: dict[str, Any]) -> bytes:
        """A query-only stream: one chunk with an empty delta (no finish_reason) carrying
        ``nvext.worker_id`` and ``nvext.token_ids``, then ``[DONE]`` (reference/dynamo.md 5.3)."""
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
        rest = {"choices": [choice], "nvext": nvext}
        return self._head + b"," + dumps(rest)[1:] + b"\n\n" + DONE
