"""Actors under a supervisor: replies, errors on purpose versus crashes, restarts with fresh
state and back-off, giving up with the original error, forwarding, and shutdown."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from interlock import ActorCrashed, InterlockError, PipelineClosed, RequestError
from interlock.actors import Actor, ActorRef, Forward, RestartPolicy, Supervisor

#: A virtual-time limit on every test: a reply that never comes fails the test instead of
#: hanging it (under autojump_clock, the clock jumps straight to the deadline).
DEADLINE = 10_000.0


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(DEADLINE):
            await test(*args, **kwargs)

    return run


class Boom(Exception):
    """A bug inside an actor (not an InterlockError)."""


@attrs.define
class Lifecycle:
    """What the incarnations of one actor did, shared across restarts."""

    starts: list[float] = attrs.Factory(list)
    stops: int = 0
    incarnations: int = 0


class Counter(Actor):
    """Counts the messages it handled since it (re)started; crashes or refuses on request."""

    name = "counter"

    def __init__(self, lifecycle: Lifecycle, gate: trio.Event | None = None) -> None:
        lifecycle.incarnations += 1
        self.lifecycle = lifecycle
        self.incarnation = lifecycle.incarnations
        self.gate = gate
        self.handled = 0
        self.started = False

    async def on_start(self) -> None:
        self.started = True
        self.lifecycle.starts.append(trio.current_time())

    def on_stop(self) -> None:
        self.lifecycle.stops += 1

    async def handle(self, message: Any) -> Any:
        assert self.started
        self.handled += 1
        if message == "boom":
            raise Boom(f"boom in incarnation {self.incarnation}")
        if message == "refuse":
            raise RequestError("refused on purpose", field="message")
        if message == "wait":
            assert self.gate is not None
            await self.gate.wait()
        if isinstance(message, Exception):
            raise message
        return (self.incarnation, self.handled, message)


def start_counter(
    supervisor: Supervisor, gate: trio.Event | None = None
) -> tuple[ActorRef[Any], Lifecycle]:
    lifecycle = Lifecycle()
    return supervisor.start_actor(lambda: Counter(lifecycle, gate), "counter"), lifecycle


class Results:
    """Outcomes of asks made from background tasks, by key."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    async def ask(self, ref: ActorRef[Any], key: str, message: Any) -> None:
        try:
            self.values[key] = await ref.ask(message)
        except InterlockError as exc:
            self.errors[key] = exc


# --- Replies and errors -----------------------------------------------------------------------


@bounded
async def test_ask_returns_the_handler_value(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        assert await ref.ask("a") == (1, 1, "a")
        assert await ref.ask("b") == (1, 2, "b")
        assert lifecycle.incarnations == 1
        assert ref.name == "counter"
        nursery.cancel_scope.cancel()


@bounded
async def test_send_nowait_is_handled_in_order_without_a_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, _ = start_counter(supervisor)
        ref.send_nowait("x")
        ref.send_nowait("y")
        assert await ref.ask("z") == (1, 3, "z")
        nursery.cancel_scope.cancel()


@bounded
async def test_an_interlock_error_reaches_the_asker_and_the_actor_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        with pytest.raises(RequestError, match="refused on purpose") as info:
            await ref.ask("refuse")
        assert info.value.field == "message"
        # Same incarnation, state kept: this is its second message.
        assert await ref.ask("after") == (1, 2, "after")
        assert lifecycle.incarnations == 1
        assert supervisor.events == []
        nursery.cancel_scope.cancel()


# --- Crashes and restarts ---------------------------------------------------------------------


@bounded
async def test_a_crash_reaches_the_asker_as_actor_crashed_with_the_cause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, _ = start_counter(supervisor)
        with pytest.raises(ActorCrashed) as info:
            await ref.ask("boom")
        assert isinstance(info.value.__cause__, Boom)
        assert "boom in incarnation 1" in str(info.value.__cause__)
        assert "counter" in str(info.value)
        nursery.cancel_scope.cancel()


@bounded
async def test_a_crashed_actor_restarts_with_fresh_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        assert await ref.ask("a") == (1, 1, "a")
        with pytest.raises(ActorCrashed):
            await ref.ask("boom")
        # A new incarnation, counting from zero again.
        assert await ref.ask("b") == (2, 1, "b")
        assert lifecycle.incarnations == 2
        assert len(lifecycle.starts) == 2  # on_start ran again
        assert lifecycle.stops == 1  # on_stop ran for the crashed one
        assert supervisor.restarts("counter") == 1
        [event] = supervisor.events
        assert event.actor == "counter"
        assert isinstance(event.error, Boom)
        assert event.restarts_in_window == 1
        assert not event.gave_up
        nursery.cancel_scope.cancel()
    assert lifecycle.stops == 2  # and for the last one, when it was cancelled


@bounded
async def test_messages_queued_behind_a_crash_survive_the_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    results = Results()
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor, gate)
        async with trio.open_nursery() as askers:
            # Hold the actor in a handler so that the mailbox fills up in a known order.
            askers.start_soon(results.ask, ref, "wait", "wait")
            await trio.testing.wait_all_tasks_blocked()
            askers.start_soon(results.ask, ref, "boom", "boom")
            await trio.testing.wait_all_tasks_blocked()
            askers.start_soon(results.ask, ref, "first", "first")
            await trio.testing.wait_all_tasks_blocked()
            ref.send_nowait("fire-and-forget")
            askers.start_soon(results.ask, ref, "second", "second")
            await trio.testing.wait_all_tasks_blocked()
            assert lifecycle.incarnations == 1
            gate.set()
        assert results.values == {
            "wait": (1, 1, "wait"),
            "first": (2, 1, "first"),
            "second": (2, 3, "second"),
        }
        assert isinstance(results.errors.pop("boom"), ActorCrashed)
        assert results.errors == {}
        assert lifecycle.incarnations == 2
        nursery.cancel_scope.cancel()


@bounded
async def test_a_crash_without_an_asker_restarts_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        ref.send_nowait("boom")
        assert await ref.ask("after") == (2, 1, "after")
        assert lifecycle.stops == 1
        nursery.cancel_scope.cancel()


@bounded
async def test_crash_nowait_injects_a_crash_that_restarts_the_actor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        assert await ref.ask("a") == (1, 1, "a")
        error = KeyError("injected")
        ref.crash_nowait(error)
        assert await ref.ask("b") == (2, 1, "b")
        [event] = supervisor.events
        assert event.error is error
        ref.crash_nowait()  # a default error
        assert await ref.ask("c") == (3, 1, "c")
        assert isinstance(supervisor.events[-1].error, RuntimeError)
        assert "counter" in str(supervisor.events[-1].error)
        assert lifecycle.stops == 2
        nursery.cancel_scope.cancel()


@bounded
async def test_back_off_doubles_with_each_restart_in_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=10, window=1000.0, backoff=1.0, max_backoff=6.0)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, policy)
        ref, lifecycle = start_counter(supervisor)
        for _ in range(5):
            ref.send_nowait("boom")  # each incarnation crashes on its first message
        assert await ref.ask("alive") == (6, 1, "alive")
        t0 = lifecycle.starts[0]
        gaps = [b - a for a, b in zip(lifecycle.starts, lifecycle.starts[1:], strict=False)]
        assert gaps == pytest.approx([1.0, 2.0, 4.0, 6.0, 6.0])  # capped at max_backoff
        assert [e.time - t0 for e in supervisor.events] == pytest.approx([0, 1, 3, 7, 13])
        assert [e.restarts_in_window for e in supervisor.events] == [1, 2, 3, 4, 5]
        assert supervisor.restarts("counter") == 5
        nursery.cancel_scope.cancel()


@bounded
async def test_too_many_crashes_in_the_window_give_up_with_the_original_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=2, window=100.0, backoff=0.5)
    errors = [Boom(f"crash {i}") for i in range(3)]
    results = Results()
    supervisor: Supervisor | None = None
    lifecycle: Lifecycle | None = None
    with pytest.RaisesGroup(pytest.RaisesExc(Boom, check=lambda e: e is errors[2])):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, policy)
            ref, lifecycle = start_counter(supervisor)
            for error in errors:
                ref.crash_nowait(error)
            async with trio.open_nursery() as askers:
                askers.start_soon(results.ask, ref, "late", "late")
    assert supervisor is not None and lifecycle is not None
    assert [e.gave_up for e in supervisor.events] == [False, False, True]
    assert [e.error for e in supervisor.events] == errors
    assert supervisor.restarts("counter") == 2
    assert lifecycle.incarnations == 3
    assert lifecycle.stops == 3
    # The ask queued behind the fatal crash was answered, not left hanging.
    assert isinstance(results.errors["late"], PipelineClosed)


@bounded
async def test_a_replacement_that_fails_to_start_counts_as_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=5, window=1000.0, backoff=1.0, max_backoff=10.0)
    lifecycle = Lifecycle()
    refusals = [Boom("cannot start 1"), Boom("cannot start 2")]

    def factory() -> Counter:
        if lifecycle.incarnations and refusals:
            raise refusals.pop(0)
        return Counter(lifecycle)

    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, policy)
        ref = supervisor.start_actor(factory, "counter")
        ref.send_nowait("boom")
        assert await ref.ask("alive") == (2, 1, "alive")
        assert [str(e.error) for e in supervisor.events] == [
            "boom in incarnation 1",
            "cannot start 1",
            "cannot start 2",
        ]
        # Each failed start waited out its back-off, as a crash does: 1 s, then 2, then 4.
        t0 = supervisor.events[0].time
        assert lifecycle.starts[1] - t0 == pytest.approx(1.0 + 2.0 + 4.0)
        nursery.cancel_scope.cancel()


@bounded
async def test_a_replacement_that_keeps_failing_gives_up_with_its_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=2, window=1000.0, backoff=0.5)
    made = 0
    broken = Boom("cannot start")

    def factory() -> Counter:
        nonlocal made
        made += 1
        if made > 1:
            raise broken
        return Counter(Lifecycle())

    with pytest.RaisesGroup(pytest.RaisesExc(Boom, check=lambda e: e is broken)):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, policy)
            supervisor.start_actor(factory, "counter").send_nowait("boom")
    assert made == 3  # the first actor, then two failed replacements: the second is too many


@bounded
async def test_a_first_start_that_fails_escalates_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def factory() -> Counter:
        raise Boom("bad setup")

    with pytest.RaisesGroup(pytest.RaisesExc(Boom, match="bad setup")):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, RestartPolicy())
            supervisor.start_actor(factory, "counter")
    assert supervisor.events == []


@bounded
async def test_crashes_spread_beyond_the_window_never_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=1, window=5.0, backoff=0.5)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, policy)
        ref, lifecycle = start_counter(supervisor)
        for crash in range(4):
            with pytest.raises(ActorCrashed):
                await ref.ask("boom")
            await trio.sleep(10.0)  # virtual time: past the window
            assert await ref.ask("ok") == (crash + 2, 1, "ok")
        assert supervisor.restarts("counter") == 4
        assert not any(e.gave_up for e in supervisor.events)
        assert [e.restarts_in_window for e in supervisor.events] == [1, 1, 1, 1]
        assert lifecycle.incarnations == 5
        nursery.cancel_scope.cancel()


@bounded
async def test_a_second_crash_inside_the_window_gives_up_when_one_restart_is_allowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(max_restarts=1, window=5.0, backoff=0.5)
    with pytest.RaisesGroup(Boom):
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, policy)
            ref, _ = start_counter(supervisor)
            with pytest.raises(ActorCrashed):
                await ref.ask("boom")
            await trio.sleep(1.0)  # inside the window
            with pytest.raises(ActorCrashed):
                await ref.ask("boom")
            await trio.sleep_forever()


@bounded
async def test_one_actor_crashing_does_not_restart_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        first, first_life = start_counter(supervisor)
        second_life = Lifecycle()
        second = supervisor.start_actor(lambda: Counter(second_life), "other")
        assert await second.ask("x") == (1, 1, "x")
        with pytest.raises(ActorCrashed):
            await first.ask("boom")
        assert await second.ask("y") == (1, 2, "y")
        assert await first.ask("z") == (2, 1, "z")
        assert first_life.incarnations == 2
        assert second_life.incarnations == 1
        assert supervisor.restarts("other") == 0
        nursery.cancel_scope.cancel()


# --- Forwarding -------------------------------------------------------------------------------


@attrs.frozen
class Via:
    target: ActorRef[Any]
    message: Any


class Forwarder(Actor):
    name = "forwarder"

    def __init__(self) -> None:
        self.forwarded = 0

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Via):
            self.forwarded += 1
            return Forward(message.target, message.message)
        return ("forwarder", self.forwarded, message)


@bounded
async def test_forward_makes_the_target_answer_the_original_asker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        target, _ = start_counter(supervisor)
        forwarder = supervisor.start_actor(Forwarder)
        assert forwarder.name == "forwarder"
        assert await forwarder.ask(Via(target, "hello")) == (1, 1, "hello")
        with pytest.raises(RequestError):
            await forwarder.ask(Via(target, "refuse"))
        with pytest.raises(ActorCrashed):
            await forwarder.ask(Via(target, "boom"))
        assert await forwarder.ask("own") == ("forwarder", 3, "own")
        forwarder.send_nowait(Via(target, "no reply wanted"))
        assert await forwarder.ask("own") == ("forwarder", 4, "own")  # it has forwarded it
        assert await target.ask("next") == (2, 2, "next")
        nursery.cancel_scope.cancel()


@bounded
async def test_forward_to_a_stopped_actor_answers_pipeline_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as outer:
        supervisor = Supervisor(outer, RestartPolicy())
        forwarder = supervisor.start_actor(Forwarder)
        async with trio.open_nursery() as inner:
            target, _ = start_counter(Supervisor(inner, RestartPolicy()))
            inner.cancel_scope.cancel()
        with pytest.raises(PipelineClosed, match="counter"):
            await forwarder.ask(Via(target, "hello"))
        outer.cancel_scope.cancel()


# --- Shutdown ---------------------------------------------------------------------------------


@bounded
async def test_asking_a_stopped_actor_raises_pipeline_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, RestartPolicy())
        ref, lifecycle = start_counter(supervisor)
        assert await ref.ask("a") == (1, 1, "a")
        nursery.cancel_scope.cancel()
    assert lifecycle.stops == 1
    with pytest.raises(PipelineClosed, match="counter"):
        await ref.ask("b")
    ref.send_nowait("dropped")  # never raises
    ref.crash_nowait()


@bounded
async def test_cancelling_the_supervisor_answers_queued_asks_with_pipeline_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()  # never set: "wait" is still being handled when the cancel comes
    results = Results()
    async with trio.open_nursery() as askers, trio.open_nursery() as supervised:
        ref, _ = start_counter(Supervisor(supervised, RestartPolicy()), gate)
        askers.start_soon(results.ask, ref, "wait", "wait")
        await trio.testing.wait_all_tasks_blocked()
        askers.start_soon(results.ask, ref, "queued-1", "queued-1")
        askers.start_soon(results.ask, ref, "queued-2", "queued-2")
        await trio.testing.wait_all_tasks_blocked()
        supervised.cancel_scope.cancel()
        # Leaving `askers` waits until every asker has been answered.
    assert isinstance(results.errors.get("queued-1"), PipelineClosed)
    assert isinstance(results.errors.get("queued-2"), PipelineClosed)


@bounded
async def test_cancelling_the_supervisor_answers_the_ask_being_handled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()  # never set: the handler is still waiting when the cancel comes
    results = Results()
    async with trio.open_nursery() as askers, trio.open_nursery() as supervised:
        ref, _ = start_counter(Supervisor(supervised, RestartPolicy()), gate)
        askers.start_soon(results.ask, ref, "in-flight", "wait")
        await trio.testing.wait_all_tasks_blocked()
        supervised.cancel_scope.cancel()
    # Leaving `askers` waited until the asker was answered (a hang hits the DEADLINE).
    assert isinstance(results.errors.get("in-flight"), PipelineClosed)
