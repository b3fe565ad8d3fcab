"""Fairness in the admission queue: within a priority, the flows (GAIE's
``x-gateway-inference-fairness-id``, ``default-flow`` when unset) take turns, oldest first
within a flow, so one flow's burst cannot starve another.

The bound checked: while a request waits behind k requests of its own flow, every other flow
of its priority is served at most k + 2 times before it (k + 1 rounds, plus the turn it was
owed of the round under way), however many requests that flow queued. Checked on the queue
itself over random joins and services, and on a pipeline whose one worker
takes one request at a time, in virtual time.
"""

from __future__ import annotations

from collections import Counter
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


def _check_bound(joined: dict[str, tuple[str, int, int]], served: list[str]) -> None:
    """``joined``: request -> (flow, priority, its flow's waiters at that priority ahead of
    it when it joined); ``served`` the requests in the order they left the head, each
    preceded by what was served after it joined (the list holds joins as ``+id``)."""
    waiting: dict[str, Counter[str]] = {}
    for event in served:
        if event.startswith("+"):
            waiting[event[1:]] = Counter()
            continue
        flow, priority, ahead = joined[event]
        counts = waiting.pop(event)
        for other, times in counts.items():
            assert times <= ahead + 2, (
                f"{event} (flow {flow}, {ahead} of its flow ahead) waited behind {times} "
                f"requests of flow {other}: {served}"
            )
        for name, seen in waiting.items():
            if joined[name][1] == priority and joined[name][0] != flow:
                seen[flow] += 1


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("join"), st.sampled_from(FLOWS), st.sampled_from((0, 0, 0, 1))),
            st.tuples(st.just("serve"), st.just(""), st.just(0)),
        ),
        max_size=120,
    )
)
def test_no_flow_is_served_more_than_k_plus_2_times_before_one_waiting_behind_k(
    steps: list[tuple[str, str, int]],
) -> None:
    queue = AdmissionQueue()
    tickets: dict[str, Any] = {}
    joined: dict[str, tuple[str, int, int]] = {}
    events: list[str] = []
    for index, (kind, flow, value) in enumerate(steps):
        if kind == "join":
            name = f"r{index}"
            ahead = sum(
                1 for n, t in tickets.items() if joined[n][:2] == (flow, value) and t is not None
            )
            tickets[name] = queue.join(value, limit=1000, flow=flow)
            joined[name] = (flow, value, ahead)
            events.append("+" + name)
        elif kind == "serve" and len(queue):
            head = next(n for n, t in tickets.items() if t is not None and queue.is_next(t))
            queue.leave(tickets[head])
            tickets[head] = None
            events.append(head)
    # Serve the rest, and check the order over the whole run.
    while len(queue):
        head = next(n for n, t in tickets.items() if t is not None and queue.is_next(t))
        queue.leave(tickets[head])
        tickets[head] = None
        events.append(head)
    _check_bound(joined, events)
    assert queue._levels == {}  # nothing is remembered once nobody waits


def test_a_burst_of_one_flow_does_not_starve_another() -> None:
    queue = AdmissionQueue()
    burst = [queue.join(0, 100, "batch") for _ in range(20)]
    late = queue.join(0, 100, "interactive")
    order = []
    while len(queue):
        head = next(t for t in [*burst, late] if queue.is_next(t))
        order.append(head)
        queue.leave(head)
    # The late arrival goes second: one of the burst was already in the round under way.
    assert order.index(late) == 1
    assert [t for t in order if t is not late] == burst  # oldest first within the flow


def test_a_flow_that_empties_and_comes_back_does_not_take_its_turn_again() -> None:
    queue = AdmissionQueue()
    a = [queue.join(0, 100, "a") for _ in range(3)]
    b1 = queue.join(0, 100, "b")
    assert queue.is_next(a[0])
    queue.leave(a[0])
    assert queue.is_next(b1)
    queue.leave(b1)
    # b has nobody waiting now, and comes back at once: a had the turn before b's.
    b2 = queue.join(0, 100, "b")
    assert queue.is_next(a[1])
    queue.leave(a[1])
    assert queue.is_next(b2)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(("join", "serve", "cancel")), st.sampled_from(FLOWS)),
        max_size=80,
    ),
    picks=st.randoms(use_true_random=False),
)
def test_with_cancellations_each_flow_is_still_served_oldest_first(
    steps: list[tuple[str, str]], picks: Any
) -> None:
    queue = AdmissionQueue()
    live: dict[int, Any] = {}
    flows: dict[int, str] = {}
    served: list[int] = []
    for index, (kind, flow) in enumerate(steps):
        if kind == "join":
            live[index] = queue.join(0, 1000, flow)
            flows[index] = flow
        elif live:
            name = (
                next(n for n, t in live.items() if queue.is_next(t))
                if kind == "serve"
                else picks.choice(sorted(live))
            )
            queue.leave(live.pop(name))
            if kind == "serve":
                served.append(name)
    while live:
        name = next(n for n, t in live.items() if queue.is_next(t))
        queue.leave(live.pop(name))
        served.append(name)
    for flow in FLOWS:
        mine = [n for n in served if flows[n] == flow]
        assert mine == sorted(mine)
    assert len(queue) == 0 and queue._levels == {}


def test_a_flow_whose_waiters_were_all_cancelled_is_not_pushed_back() -> None:
    queue = AdmissionQueue()
    a = queue.join(0, 100, "a")
    gone = [queue.join(0, 100, "b") for _ in range(5)]
    for ticket in gone:
        queue.leave(ticket)
    b = queue.join(0, 100, "b")
    c = queue.join(0, 100, "c")
    queue.leave(a)
    assert queue.is_next(b)  # b's cancelled rounds do not put it behind c
    queue.leave(b)
    assert queue.is_next(c)


def test_priorities_still_come_first_and_sheddable_requests_never_wait() -> None:
    queue = AdmissionQueue()
    low = [queue.join(0, 100, f) for f in ("a", "a", "b")]
    high = queue.join(3, 100, "a")
    assert queue.is_next(high)
    queue.leave(high)
    assert queue.is_next(low[0])
    from interlock import Overloaded

    with pytest.raises(Overloaded, match="sheddable"):
        queue.join(-1, 100, "c")


# -- through a pipeline --------------------------------------------------------------------------


def _request(index: int, flow: str | None) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{index}",
        token_ids=prompt(24, start=1 + 100 * index),
        max_tokens=4,
        routing=None if flow is None else RoutingHints(fairness_id=flow),
    )


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.sampled_from((*FLOWS[:3], None)), st.sampled_from((0.0, 0.001, 0.01, 0.05, 0.3))
        ),
        min_size=2,
        max_size=30,
    )
)
async def test_requests_of_each_flow_take_turns_for_a_worker_slot(
    autojump_clock: object, arrivals: list[tuple[str | None, float]]
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=100)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        async with trio.open_nursery() as nursery:
            for index, (flow, gap) in enumerate(arrivals):
                nursery.start_soon(run_request, pipeline, _request(index, flow))
                await trio.sleep(gap)
        log = pipeline.transition_log
        arrived = {
            f"r{i}": next(r.t for r in log.records(f"r{i}") if r.trigger == "preprocess")
            for i in range(len(arrivals))
        }
        routed = {
            f"r{i}": next(r.t for r in log.records(f"r{i}") if r.trigger == "route")
            for i in range(len(arrivals))
        }
    flows = {f"r{i}": flow or DEFAULT_FLOW for i, (flow, _) in enumerate(arrivals)}
    for name, flow in flows.items():
        # Who got the slot while this one waited, by flow.
        during = Counter(
            flows[other]
            for other in flows
            if other != name and arrived[name] < routed[other] < routed[name]
        )
        ahead = during.pop(flow, 0)
        for other, times in during.items():
            assert times <= ahead + 2, (
                f"{name} (flow {flow}) waited behind {times} requests of flow {other} and "
                f"{ahead} of its own"
            )
