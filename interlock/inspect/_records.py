"""One line of a JSONL transition log: a `LogEntry`, or a `LogProblem` saying why not."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ..statemachines import SCHEMA_VERSION

#: Every field of a schema-version-1 record, with the types a value may have.
_FIELDS: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "request_id": (str,),
    "seq": (int,),
    "mode": (str,),
    "t": (int, float),
    "wall": (int, float),
    "src": (str,),
    "dst": (str,),
    "trigger": (str,),
    "worker_id": (int, type(None)),
    "decision": (object,),
    "detail": (str, type(None)),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", type(None): "null"}


@attrs.frozen(slots=True)
class LogEntry:
    """One transition record read from a log, with where it was read: ``source`` (a path,
    or ``<stdin>``) and ``line`` (1-based). The fields are those of `TransitionRecord`;
    ``decision`` is the plain JSON data (a `RoutingDecision` dict on ``route`` and
    ``fall_back``)."""

    request_id: str
    seq: int
    mode: str
    t: float
    wall: float
    src: str
    dst: str
    trigger: str
    worker_id: int | None
    decision: Any
    detail: str | None
    source: str = ""
    line: int = 0
    v: int = SCHEMA_VERSION

    @property
    def location(self) -> str:
        """``SOURCE:LINE``, as editors and compilers print it."""
        return f"{self.source}:{self.line}"

    def to_json_dict(self) -> dict[str, Any]:
        """The record as the log holds it (without ``source`` and ``line``)."""
        return {
            "v": self.v,
            "request_id": self.request_id,
            "seq": self.seq,
            "mode": self.mode,
            "t": self.t,
            "wall": self.wall,
            "src": self.src,
            "dst": self.dst,
            "trigger": self.trigger,
            "worker_id": self.worker_id,
            "decision": self.decision,
            "detail": self.detail,
        }


@attrs.frozen(slots=True)
class LogProblem:
    """A line that could not be read, and why. ``str()`` gives ``SOURCE:LINE: reason``."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def parse_line(text: str, source: str, line: int) -> LogEntry | LogProblem | None:
    """Read one line of a log: a `LogEntry`, a `LogProblem` saying what is wrong with it, or
    None for a blank line. Never raises."""
    if not text.strip():
        return None

    def problem(reason: str) -> LogProblem:
        return LogProblem(source, line, reason)

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return problem(f"not JSON ({exc.msg} at column {exc.colno}); line skipped")
    except RecursionError:
        return problem("not a transition record (nested too deeply); line skipped")
    if not isinstance(data, dict):
        return problem(f"not a transition record (a JSON {type(data).__name__}); line skipped")
    version = data.get("v")
    if version != SCHEMA_VERSION:
        if "v" not in data:
            return problem("no schema version ('v' field): not a transition record; line skipped")
        return problem(
            f"schema version {version!r} is not supported: this interlock reads version "
            f"{SCHEMA_VERSION} (see docs/transition-logs.md); inspect the log with the interlock "
            "version that wrote it; line skipped"
        )
    for name in data:
        if name not in _FIELDS:
            return problem(f"unknown field {name!r} in a version-{SCHEMA_VERSION} record")
    for name, kinds in _FIELDS.items():
        if name not in data:
            return problem(f"missing field {name!r}; line skipped")
        value = data[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and object not in kinds):
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            return problem(f"field {name!r} must be {expected}, got {value!r}; line skipped")
    if data["seq"] < 0:
        return problem(f"field 'seq' must be 0 or more, got {data['seq']}; line skipped")
    return LogEntry(
        request_id=data["request_id"],
        seq=data["seq"],
        mode=data["mode"],
        t=float(data["t"]),
        wall=float(data["wall"]),
        src=data["src"],
        dst=data["dst"],
        trigger=data["trigger"],
        worker_id=data["worker_id"],
        decision=data["decision"],
        detail=data["detail"],
        source=source,
        line=line,
        v=version,
    )


def read_lines(
    lines: Iterable[str], source: str, *, first_line: int = 1
) -> Iterator[LogEntry | LogProblem]:
    """Parse ``lines`` (numbered from ``first_line``), skipping blank ones."""
    for number, text in enumerate(lines, start=first_line):
        parsed = parse_line(text, source, number)
        if parsed is not None:
            yield parsed
