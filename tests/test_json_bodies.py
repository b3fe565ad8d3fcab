"""A gateway pick's and a route request's body is parsed by msgspec where it can (issue 14: a
100 kB prompt's body in about half the time) with exactly json's answers: the same value for
every body json accepts, and the same 400 for every body it refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.http._errors import HttpError
from interlock.http._json import loads_json

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


def _outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(body)
    except HttpError as exc:
        return "error", (exc.status, exc.message)
    except (ValueError, RecursionError) as exc:
        return "error", (400, f"the request body is not valid JSON: {str(exc)[:200]}")


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
    expected_kind, expected = _outcome(json.loads, body)
    assert kind == expected_kind, (body, got, expected)
    if kind == "value":
        assert _same(got, expected)
    else:
        assert got == expected


def test_a_refusal_is_an_openai_style_400() -> None:
    with pytest.raises(HttpError) as error:
        loads_json(b'{"model": ')
    assert error.value.status == 400 and error.value.code == "invalid_json"
