"""Fairness in the admission queue: within a priority, the flows (GAIE's
``x-gateway-inference-fairness-id``, ``default-flow`` when unset) take turns, oldest first
within a flow, so one flow's burst cannot starve another.

The bound checked: while a request waits, with k requests of its own flow served before it,
every other flow of its priority is served at most k + 1 times before it, however many
requests that flow queued, and whoever gave up waiting meanwhile. Checked on the queue itself
over random joins, services and cancellations, and on a pipeline whose one worker takes one
request at a time (some requests giving up), in virtual time (k + 2 there: a request tries a
worker once before it joins the queue).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import pytest
import trio
from helpers import prompt, run_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock import Components, PipelineConfig, build_pipeline
from interlock._admission import DEFAULT_FLOW, AdmissionQueue
from interlock.engines.mock import MockEngine
from interlock.wire import PreprocessedRequest, RoutingHints

FLOWS = ("a", "b", "c", "d")


class _Sim:
    """An `AdmissionQueue` driven step by step, checking the bound at every service."""

    def __init__(self) -> None:
        self.queue = AdmissionQueue()
        self.live: dict[str, Any] = {}
        self.joined: dict[str, tuple[str, int]] = {}
        #: Per waiting request: how many times each flow of its priority was served since
        #: it joined (its own flow included).
        self.seen: dict[str, Counter[str]] = {}
        self.served: list[str] = []

    def join(self, name: str, flow: str, priority: int = 0) -> None:
        self.live[name] = self.queue.join(priority, limit=1_000_000, flow=flow)
        self.joined[name] = (flow, priority)
        self.seen[name] = Counter()

    def head(self) -> str:
        return next(n for n, t in self.live.items() if self.queue.is_next(t))

    def serve(self) -> str:
        name = self.head()
        self.queue.leave(self.live.pop(name), served=True)
        flow, priority = self.joined[name]
        counts = self.seen.pop(name)
        own = counts.pop(flow, 0)
        for other, times in counts.items():
            assert times <= own + 1, (
                f"{name} (flow {flow}, {own} of its flow served before it) waited while flow "
                f"{other} was served {times} times: {self.served}"
            )
        for waiting, seen in self.seen.items():
            if self.joined[waiting][1] == priority:
                seen[flow] += 1
        self.served.append(name)
        return name

    def cancel(self, name: str) -> None:
        self.queue.leave(self.live.pop(name))
        del self.seen[name]

    def drain(self) -> None:
        while self.live:
            self.serve()
        assert len(self.queue) == 0
        assert self.queue._levels == {}  # nothing is remembered once nobody waits


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("join"), st.sampled_from(FLOWS), st.sampled_from((0, 0, 0, 1))),
            st.tuples(st.just("serve"), st.just(""), st.just(0)),
        ),
        max_size=120,
    )
)
def test_no_flow_is_served_more_than_k_plus_1_times_before_one_waiting_behind_k(
    steps: list[tuple[str, str, int]],
) -> None:
    sim = _Sim()
    for index, (kind, flow, priority) in enumerate(steps):
        if kind == "join":
            sim.join(f"r{index}", flow, priority)
        elif sim.live:
            sim.serve()
    sim.drain()


def test_a_burst_of_one_flow_does_not_starve_another() -> None:
    sim = _Sim()
    for index in range(20):
        sim.join(f"burst{index:02}", "batch")
    sim.join("late", "interactive")
    sim.drain()
    # The late arrival goes second: the burst's flow had the turn before it joined.
    assert sim.served.index("late") == 1
    assert [n for n in sim.served if n != "late"] == sorted(n for n in sim.joined if n != "late")


def test_a_flow_that_empties_and_comes_back_does_not_take_its_turn_again() -> None:
    sim = _Sim()
    for name in ("a1", "a2", "a3"):
        sim.join(name, "a")
    sim.join("b1", "b")
    assert sim.serve() == "a1"
    assert sim.serve() == "b1"
    # b has nobody waiting now, and comes back at once: a had the turn before b's.
    sim.join("b2", "b")
    assert sim.serve() == "a2"
    assert sim.serve() == "b2"


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(("join", "join", "serve", "cancel")),
            st.sampled_from(FLOWS),
            st.sampled_from((0, 0, 0, 1)),
        ),
        max_size=150,
    ),
    picks=st.randoms(use_true_random=False),
)
def test_with_cancellations_the_bound_holds_and_each_flow_is_served_oldest_first(
    steps: list[tuple[str, str, int]], picks: Any
) -> None:
    sim = _Sim()
    for index, (kind, flow, priority) in enumerate(steps):
        if kind == "join":
            sim.join(f"r{index}", flow, priority)
        elif kind == "serve" and sim.live:
            sim.serve()
        elif kind == "cancel" and sim.live:
            # Often the head (it may be cancelled while it asks the router), else anyone.
            sim.cancel(sim.head() if picks.random() < 0.3 else picks.choice(sorted(sim.live)))
    sim.drain()
    for flow in FLOWS:
        for priority in (0, 1):
            mine = [int(n[1:]) for n in sim.served if sim.joined[n] == (flow, priority)]
            assert mine == sorted(mine)


def test_a_flow_whose_later_waiters_gave_up_is_not_pushed_behind_turns_it_never_used() -> None:
    # The review's case: f's waiters 2..10 give up while f1 waits; f's next request then
    # waits behind f1 only, so g is served at most twice before it.
    sim = _Sim()
    for index in range(20):
        sim.join(f"g{index:02}", "g")
    for index in range(1, 11):
        sim.join(f"f{index:02}", "f")
    for index in range(2, 11):
        sim.cancel(f"f{index:02}")
    sim.join("f11", "f")
    sim.drain()  # checks the bound at every service
    assert sim.served.index("f11") <= 4


def test_a_cancelled_head_does_not_use_its_flows_turn() -> None:
    sim = _Sim()
    for name in ("a1", "a2"):
        sim.join(name, "a")
    sim.join("b1", "b")
    assert sim.head() == "a1"
    sim.cancel("a1")  # gave up while asking the router: a was not served
    assert sim.serve() == "a2"
    assert sim.serve() == "b1"


def test_a_flow_whose_waiters_were_all_cancelled_is_not_pushed_back() -> None:
    sim = _Sim()
    sim.join("a", "a")
    for index in range(5):
        sim.join(f"gone{index}", "b")
    for index in range(5):
        sim.cancel(f"gone{index}")
    sim.join("b", "b")
    sim.join("c", "c")
    assert sim.serve() == "a"
    assert sim.serve() == "b"  # b's cancelled waiters do not put it behind c
    assert sim.serve() == "c"


def test_flows_are_forgotten_as_soon_as_they_have_no_waiters() -> None:
    # One request waits throughout, so its priority's state is never dropped whole; 200,000
    # requests of unique fairness ids join and give up, one at a time and then all at once.
    queue = AdmissionQueue()
    steady = queue.join(0, 1_000_000, "steady")
    for index in range(100_000):
        queue.leave(queue.join(0, 1_000_000, f"tenant-{index}"))
    tickets = [queue.join(0, 1_000_000, f"burst-{index}") for index in range(100_000)]
    assert len(queue) == 100_001
    for ticket in tickets:
        queue.leave(ticket)
    assert len(queue) == 1
    assert queue._levels == {0: {"steady": deque([steady])}}
    queue.leave(steady, served=True)
    assert queue._levels == {}


def test_priorities_still_come_first_and_sheddable_requests_never_wait() -> None:
    sim = _Sim()
    for name, flow in (("low1", "a"), ("low2", "a"), ("low3", "b")):
        sim.join(name, flow)
    sim.join("high", "a", 3)
    assert sim.serve() == "high"
    assert sim.serve() == "low1"
    from interlock import Overloaded

    with pytest.raises(Overloaded, match="sheddable"):
        sim.queue.join(-1, 100, "c")


# -- through a pipeline --------------------------------------------------------------------------


def _request(index: int, flow: str | None) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{index}",
        token_ids=prompt(24, start=1 + 100 * index),
        max_tokens=4,
        routing=None if flow is None else RoutingHints(fairness_id=flow),
    )


async def _run_patiently(
    pipeline: Any, request: PreprocessedRequest, patience: float | None
) -> None:
    """Run ``request``, giving up (cancelled, as a client that hangs up) after ``patience``
    seconds when it is not None."""
    with trio.move_on_after(patience if patience is not None else float("inf")):
        await run_request(pipeline, request)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.sampled_from((*FLOWS[:3], None)),
            st.sampled_from((0.0, 0.001, 0.01, 0.05, 0.3)),
            st.sampled_from((None, None, None, 0.0, 0.02, 0.2, 1.0)),
        ),
        min_size=2,
        max_size=30,
    )
)
async def test_requests_of_each_flow_take_turns_for_a_worker_slot(
    autojump_clock: object, arrivals: list[tuple[str | None, float, float | None]]
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=100)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        async with trio.open_nursery() as nursery:
            for index, (flow, gap, patience) in enumerate(arrivals):
                nursery.start_soon(_run_patiently, pipeline, _request(index, flow), patience)
                await trio.sleep(gap)
        log = pipeline.transition_log
        arrived = {
            f"r{i}": next(r.t for r in log.records(f"r{i}") if r.trigger == "preprocess")
            for i in range(len(arrivals))
        }
        # Those that gave up before a worker took them have no route.
        routed = {
            name: route[0]
            for name in arrived
            if (route := [r.t for r in log.records(name) if r.trigger == "route"])
        }
        assert pipeline.queued == 0
        assert pipeline._admission._levels == {}
    flows = {f"r{i}": flow or DEFAULT_FLOW for i, (flow, _, _) in enumerate(arrivals)}
    for name, flow in flows.items():
        if name not in routed:
            continue
        # Who got the slot while this one waited, by flow.
        during = Counter(
            flows[other]
            for other in routed
            if other != name and arrived[name] < routed[other] < routed[name]
        )
        ahead = during.pop(flow, 0)
        for other, times in during.items():
            assert times <= ahead + 2, (
                f"{name} (flow {flow}) waited behind {times} requests of flow {other} and "
                f"{ahead} of its own"
            )
