"""`loads_json`: a request body's JSON value, parsed by msgspec where it can, as json decides,
nested at most `MAX_JSON_DEPTH` levels (and, for a body whose values go on to an engine, none
that cannot be sent on: NaN, Infinity, a lone surrogate)."""

from __future__ import annotations

import json
import math
import re
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


def loads_json(body: bytes, *, sendable: bool = False) -> Any:
    """The JSON value of ``body`` (a request's bytes), exactly as ``json.loads`` gives it, for
    a body nested at most `MAX_JSON_DEPTH` levels. msgspec parses it (a 100 kB prompt's body in
    about half json's time); a body msgspec refuses (``NaN`` and ``Infinity``, an integer past
    64 bits, a number past a float's range, a byte-order mark, UTF-8-encoded surrogates, a
    lone surrogate escape such as ``"\\ud800"``, or no JSON at all) is parsed again by json,
    which accepts or refuses it as it always did. Synchronous.

    ``sendable``: also refuse the values json accepts but that cannot be sent on to an engine
    (which writes the client's fields into its own JSON body, UTF-8 encoded): ``NaN``,
    ``Infinity`` and ``-Infinity`` (not JSON, and refused by strict encoders and parsers) and
    strings or keys holding a lone surrogate (not Unicode text: it has no UTF-8). Only a body
    msgspec refused can hold one, so a body msgspec parses costs nothing more.

    Raises:
        HttpError: 400 ``invalid_json`` when json refuses the body, or when it nests deeper
            than `MAX_JSON_DEPTH` (whichever parser noticed); with ``sendable``, 400
            ``invalid_json`` (NaN, Infinity) or ``invalid_unicode`` (a lone surrogate) whose
            ``param`` names the field (``stop[0]``, ``chat_template_kwargs.x``).
        TypeError: ``body`` is not ``bytes`` (a ``str`` must be encoded first).
    """
    if type(body) is not bytes:
        raise TypeError(
            f"loads_json takes the request body's bytes, got {type(body).__name__}; "
            "pass the bytes as received (str.encode() a text body)"
        )
    # msgspec refuses NaN, the infinities and lone surrogates: only a body json read can
    # hold one.
    strict = True
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        raise _too_deep() from None
    except msgspec.MsgspecError:
        strict = False
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
    if sendable and not strict:
        _refuse_unsendable(value)
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


#: A UTF-16 surrogate code point: json pairs a high and a low escape into one character, so one
#: left in a decoded string is lone.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_unsendable(value: Any) -> None:
    """Raise a 400 naming the first field (depth first) of ``value``, a decoded JSON value
    nested at most `MAX_JSON_DEPTH` levels, that holds NaN, an infinity or a lone surrogate;
    walked without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        kind = type(node)
        if kind is str:
            found = _SURROGATE.search(node)
            if found is not None:
                raise _lone_surrogate(path, found.group())
        elif kind is float:
            if not math.isfinite(node):
                raise _not_finite(path, node)
        elif kind is dict:
            for key in node:
                found = _SURROGATE.search(key)
                if found is not None:
                    raise _lone_surrogate(path, found.group(), in_key=True)
            # Reversed onto the stack, so that the first field is looked at first.
            stack.extend((child, (*path, key)) for key, child in reversed(node.items()))
        elif kind is list:
            stack.extend((node[i], (*path, i)) for i in range(len(node) - 1, -1, -1))


def _field_name(path: tuple[str | int, ...]) -> str | None:
    """``path`` as the OpenAI error's ``param`` writes a field: ``messages[1].content``."""
    name = ""
    for part in path:
        name += f"[{part}]" if type(part) is int else f".{part}" if name else str(part)
    return name or None


def _lone_surrogate(path: tuple[str | int, ...], char: str, *, in_key: bool = False) -> HttpError:
    field = _field_name(path)
    where = field or "the body"
    if in_key:
        where = f"a key in {field}" if field else "a field name"
    return bad_request(
        f"{where} holds the lone surrogate \\u{ord(char):04x} (a \\ud800-\\udfff escape "
        "without its other half), which is not Unicode text and cannot be sent on in UTF-8; "
        "escape a character past U+FFFF as its pair of surrogates (\\ud83d\\ude82 is one "
        "emoji) or send it unescaped",
        field,
        code="invalid_unicode",
    )


def _not_finite(path: tuple[str | int, ...], number: float) -> HttpError:
    field = _field_name(path)
    # json reads a number past a float's range (1e999) as an infinity too.
    written = "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"
    return bad_request(
        f"{field or 'the body'} is {written} (or a number past a float's range), which is not "
        "JSON (Python's json module reads it; standard JSON and the engines' parsers do not) "
        "and cannot be sent on to an engine; send a finite number",
        field,
        code="invalid_json",
    )
