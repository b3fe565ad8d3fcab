"""Reading JSONL transition logs (files, rotated sets, stdin) into a `LoadedLog`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TextIO

import attrs

from .._errors import did_you_mean
from ._filter import RequestFilter
from ._history import RequestHistory, group_requests
from ._records import LogEntry, LogProblem, read_lines


@attrs.define
class LoadedLog:
    """The records of one or more log files, in reading order, and the lines that could not be
    read. Grow it with `add`; group it with `requests` and `request`."""

    entries: list[LogEntry] = attrs.field(factory=list)
    problems: list[LogProblem] = attrs.field(factory=list)

    def add(self, items: Iterable[LogEntry | LogProblem]) -> tuple[int, int]:
        """Append parsed lines; return how many entries and problems were added."""
        entries = problems = 0
        for item in items:
            if isinstance(item, LogEntry):
                self.entries.append(item)
                entries += 1
            else:
                self.problems.append(item)
                problems += 1
        return entries, problems

    def requests(self, where: RequestFilter | None = None) -> dict[str, RequestHistory]:
        """Each request's history by `RequestHistory.key` (its id, or ``ID@N`` for the N-th
        request of a repeated id), in order of first appearance, keeping those ``where``
        selects."""
        grouped = group_requests(self.entries)
        if where is None:
            return grouped
        return {rid: h for rid, h in grouped.items() if where.matches(h)}

    def request(self, key: str) -> RequestHistory:
        """One request's history, by id (``ID@N`` for the N-th request of a repeated id, see
        `group_requests`).

        Raises:
            KeyError: no such request; the message suggests close ids.
        """
        requests = self.requests()
        try:
            return requests[key]
        except KeyError:
            hint = did_you_mean(key, requests, n=3)
            raise KeyError(
                f"no record of request {key!r} in the log ({len(requests)} requests){hint}"
            ) from None

    def namesakes(self, key: str) -> list[str]:
        """Every key of the requests sharing ``key``'s request id (itself included)."""
        requests = self.requests()
        rid = requests[key].request_id if key in requests else key
        return [k for k, h in requests.items() if h.request_id == rid]


def load_log(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    stdin: TextIO | None = None,
) -> LoadedLog:
    """Read one log file or several, in the order given (``-`` reads ``stdin``, by default
    `sys.stdin`). Bad lines become `LoadedLog.problems`; reading carries on after them.

    Raises:
        OSError: a file cannot be opened (FileNotFoundError for a missing one).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    log = LoadedLog()
    for path in paths:
        name = os.fspath(path)
        if name == "-":
            log.add(read_lines(stdin or sys.stdin, "<stdin>"))
            continue
        with open(name, encoding="utf-8", errors="replace") as f:
            log.add(read_lines(f, name))
    return log


def rotated_paths(path: str | os.PathLike[str]) -> list[str]:
    """``path`` preceded by its rotated backups (``path.N`` ... ``path.1``, oldest first), as
    `JsonlSink` leaves them; only the backups that exist are listed."""
    name = os.fspath(path)
    backups: list[tuple[int, str]] = []
    directory = os.path.dirname(name) or "."
    base = os.path.basename(name)
    for entry in os.listdir(directory):
        suffix = entry[len(base) + 1 :]
        if entry.startswith(base + ".") and suffix.isdigit():
            backups.append((int(suffix), os.path.join(os.path.dirname(name), entry)))
    return [p for _, p in sorted(backups, reverse=True)] + [name]
