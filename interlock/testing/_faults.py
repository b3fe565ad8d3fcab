"""Fault schedules: which worker, when, which fault; the task that applies them; and the two
ways to write one down (a compact text spec, or a JSON / TOML file of records)."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import attrs
import trio

from ..engines import Engine

FaultKind = Literal["crash", "restart", "stall", "refuse", "accept", "slow", "leave", "rejoin"]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

#: The fault that undoes each kind (what ``+DURATION`` schedules in a text spec).
_UNDO: Mapping[str, FaultKind] = {
    "crash": "restart",
    "refuse": "accept",
    "slow": "slow",
    "leave": "rejoin",
}


def _check_kind(_inst: Any, _attribute: Any, value: Any) -> None:
    if value not in FAULT_KINDS:
        raise ValueError(f"Fault.kind={value!r} is not one of {', '.join(FAULT_KINDS)}")


def _check_at(_inst: Any, _attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"Fault.at must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"Fault.at must be >= 0 (seconds after the schedule starts), got {value}")


def _check_worker(_inst: Any, _attribute: Any, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"Fault.worker_id must be a non-negative int, got {value!r}")


def _check_amount(inst: Fault, _attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"Fault.amount must be a finite number, got {value!r}")
    if inst.kind == "slow" and value <= 0:
        raise ValueError(f"a slow fault's amount is a slow-down factor and must be > 0: {value}")
    if inst.kind == "stall" and value < 0:
        raise ValueError(f"a stall fault's amount is its length in seconds, >= 0: {value}")


@attrs.frozen
class Fault:
    """At trio time ``at`` (seconds after the schedule starts), do ``kind`` to worker
    ``worker_id``; ``amount`` is the stall length in seconds or the slow-down factor (ignored
    by the other kinds).

    Kinds: ``crash`` (break every stream, leave discovery), ``restart`` (come back empty),
    ``stall`` (produce nothing for ``amount`` seconds), ``refuse`` / ``accept`` (new
    streams), ``slow`` (every step ``amount`` times slower; 1.0 restores), ``leave`` /
    ``rejoin`` (discovery only: open streams carry on).

    Raises:
        ValueError: an unknown kind, a negative or non-finite time, a bad worker id or amount.
    """

    at: float = attrs.field(validator=_check_at)
    worker_id: int = attrs.field(validator=_check_worker)
    kind: FaultKind = attrs.field(validator=_check_kind)
    amount: float = attrs.field(default=1.0, validator=_check_amount)

    def apply(self, engine: Any) -> None:
        """Inject this fault into ``engine`` (a `MockEngine`, or any engine with the same
        fault-injection methods) now."""
        if self.kind == "crash":
            engine.crash()
        elif self.kind == "restart":
            engine.restart()
        elif self.kind == "stall":
            engine.stall(self.amount)
        elif self.kind == "refuse":
            engine.refuse_new(True)
        elif self.kind == "accept":
            engine.refuse_new(False)
        elif self.kind == "slow":
            engine.slow(self.amount)
        elif self.kind == "leave":
            engine.leave()
        elif self.kind == "rejoin":
            engine.rejoin()
        else:  # pragma: no cover - FaultKind is closed
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def describe(self) -> str:
        """The fault in the text-spec syntax (`parse_fault_spec` reads it back)."""
        text = f"{self.kind}:{self.worker_id}@{_seconds(self.at)}"
        if self.kind == "stall":
            text += f"+{_seconds(self.amount)}"
        elif self.kind == "slow":
            text += f"x{self.amount:g}"
        return text


def _seconds(value: float) -> str:
    return f"{value:g}s"


async def run_fault_schedule(
    faults: Sequence[Fault], engines: Mapping[int, Engine] | Sequence[Engine]
) -> None:
    """Apply ``faults`` in time order, sleeping (in trio time) between them; returns after the
    last one. Faults naming an unknown worker are ignored."""
    by_id = engines if isinstance(engines, Mapping) else {e.instance_id: e for e in engines}
    start = trio.current_time()
    for fault in sorted(faults, key=lambda f: f.at):
        await trio.sleep_until(start + fault.at)
        engine = by_id.get(fault.worker_id)
        if engine is not None:
            fault.apply(engine)


# -- writing schedules down -------------------------------------------------------------------


class FaultSpecError(ValueError):
    """A fault schedule (text spec or file) that cannot be read; the message names the item
    or record and shows the syntax."""


SPEC_SYNTAX = (
    "KIND:WORKER@TIME[xFACTOR][+DURATION], comma-separated; KIND is one of "
    + ", ".join(FAULT_KINDS)
    + "; TIME and DURATION in s (default), ms or m; e.g. 'crash:3@120s,stall:1@30s+5s,"
    "slow:2@10sx4+60s' (+DURATION on crash, refuse, slow and leave schedules the undo: restart, "
    "accept, slow back to 1, rejoin)"
)

_ITEM = re.compile(
    r"^(?P<kind>[a-z]+):(?P<worker>\d+)@(?P<at>[0-9.]+(?:ms|s|m)?)"
    r"(?:x(?P<factor>[0-9.]+))?(?:\+(?P<duration>[0-9.]+(?:ms|s|m)?))?$"
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _duration(text: str, item: str) -> float:
    number = text.rstrip("ms")
    unit = text[len(number) :] or "s"
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise FaultSpecError(f"fault {item!r}: {text!r} is not a time; {SPEC_SYNTAX}") from None
    return value


def parse_fault_spec(text: str) -> tuple[Fault, ...]:
    """Read a compact fault schedule, e.g. ``"crash:3@120s+30s,stall:1@30s+5s"``.

    ``KIND:WORKER@TIME`` is one fault; ``xFACTOR`` sets a ``slow`` fault's factor; ``+D`` is a
    ``stall``'s length, and on ``crash``, ``refuse``, ``slow`` and ``leave`` it schedules the
    undo D later (``restart``, ``accept``, ``slow`` by 1, ``rejoin``). Returns the faults in
    time order.

    Raises:
        FaultSpecError: naming the item that does not parse and showing the syntax.
    """
    faults: list[Fault] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        match = _ITEM.match(item)
        if match is None:
            raise FaultSpecError(f"fault {item!r} does not parse; expected {SPEC_SYNTAX}")
        kind = match["kind"]
        if kind not in FAULT_KINDS:
            raise FaultSpecError(
                f"fault {item!r}: unknown kind {kind!r}; KIND is one of {', '.join(FAULT_KINDS)}"
            )
        at = _duration(match["at"], item)
        worker = int(match["worker"])
        factor = match["factor"]
        duration = match["duration"]
        if factor is not None and kind != "slow":
            raise FaultSpecError(f"fault {item!r}: only slow takes a factor (x{factor})")
        if duration is not None and kind not in (*_UNDO, "stall"):
            raise FaultSpecError(
                f"fault {item!r}: {kind} takes no duration (+{duration}); durations apply to "
                "stall, crash, refuse, slow and leave"
            )
        try:
            if kind == "stall":
                length = _duration(duration, item) if duration is not None else 1.0
                faults.append(Fault(at, worker, "stall", length))
                continue
            amount = float(factor) if factor is not None else (2.0 if kind == "slow" else 1.0)
            faults.append(Fault(at, worker, kind, amount))
            if duration is not None:
                undo = _UNDO[kind]
                faults.append(Fault(at + _duration(duration, item), worker, undo, 1.0))
        except ValueError as exc:
            raise FaultSpecError(f"fault {item!r}: {exc}") from None
    return tuple(sorted(faults, key=lambda f: f.at))


_FIELDS = ("at", "worker_id", "kind", "amount")


def faults_from_records(records: Iterable[Mapping[str, Any]], *, source: str) -> tuple[Fault, ...]:
    """Build faults from plain records (``at``, ``worker_id``, ``kind``, optional ``amount``).

    Raises:
        FaultSpecError: a record that is not a table, lacks a field, has an unknown one (named,
            with ``source`` and the record's index), or holds a bad value.
    """
    faults = []
    for index, record in enumerate(records):
        where = f"{source}: fault #{index}"
        if not isinstance(record, Mapping):
            raise FaultSpecError(f"{where} is a {type(record).__name__}, not a table of fields")
        unknown = sorted(set(record) - set(_FIELDS))
        if unknown:
            raise FaultSpecError(
                f"{where} has unknown field {unknown[0]!r}; a fault has {', '.join(_FIELDS)}"
            )
        missing = [f for f in _FIELDS[:3] if f not in record]
        if missing:
            raise FaultSpecError(f"{where} lacks {missing[0]!r}")
        try:
            faults.append(Fault(**record))
        except (TypeError, ValueError) as exc:
            raise FaultSpecError(f"{where}: {exc}") from None
    return tuple(sorted(faults, key=lambda f: f.at))


def load_fault_schedule(path: str | os.PathLike[str]) -> tuple[Fault, ...]:
    """Read a fault schedule from a JSON file (a list of fault records, or ``{"faults":
    [...]}``) or a TOML file (``[[fault]]`` tables). Returns the faults in time order.

    Raises:
        FaultSpecError: the file is missing or unreadable, or a record is bad (named).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise FaultSpecError(f"cannot read fault schedule {str(p)!r}: {exc.strerror}") from None
    data: Any
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise FaultSpecError(f"{p} does not parse: {exc}") from None
    if isinstance(data, Mapping):
        keys = set(data)
        if not keys <= {"fault", "faults"}:
            raise FaultSpecError(
                f"{p}: unknown top-level key {sorted(keys - {'fault', 'faults'})[0]!r}; write "
                "the faults as [[fault]] tables (TOML) or a list (JSON)"
            )
        data = data.get("fault", data.get("faults", []))
    if not isinstance(data, list):
        raise FaultSpecError(f"{p}: expected a list of fault records")
    return faults_from_records(data, source=str(p))


def fault_schedule(spec: str) -> tuple[Fault, ...]:
    """A schedule from either a file (when ``spec`` names one that exists, or ends in
    ``.json`` / ``.toml``) or a text spec (`parse_fault_spec`).

    Raises:
        FaultSpecError: as `load_fault_schedule` or `parse_fault_spec`.
    """
    if spec.lower().endswith((".json", ".toml")) or os.path.isfile(spec):
        return load_fault_schedule(spec)
    return parse_fault_spec(spec)
