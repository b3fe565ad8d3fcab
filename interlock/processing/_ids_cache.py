"""`IdsCache`: texts' token ids, bounded by (estimated) bytes, least recently used first out
(approximately: a second chance, as a CLOCK does, rather than a reorder on every hit).

One cache holds both a prompt's pieces (the text between added tokens) and the words of ASCII
pieces (`AsciiWords`): a word matched alone is its own only word, so a text's ids are the same
whether it was met as a piece or as a word, and one budget bounds both.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Sequence
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
    forgotten first. Thread-safe: a frontend tokenizes large requests in worker threads.

    A hit only marks its text used; when room is needed, the oldest text goes unless it was
    used since it was last passed over, in which case it is unmarked and moved to the back
    (a "second chance"). Moving a text to the back on every hit instead (pop and set) made a
    chat message's word lookups ~3 times as dear.
    """

    __slots__ = ("_bytes", "_cache", "_lock", "_used", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Ordered for its O(1) popitem(last=False): a plain dict as a queue re-scans the holes
        # its pops leave at the front, and a full, mostly-used cache made one eviction pass
        # quadratic (2.2 s at 80k entries).
        self._cache: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        #: Texts found since they were last passed over for eviction (a subset of the keys).
        self._used: set[str] = set()
        self._bytes = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every text."""
        with self._lock:
            self._cache.clear()
            self._used.clear()
            self._bytes = 0

    def get(self, text: str) -> tuple[int, ...] | None:
        """The ids of ``text`` (now marked used), or None if not remembered."""
        with self._lock:
            ids = self._cache.get(text)
            if ids is not None:
                self._used.add(text)
            return ids

    def get_many(self, texts: list[str]) -> tuple[list[tuple[int, ...] | None], bool]:
        """Each text's ids, or None where not remembered, and whether any is None; the
        found ones are marked used. One lock and C loops for all: a message's words cost
        about what plain dict lookups did."""
        with self._lock:
            found = list(map(self._cache.get, texts))
            missing = None in found
            if missing:
                self._used.update(
                    text for text, ids in zip(texts, found, strict=True) if ids is not None
                )
            else:
                self._used.update(texts)
        return found, missing

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        """Remember ``ids`` for ``text``, forgetting the least recently used texts to stay
        within ``max_bytes``; an entry larger than the whole budget is not kept."""
        self.put_many(((text, ids),))

    def put_many(self, items: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """`put` for each item, under one lock."""
        cache = self._cache
        used = self._used
        limit = self.max_bytes
        with self._lock:
            for text, ids in items:
                size = entry_bytes(text, ids)
                if size > limit or text in cache:
                    continue
                cache[text] = ids
                self._bytes += size
                while self._bytes > limit:
                    old, old_ids = cache.popitem(last=False)
                    if old in used:
                        # Used since last passed over: a second chance, at the back. Ends:
                        # each pass unmarks one text.
                        used.discard(old)
                        cache[old] = old_ids
                    else:
                        self._bytes -= entry_bytes(old, old_ids)

    def bytes_counted(self) -> int:
        """The bytes the remembered entries are counted as."""
        return self._bytes

    def entries(self) -> list[tuple[str, tuple[int, ...]]]:
        """The remembered texts and ids, oldest (next to be passed over) first."""
        with self._lock:
            return list(self._cache.items())
