"""``interlock serve --processes N``: N frontend processes on one listening socket, and the
process that supervises them (docs/operations.md, "Several frontend processes").

The supervisor binds the socket once and starts N children, each ``interlock serve`` with the
same arguments plus ``--process-child SPEC``; each child accepts on the inherited socket (the
kernel hands every connection to one of the processes blocked in ``accept``), builds its own
pipeline and router, and connects to the workers by itself, as several frontends do through
etcd. A child that dies is started again with back-off; SIGTERM or SIGINT is forwarded to every
child, which drains (``--drain-timeout``); the supervisor exits once all have exited. Children
drain and exit when the supervisor dies: each watches a pipe only the supervisor holds open
(``PR_SET_PDEATHSIG`` cannot do it: trio starts processes from a worker thread, and the signal
follows that thread's exit, not the process's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import trio

from .._errors import ConfigError

#: The response header naming the process (0..N-1) that answered, with ``--processes`` above 1.
PROCESS_HEADER: Final = b"x-interlock-process"

#: The internal flag a child is started with (not in ``--help``).
CHILD_FLAG: Final = "--process-child"

#: Back-off before starting a dead child again: doubles from the first to the last while
#: children keep dying within `_STEADY` seconds of their start.
_FIRST_DELAY: Final = 0.5
_LAST_DELAY: Final = 30.0
_STEADY: Final = 10.0


@attrs.frozen
class ChildSpec:
    """What a child process is told by its supervisor: its index among ``processes``, the
    supervisor's pid, the inherited listening socket's fd, the fd to report readiness on, the
    read end of the supervisor's lifeline (end of file: the supervisor is gone), and where the
    KV-event relay publishes (None: no ``--kv-events-bind``)."""

    index: int
    processes: int
    parent_pid: int
    listen_fd: int
    ready_fd: int
    lifeline_fd: int
    kv_relay: str | None = None

    def encode(self) -> str:
        """The flag's value."""
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> ChildSpec:
        """Read `encode`'s text.

        Raises:
            ConfigError: not a spec (the flag is internal: only the supervisor passes it).
        """
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{CHILD_FLAG} {text!r} is not a process spec ({exc}); this flag is internal to "
                "interlock serve --processes: run without it"
            ) from None


def child_seed(seed: int, index: int) -> int:
    """The ``router_seed`` of the child process ``index`` of a frontend seeded ``seed``:
    the two mixed by a hash, so each child draws its own sequence (its router's random
    picks, its ``[[model_rewrites]]`` draws). With the one seed every child would make the
    same draws: the first requests each child takes would all go to the same worker and the
    same target, a short burst spread over N children no better split than one request.
    The same ``seed`` gives the same children's seeds, so a run stays repeatable. Pure."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def share_of(limit: int | None, processes: int) -> int | None:
    """One process's share of a limit meant for all ``processes`` together, rounded up (a
    limit of 0 or None means none, and stays so)."""
    if not limit:
        return limit
    return max(1, math.ceil(limit / processes))


async def signal_when_supervisor_exits(spec: ChildSpec, command: str) -> None:
    """Wait until the supervisor has exited (its lifeline pipe reads end of file), then send
    this process SIGTERM, so that it drains as it would on the supervisor's SIGTERM."""
    async with trio.lowlevel.FdStream(os.dup(spec.lifeline_fd)) as lifeline:
        while await lifeline.receive_some(1):
            pass
    print(
        f"interlock {command}: process {spec.index}: the supervisor (pid {spec.parent_pid}) "
        "is gone",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def with_process_header(app: Any, index: int) -> Any:
    """``app`` answering every HTTP response with ``x-interlock-process: INDEX``."""
    value = str(index).encode()

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (PROCESS_HEADER, value)]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_header)

    return answer


def describe_exit(code: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@attrs.define
class _Child:
    index: int
    process: trio.Process | None = None
    #: What the child reported once listening (its ``url``, ``banner`` ...).
    ready: dict[str, Any] | None = None
    started_at: float = 0.0
    delay: float = _FIRST_DELAY


@attrs.define(eq=False)
class Supervisor:
    """Runs ``processes`` children of ``argv`` on ``listener`` (see the module's docstring).

    ``argv`` is the command line a child runs, to which `CHILD_FLAG` and its spec are
    appended; ``kv_relay`` is where the KV-event relay publishes (None: no relay);
    ``command`` names the command in messages (``serve``).
    """

    argv: Sequence[str]
    processes: int
    listener: socket.socket
    command: str
    kv_relay: str | None = None
    children: list[_Child] = attrs.field(init=False)
    _stopping: trio.Event = attrs.field(init=False, factory=trio.Event)
    #: The lifeline: the children inherit the read end; only this process holds the write
    #: end (not inheritable), so they read end of file once it has exited, however it died.
    _lifeline: tuple[int, int] = attrs.field(init=False, factory=os.pipe)

    def __attrs_post_init__(self) -> None:
        self.children = [_Child(i) for i in range(self.processes)]

    def _log(self, text: str) -> None:
        print(f"interlock {self.command}: {text}", file=sys.stderr, flush=True)

    async def run(self, *, describe: Callable[[list[dict[str, Any]]], str] | None = None) -> int:
        """Start the children, print ``describe(reports)`` (each child's report once
        listening) when all listen, keep them running until SIGTERM or SIGINT, forward it
        (and a second one) to them, and wait for all to exit. Blocks until then.

        Returns 0 when every child exited with 0; a child's status when one could not start
        (the others are stopped: it printed why); else 1.
        """
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_signals, signals)
                failed: list[int] = []
                async with trio.open_nursery() as starting:
                    for child in self.children:
                        starting.start_soon(self._start_first, child, failed)
                if not failed and not self._stopping.is_set() and describe is not None:
                    reports = [c.ready for c in self.children if c.ready is not None]
                    print(describe(reports), flush=True)
                async with trio.open_nursery() as running:
                    for child in self.children:
                        running.start_soon(self._keep_running, child)
                nursery.cancel_scope.cancel()
        codes = [c.process.returncode for c in self.children if c.process is not None]
        if failed:
            return failed[0]
        return 0 if all(code == 0 for code in codes) else 1

    async def _start(self, child: _Child) -> bool:
        """Start ``child``'s process; return once it listens (True) or has exited (False)."""
        if self._stopping.is_set():
            return False
        read_fd, write_fd = os.pipe()
        spec = ChildSpec(
            child.index,
            self.processes,
            os.getpid(),
            self.listener.fileno(),
            write_fd,
            self._lifeline[0],
            self.kv_relay,
        )
        try:
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (a second signal would stop a child at once, not drain it).
            child.process = await trio.lowlevel.open_process(
                [*self.argv, CHILD_FLAG, spec.encode()],
                pass_fds=(self.listener.fileno(), write_fd, self._lifeline[0]),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        if self._stopping.is_set():  # a signal came while the process was being started
            child.process.send_signal(signal.SIGTERM)
        child.started_at = trio.current_time()
        child.ready = None
        received = b""
        async with trio.lowlevel.FdStream(read_fd) as pipe:
            while chunk := await pipe.receive_some(65536):
                received += chunk
        try:
            child.ready = json.loads(received)
        except ValueError:  # nothing (it exited before listening), or cut short by its death
            return False
        return True

    async def _start_first(self, child: _Child, failed: list[int]) -> None:
        if await self._start(child) or child.process is None:
            return
        code = await child.process.wait()
        if self._stopping.is_set():
            return  # stopped by a signal while starting
        failed.append(code if code > 0 else 1)
        self._stop(signal.SIGTERM)

    async def _keep_running(self, child: _Child) -> None:
        """Wait for ``child`` to exit; start it again (with back-off, logged) until
        stopping."""
        while child.process is not None:
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            if trio.current_time() - child.started_at >= _STEADY:
                child.delay = _FIRST_DELAY
            delay = child.delay
            child.delay = min(child.delay * 2, _LAST_DELAY)
            self._log(
                f"process {child.index} (pid {child.process.pid}) {describe_exit(code)}; "
                f"starting it again in {delay:g}s"
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            if await self._start(child):
                self._log(f"process {child.index} serving again (pid {child.process.pid})")

    async def _forward_signals(self, signals: Any) -> None:
        async for number in signals:
            self._stop(number)

    def _stop(self, number: int) -> None:
        """Forward signal ``number`` to every running child; the first call also stops
        restarts and closes the supervisor's copy of the socket (the children's copies keep
        it open until they have drained)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.listener.close()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(number)
