"""A gateway pick's and a route request's body is parsed by msgspec where it can (issue 14: a
100 kB prompt's body in about half the time) with exactly json's answers for a body nested at
most `MAX_JSON_DEPTH` levels: the same value for every body json accepts, and the same 400 for
every body it refuses; a deeper body is one 400 naming the limit, whichever parser saw it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.http._errors import HttpError
from interlock.http._json import MAX_JSON_DEPTH, loads_json
from interlock.http._sse import dumps, dumps_plain

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and types compared (1 is not 1.0 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


TOO_DEEP = (
    400,
    f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
    f"interlock takes at most {MAX_JSON_DEPTH}",
)


def _depth(value: Any) -> int:
    """How many arrays and objects ``value`` nests (the outermost counted)."""
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _reference(body: bytes) -> Any:
    """json.loads's answer, under the depth limit: what `loads_json` must give."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise HttpError(*TOO_DEEP) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise HttpError(*TOO_DEEP)
    return value


def _outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(body)
    except HttpError as exc:
        return "error", (exc.status, exc.message)
    except (ValueError, RecursionError) as exc:
        return "error", (400, f"the request body is not valid JSON: {str(exc)[:200]}")


def _nested(depth: int, kind: str, inner: bytes = b"1") -> bytes:
    """A body of ``depth`` arrays or objects (``kind``) around ``inner``."""
    if kind == "array":
        return b"[" * depth + inner + b"]" * depth
    return b'{"a":' * depth + inner + b"}" * depth


@given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_every_body_json_writes_parses_to_the_same_value(
    value: Any, ascii_only: bool, indent: int | None
) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert _same(loads_json(body), json.loads(body))


@given(
    st.one_of(
        st.binary(max_size=40),
        json_values.map(lambda v: json.dumps(v).encode()).flatmap(
            # A valid body with a few bytes cut, changed or added.
            lambda body: st.tuples(
                st.just(body), st.integers(0, len(body)), st.binary(max_size=3)
            ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :])
        ),
        st.sampled_from(
            [
                b"NaN",
                b"[-Infinity]",
                b"1e400",
                b'"\xed\xa0\x80"',
                b'\xef\xbb\xbf{"model": "m"}',
                '{"a": "é"}'.encode("utf-16"),
                b"[" * 5000 + b"]" * 5000,
                b'{"a": 1, "a": 2}',
                b'"\\ud800"',
            ]
        ),
    )
)
def test_any_body_gets_jsons_value_or_jsons_refusal(body: bytes) -> None:
    kind, got = _outcome(loads_json, body)
    expected_kind, expected = _outcome(_reference, body)
    assert kind == expected_kind, (body, got, expected)
    if kind == "value":
        assert _same(got, expected)
    else:
        assert got == expected


def test_a_refusal_is_an_openai_style_400() -> None:
    with pytest.raises(HttpError) as error:
        loads_json(b'{"model": ')
    assert error.value.status == 400 and error.value.code == "invalid_json"


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("inner", [b"1", b"NaN", b'"\xed\xa0\x80"'])
def test_the_depth_limit_is_the_same_whichever_parser_answers(kind: str, inner: bytes) -> None:
    # msgspec runs out of stack a few levels deeper than json (about 985 and 940 levels here),
    # so the bodies between were a 400 from json and a value from msgspec; ``NaN`` and an
    # encoded surrogate send the body to json instead. One limit, one 400, for all of them.
    body = _nested(MAX_JSON_DEPTH, kind, inner)
    assert _same(loads_json(body), json.loads(body))
    for depth in (MAX_JSON_DEPTH + 1, 500, 900, 940, 943, 960, 984, 990, 1000, 5000):
        with pytest.raises(HttpError) as error:
            loads_json(_nested(depth, kind, inner))
        assert (error.value.status, error.value.message) == TOO_DEEP, depth
        assert error.value.code == "invalid_json"


def test_brackets_inside_strings_are_not_nesting() -> None:
    # More brackets than the limit, all in a string: not walked past, not refused.
    body = json.dumps({"model": "m", "prompt": "[{" * (2 * MAX_JSON_DEPTH)}).encode()
    assert loads_json(body) == json.loads(body)
    wide = json.dumps([[[i]] for i in range(MAX_JSON_DEPTH)]).encode()
    assert loads_json(wide) == json.loads(wide)


def test_a_body_as_text_is_a_type_error_saying_to_pass_bytes() -> None:
    # msgspec would raise UnicodeEncodeError on a str holding a lone surrogate, which is no
    # MsgspecError, so json's answer was never asked for; bodies arrive as bytes.
    with pytest.raises(TypeError, match="takes the request body's bytes, got str"):
        loads_json('{"a": "\ud800"}')  # type: ignore[arg-type]
    assert loads_json(b'{"a": "\\ud800"}') == {"a": "\ud800"}


# -- values that cannot be sent on to an engine (sendable=True, as every OpenAI body is read) --

#: Strings as json decodes them from escapes: any character, lone surrogates included.
_ANY_TEXT = st.text(st.characters(codec=None) | st.sampled_from(["\ud800", "\udbff", "\udc00"]))
_UNSENDABLE_NUMBERS = [math.nan, math.inf, -math.inf]
_FIELD = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
_clean_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_FIELD, inner, max_size=3),
    max_leaves=10,
)


def _unsendable(value: Any) -> bool:
    """Whether ``value`` holds NaN, an infinity, or a string or key with a lone surrogate (a
    surrogate left in a decoded string is lone: json joins pairs)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(map(_unsendable, value))
    if isinstance(value, dict):
        return any(_unsendable(k) or _unsendable(v) for k, v in value.items())
    return False


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | _ANY_TEXT,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ANY_TEXT, inner, max_size=4),
        max_leaves=20,
    ),
    st.booleans(),
)
def test_a_sendable_body_is_jsons_value_unless_it_holds_nan_or_a_lone_surrogate(
    value: Any, ascii_only: bool
) -> None:
    try:
        body = json.dumps(value, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:  # a lone surrogate written unescaped has no UTF-8 to send
        body = json.dumps(value).encode()
    if _unsendable(value):
        with pytest.raises(HttpError) as refused:
            loads_json(body, sendable=True)
        assert refused.value.status == 400
        assert refused.value.code in ("invalid_json", "invalid_unicode")
        refused.value.body()  # the error itself can be sent
    else:
        assert _same(loads_json(body, sendable=True), loads_json(body))


@st.composite
def _body_with_one_unsendable(draw: st.DrawFn) -> tuple[bytes, str | None, str, bool]:
    """A JSON object with one NaN, infinity or lone surrogate somewhere (a value, or a key),
    the field the 400's param names (a key's object; None: a top-level key), its code, and
    whether a key holds it."""
    in_key = draw(st.booleans())
    # Where it sits: a field of the body, then fields and list indexes.
    path: list[str | int] = []
    if not in_key or draw(st.booleans()):  # else a key of the body itself
        path = [draw(_FIELD), *draw(st.lists(_FIELD | st.integers(0, 3), max_size=4))]
    if in_key:
        inner: Any = {draw(_FIELD) + draw(st.sampled_from(["\ud800", "\udfff"])): 1}
        code = "invalid_unicode"
    elif draw(st.booleans()):
        inner = draw(st.sampled_from(_UNSENDABLE_NUMBERS))
        code = "invalid_json"
    else:
        inner = draw(_FIELD) + draw(st.sampled_from(["\ud800", "\udbff", "\udfff"]))
        code = "invalid_unicode"
    field = ""
    for step in path:
        field += f"[{step}]" if isinstance(step, int) else f".{step}" if field else step
    for step in reversed(path):
        if isinstance(step, int):
            inner = [*draw(st.lists(_clean_values, min_size=step, max_size=step)), inner]
        else:
            inner = {**draw(st.dictionaries(_FIELD, _clean_values, max_size=2)), step: inner}
    others = draw(st.dictionaries(_FIELD, _clean_values, max_size=3))
    body = {k: v for k, v in others.items() if k not in inner} | inner
    return json.dumps(body).encode(), field or None, code, in_key


@given(_body_with_one_unsendable())
def test_an_unsendable_value_is_a_400_naming_its_field(
    case: tuple[bytes, str | None, str, bool],
) -> None:
    body, field, code, in_key = case
    assert _same(loads_json(body), json.loads(body))  # json reads it: unchecked, it passes
    with pytest.raises(HttpError) as refused:
        loads_json(body, sendable=True)
    error = refused.value
    assert (error.status, error.param, error.code) == (400, field, code), body
    if in_key:
        assert error.message.startswith(f"a key in {field} " if field else "a field name ")
    else:
        assert error.message.startswith(f"{field} is " if code == "invalid_json" else f"{field} ")
    error.body()  # the error itself can be sent


# -- answers: `dumps_plain` writes what `dumps` writes -------------------------------------------

#: What an answer body holds besides the engine's fields and the nvext: strings (any code point
#: but a lone surrogate), integers of any size, booleans and nulls, in lists and objects.
_plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",))), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(_plain_values)
def test_an_answer_without_floats_is_written_byte_for_byte_as_json_writes_it(value: Any) -> None:
    assert dumps_plain(value) == dumps(value)


def test_every_character_is_escaped_as_json_escapes_it() -> None:
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert dumps_plain({"content": text}) == dumps({"content": text})
