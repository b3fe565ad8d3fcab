"""`loads_json`: a request body's JSON value, parsed by msgspec where it can, as json decides,
nested at most `MAX_JSON_DEPTH` levels."""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from ._errors import HttpError, bad_request

__all__ = ["MAX_JSON_DEPTH", "loads_json"]

#: The most arrays and objects a request body may nest inside each other. Far above any
#: OpenAI body (a tool's JSON schema nests tens of levels) and far below where json and msgspec
#: run out of Python's stack (about 940 and 985 levels, shifting with the caller's own depth):
#: one limit whichever parser answers, and a body accepted can be written again (the gateway's
#: model rewrite) and walked without a RecursionError.
MAX_JSON_DEPTH: Final = 200


def loads_json(body: bytes) -> Any:
    """The JSON value of ``body`` (a request's bytes), exactly as ``json.loads`` gives it, for
    a body nested at most `MAX_JSON_DEPTH` levels. msgspec parses it (a 100 kB prompt's body in
    about half json's time); a body msgspec refuses (``NaN`` and ``Infinity``, an integer past
    64 bits, a number past a float's range, a byte-order mark, UTF-8-encoded surrogates, or no
    JSON at all) is parsed again by json, which accepts or refuses it as it always did.
    Synchronous.

    Raises:
        HttpError: 400 ``invalid_json`` when json refuses the body, or when it nests deeper
            than `MAX_JSON_DEPTH` (whichever parser noticed).
        TypeError: ``body`` is not ``bytes`` (a ``str`` must be encoded first).
    """
    if type(body) is not bytes:
        raise TypeError(
            f"loads_json takes the request body's bytes, got {type(body).__name__}; "
            "pass the bytes as received (str.encode() a text body)"
        )
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        raise _too_deep() from None
    except msgspec.MsgspecError:
        try:
            value = json.loads(body)
        except RecursionError:
            raise _too_deep() from None
        except ValueError as exc:
            raise bad_request(
                f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json"
            ) from None
    # Nesting needs an opening bracket a level: a body with few of them (nearly every one: a
    # long prompt's brackets are inside its strings) is not walked.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value):
        raise _too_deep()
    return value


def _deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (a decoded JSON value) nests more than ``limit`` arrays and objects;
    walked a level at a time, without recursion."""
    level = [value] if type(value) is list or type(value) is dict else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is list or type(child) is dict:
                    below.append(child)
        level = below
    return False


def _too_deep() -> HttpError:
    return bad_request(
        f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
        f"interlock takes at most {MAX_JSON_DEPTH}",
        code="invalid_json",
    )
