"""States, triggers and modes: the vocabulary of the request lifecycle (names are a contract)."""

from __future__ import annotations

from enum import StrEnum

import attrs


class State(StrEnum):
    """Where a request is in its lifecycle."""

    RECEIVED = "received"
    PREPROCESSED = "preprocessed"
    ROUTED = "routed"
    PREFILLING = "prefilling"
    PREFILLED = "prefilled"
    DECODING = "decoding"
    MIGRATED = "migrated"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: frozenset[State] = frozenset({State.DONE, State.FAILED, State.CANCELLED})


class Trigger(StrEnum):
    """What moves a request from one state to the next."""

    PREPROCESS = "preprocess"
    ROUTE = "route"
    START_PREFILL = "start_prefill"
    FINISH_PREFILL = "finish_prefill"
    FALL_BACK = "fall_back"
    START_DECODE = "start_decode"
    FINISH = "finish"
    ANSWER = "answer"
    MIGRATE = "migrate"
    FAIL = "fail"
    CANCEL = "cancel"
    #: Not an edge: a note after ``done`` that changes no state (``done -> done``), the usage a
    #: gateway's response reported for a request the endpoint picker picked.
    USAGE = "usage"


@attrs.frozen
class Mode:
    """The part of a configuration that decides which transitions exist.

    ``name`` is how logs, docs and ``interlock inspect`` refer to it, e.g.
    ``discover+migration`` or ``query_only``.
    """

    routing: str
    migration: bool = False
    enforce_disagg: bool = False

    @property
    def name(self) -> str:
        parts = [self.routing]
        if self.migration:
            parts.append("migration")
        if self.enforce_disagg:
            parts.append("enforce_disagg")
        return "+".join(parts)

    @property
    def executes(self) -> bool:
        """Whether requests in this mode run on workers (everything but query_only)."""
        return self.routing != "query_only"

    @classmethod
    def from_name(cls, name: str) -> Mode:
        """Parse a mode name.

        Raises:
            ValueError: the name is not one of `ALL_MODES`.
        """
        for mode in ALL_MODES:
            if mode.name == name:
                return mode
        known = ", ".join(m.name for m in ALL_MODES)
        raise ValueError(f"unknown mode {name!r}; the modes are: {known}")


def mode_for(routing: str, migration_limit: int, enforce_disagg: bool) -> Mode:
    """The mode of a (valid) configuration.

    Only discover mode has a graph that depends on migration and enforce_disagg: query_only
    executes nothing, and direct_to_known neither migrates nor falls back (the caller chose the
    workers, so a silent change of plan would hide the caller's mistake).
    """
    if routing == "discover":
        return Mode("discover", migration=migration_limit > 0, enforce_disagg=enforce_disagg)
    return Mode(routing)


ALL_MODES: tuple[Mode, ...] = (
    Mode("discover"),
    Mode("discover", migration=True),
    Mode("discover", enforce_disagg=True),
    Mode("discover", migration=True, enforce_disagg=True),
    Mode("direct_to_known"),
    Mode("query_only"),
)
