"""Stop strings: end a text stream at the first stop string, even one split across chunks."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import final

from .._errors import RequestError

__all__ = ["StopStringMatcher"]


@final
class StopStringMatcher:
    """Cuts a stream of text at the first stop string, without ever leaking part of one.

    Text that could be the start of a stop string is held back ("jailed") until the stream shows
    whether the stop string completes; the held text is always the longest suffix of the stream
    that is a proper prefix of some stop string.

    The first stop string is the one that *completes* first. When several complete at the same
    character, the longest wins (it starts earliest). This choice does not depend on how the text
    is chunked, and the stream can end as soon as any stop string appears. For example, with stop
    strings ``["abcd", "bc"]`` the text ``"xabcd"`` stops at ``"bc"`` and emits ``"xa"``.

    Matching uses an Aho-Corasick automaton, so each character costs O(1) amortised however many
    or long the stop strings are.

    Raises:
        RequestError: at construction, if a stop string is empty (``field`` is ``stop[i]``).
    """

    __slots__ = (
        "_depth",
        "_fail",
        "_goto",
        "_held",
        "_include",
        "_match",
        "_state",
        "matched_stop",
    )

    def __init__(self, stop: Sequence[str], *, include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]  # a bare string is one stop string, not one per character
        for index, text in enumerate(stop):
            if not text:
                raise RequestError(
                    f"stop[{index}] is empty; an empty stop string would end every output "
                    "before its first character",
                    field=f"stop[{index}]",
                )
        self._include = include_stop_str_in_output
        # Automaton states are the prefixes of the stop strings; state 0 is the empty prefix.
        self._goto: list[dict[str, int]] = [{}]
        self._depth: list[int] = [0]
        # _match[state]: the longest stop string that is a suffix of the state's prefix, if any.
        self._match: list[str | None] = [None]
        for text in stop:
            self._add(text)
        self._fail = self._failure_links()
        self._state = 0
        self._held = ""
        self.matched_stop: str | None = None
        """The stop string that ended the stream, or None while it has not ended."""

    def _add(self, text: str) -> None:
        state = 0
        for char in text:
            following = self._goto[state].get(char)
            if following is None:
                following = len(self._goto)
                self._goto[state][char] = following
                self._goto.append({})
                self._depth.append(self._depth[state] + 1)
                self._match.append(None)
            state = following
        self._match[state] = text

    def _failure_links(self) -> list[int]:
        fail = [0] * len(self._goto)
        queue = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self._goto[state].items():
                queue.append(child)
                fallback = fail[state]
                while fallback and char not in self._goto[fallback]:
                    fallback = fail[fallback]
                fail[child] = self._goto[fallback].get(char, 0)
                # A shorter stop string ending here counts when no stop string ends exactly here.
                if self._match[child] is None:
                    self._match[child] = self._match[fail[child]]
        return fail

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found; ``push`` then returns ``("", True)``."""
        return self.matched_stop is not None

    def push(self, text: str) -> tuple[str, bool]:
        """Feed the next piece of the stream.

        Returns:
            ``(emit, stopped)``: ``emit`` is the text now known not to belong to a stop string;
            when ``stopped`` is True the stream ended at a stop string, and ``emit`` runs up to
            it (or through it, with ``include_stop_str_in_output``). After that, every call
            returns ``("", True)``.
        """
        if self.matched_stop is not None:
            return "", True
        goto, fail, match = self._goto, self._fail, self._match
        state = self._state
        for index, char in enumerate(text):
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            found = match[state]
            if found is not None:
                self.matched_stop = found
                buffer = self._held + text[: index + 1]
                self._held = ""
                end = len(buffer) if self._include else len(buffer) - len(found)
                return buffer[:end], True
        self._state = state
        buffer = self._held + text
        # The automaton's state is exactly the longest suffix that could still grow into a stop
        # string, so that is what stays jailed.
        keep = self._depth[state]
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release the held text at the end of the stream (no stop string completed).

        Returns ``""`` after a stop string was found.
        """
        held, self._held = self._held, ""
        self._state = 0
        return held
