"""Following a live log: read what was appended since the last look, across rotation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

from ._load import LoadedLog
from ._records import LogEntry, LogProblem, parse_line


class LogFollower:
    """Reads the complete lines appended to ``path`` since the previous `poll`.

    Polling never waits. When the file is replaced (a `JsonlSink` rotation renames it to
    ``path.1`` and starts a new one) the rest of the old file is read first, then the new file
    from its start; when it shrinks (truncated in place) it is read again from its start. A
    missing file is waited for. Line numbers restart with each new file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        #: How many times the file was replaced or truncated while followed.
        self.rotations = 0
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._line = 0
        self._partial = b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def poll(self) -> list[LogEntry | LogProblem]:
        """The entries and problems of the lines completed since the last poll."""
        found: list[LogEntry | LogProblem] = []
        try:
            stat: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            stat = None  # between a rotation's rename and the new file's first write
        if self._file is not None:
            identity = None if stat is None else (stat.st_dev, stat.st_ino)
            if identity != self._identity:
                found += self._read(final=True)
                self.close()
                self.rotations += 1
            elif stat is not None and stat.st_size < self._offset:
                self.close()
                self.rotations += 1
        if self._file is None and stat is not None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across polls
            except FileNotFoundError:
                return found
            opened = os.fstat(self._file.fileno())
            self._identity = (opened.st_dev, opened.st_ino)
            self._offset = 0
            self._line = 0
            self._partial = b""
        if self._file is not None:
            found += self._read(final=False)
        return found

    def _read(self, *, final: bool) -> list[LogEntry | LogProblem]:
        assert self._file is not None
        data = self._file.read()
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = b"" if final else chunks.pop()
        found: list[LogEntry | LogProblem] = []
        for chunk in chunks:
            self._line += 1
            parsed = parse_line(chunk.decode("utf-8", errors="replace"), self.path, self._line)
            if parsed is not None:
                found.append(parsed)
        return found


def follow(
    path: str | os.PathLike[str],
    on_update: Callable[[LoadedLog], None],
    *,
    interval: float = 1.0,
    sleep: Callable[[float], object] = time.sleep,
    iterations: int | None = None,
) -> LoadedLog:
    """Poll ``path`` every ``interval`` seconds and call ``on_update`` with everything read so
    far after the first poll and after every poll that read something. Blocks (in ``sleep``)
    until ``iterations`` polls are done, forever when None (stop it with Ctrl-C, i.e.
    `KeyboardInterrupt`). Returns the log read."""
    follower = LogFollower(path)
    log = LoadedLog()
    done = 0
    try:
        while iterations is None or done < iterations:
            added, problems = log.add(follower.poll())
            if done == 0 or added or problems:
                on_update(log)
            done += 1
            if iterations is None or done < iterations:
                sleep(interval)
    finally:
        follower.close()
    return log
