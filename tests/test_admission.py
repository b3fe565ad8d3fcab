"""Admission control: at most ``max_inflight_per_worker`` requests on a worker, at most
``max_queued_requests`` waiting in the frontend for a slot (highest priority first, then
oldest), and `Overloaded` (HTTP 429 with Retry-After) beyond. Sheddable requests (negative
priority) never wait; migrations, named workers and gateway queries are not held back.

In-process, in virtual time; the HTTP status and header are checked against a real
`interlock serve` in tests/test_overload_http.py.
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing
from helpers import prompt, run_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock import Components, NoWorkersAvailable, Overloaded, PipelineConfig, build_pipeline
from interlock._admission import AdmissionQueue
from interlock.engines.mock import MockEngine
from interlock.wire import PreprocessedRequest, RoutingHints


def request(
    index: int, *, priority: int | None = None, max_tokens: int = 20
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{index}",
        token_ids=prompt(40, start=1 + 100 * index),
        max_tokens=max_tokens,
        routing=RoutingHints(priority=priority) if priority is not None else None,
    )


class Peak:
    """The most requests running at once on each engine, sampled at every engine step."""

    def __init__(self, engines: list[MockEngine]) -> None:
        self.peak = {engine.instance_id: 0 for engine in engines}
        for engine in engines:
            engine.add_step_listener(lambda e=engine: self._sample(e))

    def _sample(self, engine: MockEngine) -> None:
        running = engine.running_requests + engine.waiting_requests
        self.peak[engine.instance_id] = max(self.peak[engine.instance_id], running)


async def run_all(pipeline, requests):  # type: ignore[no-untyped-def]
    """Start the requests one after the other (a millisecond apart, so they arrive in order);
    each result is its tokens or the `Overloaded` it raised."""
    results: list[object] = [None] * len(requests)

    async def one(index: int) -> None:
        try:
            results[index] = (await run_request(pipeline, requests[index]))[0]
        except Overloaded as exc:
            results[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(requests)):
            nursery.start_soon(one, index)
            await trio.sleep(0.001)
    return results


async def test_beyond_the_limit_requests_wait_and_beyond_the_queue_they_are_shed(
    autojump_clock: object,
) -> None:
    engines = [MockEngine(0), MockEngine(1)]
    peak = Peak(engines)
    config = PipelineConfig(max_inflight_per_worker=2, max_queued_requests=3)
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(12)])
        assert pipeline.queued == 0 and pipeline.in_flight == 0
        assert pipeline.shed == 5
    served = [r for r in results if isinstance(r, list)]
    shed = [r for r in results if isinstance(r, Overloaded)]
    # 2 workers x 2 slots run, 3 wait, the other 5 are answered at once.
    assert len(served) == 7 and len(shed) == 5
    assert all(len(tokens) == 20 for tokens in served)
    assert all("max_queued_requests=3" in str(exc) for exc in shed)
    assert all(exc.retry_after > 0 for exc in shed)
    assert peak.peak == {0: 2, 1: 2}


async def test_the_default_limit_is_what_the_worker_reports(autojump_clock: object) -> None:
    engines = [MockEngine(0, max_num_seqs=3)]
    peak = Peak(engines)
    async with build_pipeline(PipelineConfig(), Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(10)])
    # Default queue: at least 8, so nothing is shed; the engine never queues itself.
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 3}


async def test_a_limit_of_zero_turns_admission_control_off(autojump_clock: object) -> None:
    engines = [MockEngine(0, max_num_seqs=2)]
    peak = Peak(engines)
    config = PipelineConfig(max_inflight_per_worker=0, max_queued_requests=0)
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        results = await run_all(pipeline, [request(i) for i in range(8)])
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 8}  # running and waiting in the engine itself


async def test_waiting_requests_start_highest_priority_first_then_oldest(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=10)
    priorities = [None, 0, 0, 5, 1, 5, None]
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        await run_all(pipeline, [request(i, priority=p) for i, p in enumerate(priorities)])
        started = [
            record.request_id
            for record in pipeline.transition_log.records()
            if record.trigger == "start_decode"
        ]
    # r0 took the slot at once; then priority 5 (oldest first), 1, then the 0s by age.
    assert started == ["r0", "r3", "r5", "r4", "r1", "r2", "r6"]


async def test_a_sheddable_request_is_refused_at_once_when_every_worker_is_full(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=10)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        results = await run_all(pipeline, [request(0), request(1, priority=-1)])
        assert isinstance(results[1], Overloaded) and "sheddable" in str(results[1])
        # With room, a sheddable request runs like any other.
        tokens, _ = await run_request(pipeline, request(2, priority=-1))
    assert len(tokens) == 20


async def test_a_request_naming_its_worker_is_not_held_back(autojump_clock: object) -> None:
    engine = MockEngine(0)
    peak = Peak([engine])
    config = PipelineConfig(
        max_inflight_per_worker=1, max_queued_requests=0, allow_request_worker_ids=True
    )
    named = [
        PreprocessedRequest(
            token_ids=prompt(40, start=i * 100 + 1),
            max_tokens=5,
            routing=RoutingHints(backend_instance_id=0),
        )
        for i in range(4)
    ]
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        results = await run_all(pipeline, named)
    assert all(isinstance(r, list) for r in results)
    assert peak.peak == {0: 4}


async def test_a_migrating_request_is_not_held_back_by_the_queue(autojump_clock: object) -> None:
    engines = [MockEngine(0, crash_after_tokens=3), MockEngine(1)]
    config = PipelineConfig(
        router_mode="round_robin",
        migration_limit=1,
        max_inflight_per_worker=1,
        max_queued_requests=0,
    )
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        # Both slots taken; the request on worker 0 breaks and moves onto worker 1's
        # full slot rather than waiting (or being shed): it was admitted already.
        results = await run_all(pipeline, [request(0), request(1)])
        assert pipeline.stats.migrations == 1
    assert [len(r) for r in results if isinstance(r, list)] == [20, 20]


async def test_cancelled_waiters_leave_the_queue_and_pass_their_turn_on(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0)
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=5)
    async with build_pipeline(config, Components(workers=[engine])) as pipeline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_request, pipeline, request(0, max_tokens=200))
            await trio.sleep(0.01)
            with trio.move_on_after(0.5):
                await run_request(pipeline, request(1))
            assert pipeline.queued == 0
            tokens, _ = await run_request(pipeline, request(2))
        assert pipeline.in_flight == 0 and pipeline.queued == 0
    assert len(tokens) == 20


@pytest.mark.parametrize("bad", [-1, 1.5, "8"])
def test_bad_limits_are_config_errors(bad: object) -> None:
    from interlock import ConfigError

    with pytest.raises(ConfigError, match="max_inflight_per_worker"):
        PipelineConfig(max_inflight_per_worker=bad)  # type: ignore[arg-type]


async def test_a_waiter_is_never_passed_on_a_worker_it_waits_for(
    autojump_clock: object,
) -> None:
    """Requests waiting for other workers may pass a waiter (a LoRA adapter's request queued
    for its one full engine holds back no base-model request: tests/test_lora_review.py), but
    never on a worker it waits for: a newcomer arriving as that worker frees waits behind it."""
    workers = [MockEngine(i) for i in (1, 2, 3)]
    workers[0].adapters = frozenset({"ad1"})  # type: ignore[attr-defined]
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=10)
    decisions: dict[str, int] = {}

    async def ask(name: str, model: str | None = None, free: str | None = None) -> None:
        if free is not None:
            # Freed by this task, with no checkpoint before its own request reaches the
            # router: the waiter woken by the freed slot asks only after it.
            pipeline.free(free)
        query = PreprocessedRequest(token_ids=prompt(8), request_id=name, model=model)
        decision = await pipeline.query(query, book=True, admit=True)
        decisions[name] = decision.decode_worker_id

    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        async with trio.open_nursery() as nursery:
            for name, model in (("h1", "ad1"), ("h2", None), ("h3", None)):
                await ask(name, model)
            assert sorted(decisions.values()) == [1, 2, 3]  # every worker full
            nursery.start_soon(ask, "ad1-waits", "ad1")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "newcomer", None, "h1")
            await trio.testing.wait_all_tasks_blocked()
            # Worker 1 freed: the queued 'ad1' request took it, not the newcomer behind it.
            assert decisions.get("ad1-waits") == 1, decisions
            assert "newcomer" not in decisions
            pipeline.free(next(n for n in ("h2", "h3") if decisions[n] == 2))
        assert decisions["newcomer"] == 2


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=40
)
@given(
    serving=st.lists(st.frozensets(st.sampled_from(("ad1", "ad2"))), min_size=3, max_size=3),
    arrivals=st.lists(
        st.tuples(
            st.sampled_from((None, "ad1", "ad2")),
            st.sampled_from((0.0, 0.001, 0.01, 0.05)),
            st.integers(min_value=1, max_value=12),
        ),
        min_size=2,
        max_size=25,
    ),
)
async def test_requests_for_different_workers_all_end_each_on_a_worker_that_serves_it(
    autojump_clock: object,
    serving: list[frozenset[str]],
    arrivals: list[tuple[str | None, float, int]],
) -> None:
    """Waiters reserving different workers (LoRA adapters served by some engines only):
    every request ends (none starves behind another's reservation, none is lost in the
    queue), each on a worker serving its model, and one no worker serves is a 503."""
    workers = [MockEngine(i) for i in (1, 2, 3)]
    for worker, names in zip(workers, serving, strict=True):
        worker.adapters = names  # type: ignore[attr-defined]
    config = PipelineConfig(max_inflight_per_worker=1, max_queued_requests=100)
    outcome: dict[str, str] = {}

    async def one(index: int, model: str | None, max_tokens: int) -> None:
        name = f"r{index}"
        query = PreprocessedRequest(
            request_id=name, token_ids=prompt(16, start=1 + 100 * index), max_tokens=max_tokens
        )
        try:
            await run_request(pipeline, attrs.evolve(query, model=model))
            outcome[name] = "done"
        except NoWorkersAvailable:
            outcome[name] = "503"

    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        async with trio.open_nursery() as nursery:
            for index, (model, gap, max_tokens) in enumerate(arrivals):
                nursery.start_soon(one, index, model, max_tokens)
                await trio.sleep(gap)
        assert pipeline.queued == 0 and pipeline._admission.reserved() == frozenset()
        assert not await pipeline.load()
        log = pipeline.transition_log
        for index, (model, _, _) in enumerate(arrivals):
            name = f"r{index}"
            servers = {w + 1 for w in range(3) if model is None or model in serving[w]}
            if not servers:
                assert outcome[name] == "503", (name, model)
                continue
            assert outcome[name] == "done", (name, model)
            routed = [r.worker_id for r in log.records(name) if r.trigger == "route"]
            assert routed and set(routed) <= servers, (name, model, routed, servers)


def test_a_waiter_may_ask_only_for_workers_no_one_ahead_of_it_waits_for() -> None:
    queue = AdmissionQueue()
    head = queue.join(0, 100, "a", frozenset({1}))  # an adapter's request: engine 1 only
    rival = queue.join(0, 100, "b", frozenset({1}))  # the same adapter's
    base = queue.join(0, 100, "c", frozenset({1, 2, 3}))  # the base model's
    unknown = queue.join(0, 100, "d")  # its workers unknown: it waits for every one
    after = queue.join(0, 100, "e", frozenset({4}))
    assert queue.reservation_for(head) == frozenset()
    assert queue.reservation_for(rival) is None  # its rival ahead goes first
    assert queue.reservation_for(base) == {1}  # engines 2 and 3 are free of those ahead
    assert queue.reservation_for(unknown) is None
    assert queue.reservation_for(after) is None  # behind one that waits for every worker
    assert queue.newcomer_reservation([1, 2, 3, 4]) is None
    # The head asked and found no room: the first waiter behind it that waits for a worker
    # nobody ahead does is woken (not its rival).
    queue.wake_behind(head)
    assert base.event.is_set() and not rival.event.is_set()
    queue.leave(unknown)
    queue.leave(after)
    assert queue.newcomer_reservation([1, 2, 3, 4]) == {1, 2, 3}
    assert queue.newcomer_reservation([1, 2, 3]) is None  # nothing left for a newcomer
    queue.refused(base, frozenset({2}))
    assert queue.newcomer_reservation([1, 2, 3]) == {1, 2}
    for ticket in (head, rival, base):
        queue.leave(ticket, served=True)
    assert queue.newcomer_reservation([1]) == frozenset() and queue.reserved() == frozenset()
