"""`RequestFsm`: one request's position in its mode's graph, on the compiled table."""

from __future__ import annotations

from typing import Any

from .._errors import IllegalTransition
from ._log import TransitionLog, TransitionRecord
from ._modes import TERMINAL_STATES, Mode, State
from ._spec import table_for


class RequestFsm:
    """The lifecycle of one request. Synchronous: firing a trigger never waits.

    Raises `IllegalTransition` for an edge the mode does not have, which is always a bug.
    """

    __slots__ = ("_log", "_mode_name", "_table", "mode", "request_id", "seq", "state")

    def __init__(self, request_id: str, mode: Mode, log: TransitionLog) -> None:
        self.request_id = request_id
        self.mode = mode
        self._mode_name = mode.name
        self._table = table_for(mode)
        self._log = log
        self.state: str = State.RECEIVED
        self.seq = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def can(self, trigger: str) -> bool:
        """Whether ``trigger`` is an edge from the current state."""
        return (self.state, trigger) in self._table

    def fire(
        self,
        trigger: str,
        *,
        worker_id: int | None = None,
        decision: Any = None,
        detail: str | None = None,
    ) -> str:
        """Take the ``trigger`` edge, record it, and return the new state.

        Raises:
            IllegalTransition: the mode has no such edge from the current state.
        """
        src = self.state
        dst = self._table.get((src, trigger))
        if dst is None:
            raise IllegalTransition(
                f"request {self.request_id!r} in mode {self._mode_name!r} cannot {trigger!r} "
                f"from {src!r}; the edges from {src!r} are: "
                + (", ".join(t for (s, t) in self._table if s == src) or "none (terminal)"),
                request_id=self.request_id,
                state=src,
                trigger=trigger,
            )
        log = self._log
        t, wall = log.now()
        log.emit(
            TransitionRecord(
                self.request_id,
                self.seq,
                self._mode_name,
                t,
                wall,
                src,
                dst,
                trigger,
                worker_id,
                decision,
                detail,
            )
        )
        self.seq += 1
        self.state = dst
        return dst
