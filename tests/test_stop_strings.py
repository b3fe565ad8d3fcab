"""Stop strings: the stream ends at the first stop string, and no part of one ever leaks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock import RequestError
from interlock.processing import StopStringMatcher

# A small alphabet so stop strings, their overlaps and near misses are common.
ALPHABET = "ab c"
TEXTS = st.text(alphabet=ALPHABET, max_size=40)
STOPS = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4)
CUTS = st.lists(st.integers(0, 40), max_size=8)


def reference(text: str, stops: Sequence[str]) -> tuple[int, int, str] | None:
    """(start, end, stop) of the stop string that completes first; the longest on a tie."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if best is None or (end, start) < (best[1], best[0]):
            best = (start, end, stop)
    return best


def split(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)] or [""]


def longest_jailable_suffix(text: str, stops: Sequence[str]) -> int:
    for length in range(min(len(text), max(map(len, stops))), 0, -1):
        if any(stop.startswith(text[-length:]) and len(stop) > length for stop in stops):
            return length
    return 0


@given(TEXTS, STOPS, CUTS, st.booleans())
def test_emitted_text_is_the_text_cut_at_the_first_stop(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
    emitted = ""
    seen = ""
    stopped = False
    for chunk in split(text, cuts):
        piece, stopped = matcher.push(chunk)
        emitted += piece
        seen += chunk
        if stopped:
            break
        # Nothing emitted so far may contain, or end in, a stop string...
        assert not any(stop in emitted for stop in stops)
        # ...and exactly the longest suffix that could still become one is held back.
        assert seen.startswith(emitted)
        assert len(seen) - len(emitted) == longest_jailable_suffix(seen, stops)
    if not stopped:
        emitted += matcher.flush()

    match = reference(text, stops)
    if match is None:
        assert not stopped
        assert matcher.matched_stop is None
        assert emitted == text
    else:
        start, end, stop = match
        assert stopped
        assert matcher.stopped
        assert matcher.matched_stop == stop
        assert emitted == text[: end if include else start]
        if not include:
            assert not any(s in emitted for s in stops)


def test_a_stop_string_split_across_chunks_is_never_leaked() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("Hello ST") == ("Hello ", False)
    assert matcher.push("O") == ("", False)
    assert matcher.push("P world") == ("", True)
    assert matcher.matched_stop == "STOP"


def test_the_stop_string_is_included_when_asked() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert matcher.push("Hello ST") == ("Hello ", False)
    assert matcher.push("OP world") == ("STOP", True)


def test_a_near_miss_releases_the_held_text() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("a ST") == ("a ", False)
    assert matcher.push("AR") == ("STAR", False)
    assert matcher.push("S") == ("", False)
    assert matcher.flush() == "S"
    assert matcher.flush() == ""


def test_after_a_stop_everything_is_dropped() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.push("one\n\ntwo") == ("one", True)
    assert matcher.push("three") == ("", True)
    assert matcher.flush() == ""


def test_the_stop_string_that_completes_first_wins() -> None:
    assert StopStringMatcher(["abcd", "bc"]).push("xabcd") == ("xa", True)
    # Two stop strings complete at the same character: the longer one starts earlier.
    matcher = StopStringMatcher(["bc", "abc"])
    assert matcher.push("xabc") == ("x", True)
    assert matcher.matched_stop == "abc"


def test_overlapping_partial_matches_are_tracked() -> None:
    matcher = StopStringMatcher(["aab"])
    assert matcher.push("aa") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("b!") == ("", True)


def test_no_stop_strings_pass_everything_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_a_single_string_is_one_stop_string() -> None:
    assert StopStringMatcher("ab").push("xab") == ("x", True)


def test_an_empty_stop_string_is_a_request_error() -> None:
    with pytest.raises(RequestError, match=r"stop\[1\] is empty") as info:
        StopStringMatcher(["ok", ""])
    assert info.value.field == "stop[1]"


def test_unicode_stop_strings() -> None:
    matcher = StopStringMatcher(["👋🏽", "終"])
    assert matcher.push("bye 👋") == ("bye ", False)
    assert matcher.push("🏽 more") == ("", True)
    assert matcher.matched_stop == "👋🏽"
