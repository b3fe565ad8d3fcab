"""The actor runtime: a mailbox, ``send_nowait`` / ``ask``, and the loop that runs an actor.

An actor is a trio task that owns private state and handles one message at a time from its
mailbox. Others hold an `ActorRef`. The mailbox belongs to the supervisor, not to the actor, so
messages sent while an actor restarts wait for the new incarnation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Generic, TypeVar

import attrs
import outcome
import trio

from .._errors import ActorCrashed, InterlockError, PipelineClosed

R = TypeVar("R")


class _Reply:
    """A one-shot reply slot: the asker parks on it, the actor fills it once."""

    __slots__ = ("_outcome", "_task")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome[Any] | None = None

    def set(self, result: outcome.Outcome[Any]) -> None:
        if self._outcome is not None:
            return
        self._outcome = result
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> Any:
        if self._outcome is not None:
            await trio.lowlevel.checkpoint()
            return self._outcome.unwrap()
        self._task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


@attrs.frozen
class Forward:
    """Returned by a handler: pass ``message`` on to ``target``, which answers the original
    asker directly (the forwarding actor does not wait for it)."""

    target: ActorRef[Any]
    message: Any


@attrs.frozen
class InjectedCrash:
    """A message that makes the receiving actor crash with ``error`` (fault injection)."""

    error: Exception


class ActorRef(Generic[R]):
    """A handle for talking to one actor. Cheap to copy and share between tasks."""

    __slots__ = ("_send", "name")

    def __init__(self, name: str, send: trio.MemorySendChannel[tuple[Any, _Reply | None]]):
        self.name = name
        self._send = send

    def send_nowait(self, message: Any) -> None:
        """Deliver ``message`` without waiting for it to be handled (fire and forget).

        Never blocks: mailboxes are unbounded. A message to a stopped actor is dropped, since
        nobody is left to act on it.
        """
        try:
            self._send.send_nowait((message, None))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def ask(self, message: Any) -> Any:
        """Deliver ``message`` and wait for the actor's reply.

        Raises:
            InterlockError: whatever the actor's handler raised on purpose for this message.
            ActorCrashed: the actor crashed while handling it (``__cause__`` is the error).
            PipelineClosed: the actor has stopped, or stopped before answering.
        """
        reply = _Reply()
        try:
            self._send.send_nowait((message, reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PipelineClosed(f"the {self.name} actor has stopped") from None
        return await reply.wait()

    def crash_nowait(self, error: Exception | None = None) -> None:
        """Make the actor crash when it reaches this message (for fault-injection tests)."""
        self.send_nowait(InjectedCrash(error or RuntimeError(f"injected crash of {self.name}")))

    def __repr__(self) -> str:
        return f"<ActorRef {self.name}>"


class Actor:
    """Base class of actors. Subclasses implement `handle`, and `on_start` when some state must
    be rebuilt from elsewhere after a restart.

    `handle` returns the reply to an ``ask`` (ignored for ``send_nowait``). Raising an
    `InterlockError` answers the asker with that error and the actor carries on; any other
    exception is a crash: the supervisor restarts the actor with fresh state.
    """

    name: ClassVar[str] = "actor"
    #: Set by the runtime before `on_start`.
    ref: ActorRef[Any]

    async def on_start(self) -> None:
        """Rebuild state before the first message (and after every restart)."""

    def on_stop(self) -> None:
        """Release what `on_start` acquired; runs however the actor ends (crash included)."""

    async def handle(self, message: Any) -> Any:
        raise NotImplementedError


def open_mailbox(name: str) -> tuple[ActorRef[Any], trio.MemoryReceiveChannel[Any]]:
    """A new unbounded mailbox and the ref that sends into it."""
    send, receive = trio.open_memory_channel[tuple[Any, _Reply | None]](math.inf)
    return ActorRef(name, send), receive


async def run_actor(actor: Actor, mailbox: trio.MemoryReceiveChannel[Any]) -> None:
    """Run ``actor`` on ``mailbox`` until the mailbox closes (returns) or it crashes (raises)."""
    try:
        await actor.on_start()
        await _handle_messages(actor, mailbox)
    finally:
        actor.on_stop()


async def _handle_messages(actor: Actor, mailbox: trio.MemoryReceiveChannel[Any]) -> None:
    while True:
        # Take what is already queued without a context switch per message, but yield after
        # a bounded batch so a busy actor cannot starve the tasks it serves.
        for _ in range(_BATCH):
            try:
                message, reply = mailbox.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                return
            await _handle_one(actor, message, reply)
        try:
            message, reply = await mailbox.receive()
        except trio.EndOfChannel:
            return
        await _handle_one(actor, message, reply)


_BATCH = 32


async def _handle_one(actor: Actor, message: Any, reply: _Reply | None) -> None:
    if type(message) is InjectedCrash:
        if reply is not None:
            reply.set(outcome.Error(_crashed(actor, message.error)))
        raise message.error
    try:
        result = await actor.handle(message)
    except InterlockError as exc:
        if reply is not None:
            reply.set(outcome.Error(exc))
    except Exception as exc:
        if reply is not None:
            reply.set(outcome.Error(_crashed(actor, exc)))
        raise
    except BaseException:
        # Cancelled mid-handler (the pipeline is closing): the message has left the mailbox,
        # so nothing else would ever answer this asker.
        if reply is not None:
            reply.set(outcome.Error(PipelineClosed(f"the {actor.name} actor stopped")))
        raise
    else:
        if type(result) is Forward:
            try:
                result.target._send.send_nowait((result.message, reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if reply is not None:
                    error = PipelineClosed(f"the {result.target.name} actor has stopped")
                    reply.set(outcome.Error(error))
        elif reply is not None:
            reply.set(outcome.Value(result))


def _crashed(actor: Actor, cause: Exception) -> ActorCrashed:
    error = ActorCrashed(f"the {actor.name} actor crashed handling this message: {cause!r}")
    error.__cause__ = cause
    return error


def fail_pending(mailbox: trio.MemoryReceiveChannel[Any], name: str) -> None:
    """Answer every message still queued with `PipelineClosed` (the actor is gone for good)."""
    while True:
        try:
            _message, reply = mailbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        if reply is not None:
            reply.set(outcome.Error(PipelineClosed(f"the {name} actor stopped before answering")))
