"""`OutlierEjector`: which workers the router leaves out for a while because they broke or
stalled streams, in the manner of Envoy's outlier detection.

A worker that stalls a stream (no progress within a deadline: a frozen engine, a stopped
process) is ejected at once; one that breaks ``failures`` streams within ``ejection_time``
seconds is ejected too. An ejection lasts ``ejection_time`` times the number of ejections in a
row (at most `MAX_MULTIPLIER`); each ``ejection_time`` that passes without an ejection takes
one off that count, as Envoy decrements its ejection multiplier. An ejected worker comes back
by itself when its time is up (Envoy's model too): a worker that is still broken then fails
its next stream and is ejected for longer.

Nothing here counts a client's bad request: the pipeline reports only `WorkerGone` (stream
broken) and `WorkerStalled`, never `RequestError` (sglang#25811 is what happens otherwise).
Synchronous, owned by the Router actor; time is passed in (trio's clock).
"""

from __future__ import annotations

import collections
import math

import attrs

#: An ejection lasts at most this many ``ejection_time`` periods (Envoy: max_ejection_time
#: defaults to 10 times base_ejection_time).
MAX_MULTIPLIER = 10


@attrs.define
class _Record:
    failures: collections.deque[float] = attrs.field(factory=collections.deque)
    ejected_until: float = -math.inf
    multiplier: int = 0


class OutlierEjector:
    """Failure counts and ejections per worker. ``ejection_time`` 0 turns ejection off."""

    def __init__(self, ejection_time: float, failures: int) -> None:
        self.ejection_time = ejection_time
        self.failures = failures
        self._records: dict[int, _Record] = {}

    def failed(self, worker_id: int, now: float, *, stalled: bool) -> float | None:
        """Count a broken (``stalled``: by making no progress) stream of ``worker_id``.

        Returns the seconds it is now ejected for, or None when this did not eject it (or it
        was ejected already).
        """
        if self.ejection_time <= 0:
            return None
        record = self._records.setdefault(worker_id, _Record())
        if record.ejected_until > now:
            return None  # streams it had before its ejection still break: no new evidence
        window = record.failures
        window.append(now)
        while window and window[0] <= now - self.ejection_time:
            window.popleft()
        if not stalled and len(window) < self.failures:
            return None
        window.clear()
        # Periods since the last ejection ended without one take back one step each.
        if record.multiplier and record.ejected_until > -math.inf:
            calm = int((now - record.ejected_until) // self.ejection_time)
            record.multiplier = max(0, record.multiplier - calm)
        record.multiplier = min(record.multiplier + 1, MAX_MULTIPLIER)
        duration = self.ejection_time * record.multiplier
        record.ejected_until = now + duration
        return duration

    @property
    def has_records(self) -> bool:
        """Whether any worker ever failed a stream (else nobody is ejected: a cheap check
        before looking at each candidate)."""
        return bool(self._records)

    def known(self) -> list[int]:
        """The workers with a record (failures seen or an ejection)."""
        return list(self._records)

    def is_ejected(self, worker_id: int, now: float) -> bool:
        record = self._records.get(worker_id)
        return record is not None and record.ejected_until > now

    def returns(self, workers: list[int], now: float) -> dict[int, float]:
        """The workers of ``workers`` ejected at ``now``, with when each ejection ends (on
        the clock ``now`` is from: the exact time `is_ejected` turns False)."""
        records = self._records
        return {
            w: record.ejected_until
            for w in workers
            if (record := records.get(w)) is not None and record.ejected_until > now
        }

    def ejected(self, now: float) -> dict[int, float]:
        """Every worker ejected at ``now``, with its seconds left."""
        return {
            worker_id: record.ejected_until - now
            for worker_id, record in sorted(self._records.items())
            if record.ejected_until > now
        }

    def forget(self, worker_id: int, now: float) -> None:
        """Drop what is known of ``worker_id``, which left routing, unless it is ejected at
        ``now``: a worker that leaves and rejoins while ejected (a frozen engine whose health
        check times out) stays ejected, else a flapping worker would never stay out. A record
        kept so is dropped by a later call once its ejection is over."""
        record = self._records.get(worker_id)
        if record is not None and record.ejected_until <= now:
            del self._records[worker_id]
