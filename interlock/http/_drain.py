"""`Drain`: stopping an HTTP frontend gracefully.

A drain has three steps. `start`: ``/health`` answers 503 ``draining`` (a load balancer stops
sending), and a new generation request is answered 503 with ``Connection: close`` (the client
goes elsewhere); requests already in flight carry on. Then, when `run`'s grace period ends
before they all finished, `cut`: each request still open is cancelled (its worker stops) and
ends with an error, an SSE ``error`` event on a stream, a 503 otherwise. Finally
`wait_drained` returns, and the server closes its listener and its idle connections
(``serve_http``'s ``shutdown_trigger``). docs/operations.md ("Draining") describes it for users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from ._errors import SERVER_ERROR, HttpError

if TYPE_CHECKING:
    from ._metrics import HttpMetrics

#: How long requests that were cut get to send their error before the server stops anyway.
CUT_GRACE = 2.0


class DrainTicket:
    """One request in flight, as `Drain.enter` counted it."""

    __slots__ = ("cut", "scope")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        #: The drain's grace period ended before the request did: its scope was cancelled,
        #: and the request must end with an error saying so.
        self.cut = False

    def attach(self, scope: trio.CancelScope) -> None:
        """The scope `Drain.cut` cancels: the one the request's work runs in (cancelled at
        once when the request was cut already)."""
        self.scope = scope
        if self.cut:
            scope.cancel()


class Drain:
    """A frontend's drain: whether it is draining, what is in flight, and how it ended.

    `build_app` makes one per app (``app.state.drain``); the endpoints count their requests
    (`enter`, `leave`) and consult `draining`. ``interlock serve`` calls `run` on SIGTERM and passes
    `wait_drained` as ``serve_http``'s ``shutdown_trigger``; an embedding application can do
    the same. Never blocks except in `run`, `wait_idle` and `wait_drained`.
    """

    def __init__(self, metrics: HttpMetrics | None = None) -> None:
        self._metrics = metrics
        #: `start` was called: ``/health`` says so and new requests are refused.
        self.draining = False
        #: The grace period ended (or `cut` was called): every request still open was cut.
        self.cutting = False
        #: Requests in flight when the drain started, or accepted since, that ended by
        #: themselves while draining.
        self.finished = 0
        #: Requests the end of the grace period ended with an error.
        self.cut_requests = 0
        #: New requests answered 503 while draining.
        self.refused = 0
        self._open: set[DrainTicket] = set()
        self._idle = trio.Event()
        self._drained = trio.Event()

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return len(self._open)

    def enter(self) -> DrainTicket:
        """Count a request in flight until `leave`; `DrainTicket.attach` names what `cut`
        cancels. Once the grace period is over, the ticket is cut at once."""
        ticket = DrainTicket()
        self._open.add(ticket)
        if self._idle.is_set():
            # A request that arrived before the drain started and finished reading its body
            # after: the drain waits for it too.
            self._idle = trio.Event()
        if self.cutting:
            self._cut_one(ticket)
        return ticket

    def leave(self, ticket: DrainTicket) -> None:
        """The request of ``ticket`` ended (however: call it in a ``finally``)."""
        self._open.discard(ticket)
        if self.draining and not ticket.cut:
            self.finished += 1
        if self.draining and not self._open:
            self._idle.set()

    def start(self) -> None:
        """Begin draining (again: nothing): ``/health`` turns 503 and new requests are
        refused; requests in flight carry on."""
        if self.draining:
            return
        self.draining = True
        if self._metrics is not None:
            self._metrics.draining = True
        if not self._open:
            self._idle.set()

    def cut(self) -> None:
        """End the grace period now: every request in flight (and any that starts later) is
        cancelled and ends with an error. Starts the drain if it had not started."""
        self.start()
        self.cutting = True
        for ticket in list(self._open):
            self._cut_one(ticket)

    def _cut_one(self, ticket: DrainTicket) -> None:
        if not ticket.cut:
            ticket.cut = True
            self.cut_requests += 1
            if ticket.scope is not None:
                ticket.scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until draining and no request is in flight."""
        while not self.draining or self._open:
            await self._idle.wait()

    async def run(self, grace_period: float) -> None:
        """Drain: `start`, wait up to ``grace_period`` seconds for the requests in flight to end,
        `cut` the rest and give them `CUT_GRACE` seconds to send their errors. Then
        `wait_drained` returns. ``grace_period=0`` cuts at once. Waits for all that."""
        self.start()
        with trio.move_on_after(grace_period):
            await self.wait_idle()
        if self._open:
            self.cut()
            with trio.move_on_after(CUT_GRACE):
                await self.wait_idle()
        self._drained.set()

    async def wait_drained(self) -> None:
        """Wait until `run` has finished: nothing is left in flight (or what was cut had its
        chance to say so). ``serve_http``'s ``shutdown_trigger``."""
        await self._drained.wait()

    def summary(self) -> str:
        """One line for the log: what the drain finished, cut and refused."""
        return (
            f"{self.finished} request(s) finished, {self.cut_requests} cut at the end of the "
            f"grace period, {self.refused} new one(s) refused while draining"
        )


def refused_while_draining() -> HttpError:
    """The 503 a new request gets while the server drains."""
    return HttpError(
        503,
        "this server is shutting down (draining) and takes no new requests; send the request "
        "to another replica",
        type=SERVER_ERROR,
        code="shutting_down",
    )


def cut_by_drain() -> HttpError:
    """The 503 (or SSE error event) of a request the end of the drain's grace period cut."""
    return HttpError(
        503,
        "the server shut down before this request finished (its drain grace period, "
        "--drain-timeout, ended); retry the request",
        type=SERVER_ERROR,
        code="shutting_down",
    )


#: Sent with every 503 of a draining server: the client's next request opens a connection,
#: which a load balancer sends to another replica.
CONNECTION_CLOSE: Final = (b"connection", b"close")
