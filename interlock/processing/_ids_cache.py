"""`IdsCache`: texts' token ids, bounded by (estimated) bytes, least recently used first out.

One cache holds both a prompt's pieces (the text between added tokens) and the words of ASCII
pieces (`AsciiWords`): a word matched alone is its own only word, so a text's ids are the same
whether it was met as a piece or as a word, and one budget bounds both.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Final

__all__ = ["IdsCache", "entry_bytes"]

# Estimated bytes per entry beyond its text and ids: the dict entry, the str and tuple headers.
_OVERHEAD: Final = 200
# Estimated bytes per id: a pointer in the tuple and the int object.
_ID_BYTES: Final = 36


def entry_bytes(text: str, ids: Sequence[int]) -> int:
    """The bytes an entry is counted as (an overestimate: 64-char words of ~42 ids each held
    ~1,180 bytes measured, counted as 1,776)."""
    return len(text) + _ID_BYTES * len(ids) + _OVERHEAD


class IdsCache:
    """Texts' ids, at most ``max_bytes`` of them (`entry_bytes`), the least recently used
    forgotten first. Thread-safe: a frontend tokenizes large requests in worker threads."""

    __slots__ = ("_bytes", "_cache", "_lock", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._cache: dict[str, tuple[int, ...]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every text."""
        with self._lock:
            self._cache.clear()
            self._bytes = 0

    def get(self, text: str) -> tuple[int, ...] | None:
        """The ids of ``text`` (now the most recently used), or None if not remembered."""
        cache = self._cache
        with self._lock:
            ids = cache.pop(text, None)
            if ids is not None:
                # Back in at the end: the most recently used.
                cache[text] = ids
            return ids

    def get_many(self, texts: list[str]) -> list[tuple[int, ...] | None]:
        """Each text's ids, or None where not remembered; the found ones become the most
        recently used. One lock and C loops for all: a message's words cost about what
        plain dict lookups did."""
        cache = self._cache
        with self._lock:
            found = list(map(cache.get, texts))
            if None in found:
                for text, ids in zip(texts, found, strict=True):
                    if ids is not None:
                        del cache[text]
                        cache[text] = ids
            else:
                # Out and back in at the end (a repeated text is popped once, put back twice).
                deque(map(cache.pop, texts, repeat(None)), maxlen=0)
                cache.update(zip(texts, found, strict=True))
        return found

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        """Remember ``ids`` for ``text``, forgetting the least recently used texts to stay
        within ``max_bytes``; an entry larger than the whole budget is not kept."""
        self.put_many(((text, ids),))

    def put_many(self, items: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """`put` for each item, under one lock."""
        cache = self._cache
        limit = self.max_bytes
        with self._lock:
            for text, ids in items:
                size = entry_bytes(text, ids)
                if size > limit or text in cache:
                    continue
                cache[text] = ids
                self._bytes += size
                while self._bytes > limit:
                    old = next(iter(cache))
                    self._bytes -= entry_bytes(old, cache.pop(old))

    def bytes_counted(self) -> int:
        """The bytes the remembered entries are counted as."""
        return self._bytes

    def entries(self) -> list[tuple[str, tuple[int, ...]]]:
        """The remembered texts and ids, least recently used first."""
        with self._lock:
            return list(self._cache.items())
