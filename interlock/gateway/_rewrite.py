"""GAIE's model-name rewrite (``x-llm-d-model-name-rewrite``, or its older name
``x-gateway-model-name-rewrite``: `model_rewrite`): the request body's ``model`` replaced by the
header's name before the pick (`rewrite_model`), and the responses' ``"model"`` put back to the
name the client sent (`ModelNameRestorer`), chunk by chunk.

The pick calls `rewrite_model` on the trio side (in a worker thread for a large body) and
makes the stream's restorer there; the response's body chunks then go through the restorer as
the server reads them (`ExtProcStream.answer_now`), which the pick's answer precedes. Neither
touches the stream's state; the restorer keeps only its held tail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from ..http._openai import json_object

__all__ = [
    "MODEL_REWRITE_HEADER",
    "MODEL_REWRITE_HEADERS",
    "ModelNameRestorer",
    "model_rewrite",
    "rewrite_model",
]

#: GAIE's request header naming the model the request is for, whatever its body says (the
#: name llm-d's picker still reads as a deprecated alias).
MODEL_REWRITE_HEADER: Final = "x-gateway-model-name-rewrite"
#: The rewrite's headers, the one read first first: llm-d's picker reads its own name, then
#: GAIE's (``metadata.ModelNameRewriteKey`` and its alias).
MODEL_REWRITE_HEADERS: Final = ("x-llm-d-model-name-rewrite", MODEL_REWRITE_HEADER)
#: The whitespace a server may put around a JSON colon (at most this much is recognised).
_SPACE: Final = rb"[ \t\r\n]{0,8}"
_SPACE_BYTES: Final = 8


def model_rewrite(headers: Mapping[str, str]) -> str | None:
    """The model a request's ``headers`` (lower-case names) rewrite its body's to, or None.

    As llm-d's picker reads it: the first of `MODEL_REWRITE_HEADERS` present wins, even
    empty, and an empty name rewrites nothing (the body's ``model`` stands), so a client
    cannot get past an empty ``x-llm-d-model-name-rewrite`` with the older header. Pure."""
    for name in MODEL_REWRITE_HEADERS:
        value = headers.get(name)
        if value is not None:
            return value or None
    return None


def rewrite_model(
    body: bytes, model: str, data: dict[str, Any] | None = None
) -> tuple[bytes, str | None]:
    """``body`` (an OpenAI request's JSON) with its ``model`` set to ``model``, and the model
    it named (None, and ``body`` itself, when it named ``model`` already or has no string
    ``model``: the picker's own checks then answer that). The JSON is written again compactly
    (as GAIE's picker does): its meaning is kept, not its bytes. ``data``: ``body`` decoded
    already (`json_object`), changed in place. Synchronous.

    Raises:
        HttpError: 400 when ``body`` is not a JSON object, or holds a value that cannot be
            sent on (NaN, a lone surrogate), as `json_object` refuses it.
    """
    if data is None:
        data = json_object(body)
    incoming = data.get("model")
    if type(incoming) is not str or incoming == model:
        return body, None
    data["model"] = model
    # `json_object` refused NaN, the infinities and lone surrogates (JSON's "\ud800", which
    # has no UTF-8): whatever it returns is written again as UTF-8 JSON.
    rewritten = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return rewritten, incoming


def _json_string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()


class ModelNameRestorer:
    """Puts the client's model name back into a response for a rewritten request: every
    ``"model": "<served>"`` of the response's bytes (a JSON body, or an SSE stream's events)
    becomes ``"model": "<incoming>"``. Fed the body chunk by chunk (`restore`); a chunk that
    ends inside what may be the start of such a field has that tail held back until the next
    chunk, so a field split across chunks is rewritten too (at most ~40 bytes plus the name)."""

    def __init__(self, served: str, incoming: str) -> None:
        served_json = _json_string(served)
        self._field = re.compile(
            rb'("model"' + _SPACE + b":" + _SPACE + b")" + re.escape(served_json)
        )
        self._incoming = _json_string(incoming)
        steps = [re.escape(bytes([b])) for b in b'"model"']
        steps += [_SPACE, b":", _SPACE]
        steps += [re.escape(bytes([b])) for b in served_json]
        # Any beginning of a field (each step optional once the ones before it matched).
        partial = b""
        for step in reversed(steps):
            partial = b"(?:" + step + partial + b")?"
        self._partial = re.compile(partial)
        self._longest = len(b'"model":') + 2 * _SPACE_BYTES + len(served_json)
        self._held = b""

    def restore(self, chunk: bytes, end_of_stream: bool = False) -> bytes:
        """The bytes to pass on for ``chunk``: what was held back before, then ``chunk``,
        rewritten, less any tail that may be the start of a field (everything at
        ``end_of_stream``). Synchronous; keeps the held tail between calls."""
        data = self._held + chunk if self._held else chunk
        data = self._field.sub(self._replace, data)
        self._held = b""
        if end_of_stream:
            return data
        position = data.find(b'"', max(0, len(data) - self._longest))
        while position != -1:
            if self._partial.fullmatch(data, position):
                self._held = data[position:]
                return data[:position]
            position = data.find(b'"', position + 1)
        return data

    def flush(self) -> bytes:
        """What is held back (the response ended without ``end_of_stream`` on a body chunk:
        its trailers came)."""
        held, self._held = self._held, b""
        return held

    def _replace(self, match: re.Match[bytes]) -> bytes:
        return match.group(1) + self._incoming
