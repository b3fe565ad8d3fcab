"""The admission queue when waiting requests may go to different workers (their *pools*: a LoRA
adapter's engines, a gateway's subset hint): a request waits only for workers that are full or
that a request ahead of it may take (docs/operations.md#overload-admission-control-429-and-503).

A gateway's booking picks (`Pipeline.query(book=True, admit=True)`) hold their slot until
`Pipeline.free`, so the tests decide exactly when a slot frees. In virtual time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from helpers import prompt
from hypothesis import example, given
from hypothesis import strategies as st
from test_gateway_ext_proc import (
    KV,
    chat_body,
    exchange,
    picking,
    request_body,
    request_headers,
    set_headers,
)
from test_lora_routing import DESTINATION

from interlock import Components, Overloaded, PipelineConfig, build_pipeline
from interlock._admission import RECHECK
from interlock.actors import _router
from interlock.engines.mock import MockEngine
from interlock.wire import PreprocessedRequest, RoutingHints

#: The LoRA adapters each worker serves (workers 4 and 5 join later in some tests).
SERVING = {1: {"ad1"}, 2: {"ad2"}, 3: {"ad2"}, 4: {"ad2"}, 5: {"ad1"}}
#: Each kind of request: its model (None: the base model) and the gateway's subset.
KINDS: dict[str, tuple[str | None, frozenset[int] | None]] = {
    "base": (None, None),
    "ad1": ("ad1", None),
    "ad2": ("ad2", None),
    "sub12": (None, frozenset({1, 2})),
}
LIMIT = 1
CONFIG = PipelineConfig(
    routing="query_only",
    router_mode="round_robin",
    max_inflight_per_worker=LIMIT,
    max_queued_requests=1_000,
)


def worker(worker_id: int) -> MockEngine:
    engine = MockEngine(worker_id)
    engine.adapters = frozenset(SERVING[worker_id])  # type: ignore[attr-defined]
    return engine


class Gateway:
    """Booking picks of each kind, each in its own task, remembering who waits and who holds
    which worker."""

    def __init__(self, pipeline: Any, nursery: trio.Nursery) -> None:
        self.pipeline = pipeline
        self.nursery = nursery
        self.workers = {1, 2, 3}
        self.count = 0
        #: Who waits: name -> (service order, kind, cancel scope).
        self.waiting: dict[str, tuple[tuple[int, int], str, trio.CancelScope]] = {}
        #: Who holds a slot: name -> worker.
        self.booked: dict[str, int] = {}
        #: (name, worker, service order), in the order they got their slot.
        self.admitted: list[tuple[str, int, tuple[int, int]]] = []

    def pool(self, kind: str) -> set[int]:
        model, subset = KINDS[kind]
        pool = {w for w in self.workers if model is None or model in SERVING[w]}
        return pool if subset is None else pool & subset

    def load(self) -> Counter[int]:
        return Counter(self.booked.values())

    def arrive(self, kind: str, priority: int = 0) -> str:
        name = f"r{self.count}"
        # Served highest priority first, then oldest (one flow).
        order = (-priority, self.count)
        self.count += 1
        scope = trio.CancelScope()
        self.waiting[name] = (order, kind, scope)
        self.nursery.start_soon(self._pick, name, kind, priority, scope)
        return name

    async def _pick(self, name: str, kind: str, priority: int, scope: trio.CancelScope) -> None:
        model, subset = KINDS[kind]
        request = PreprocessedRequest(
            token_ids=prompt(16, start=1 + 100 * self.count),
            request_id=name,
            model=model,
            routing=RoutingHints(priority=priority) if priority else None,
        )
        with scope:
            try:
                decision = await self.pipeline.query(
                    request, book=True, admit=True, candidates=subset
                )
            except Overloaded:
                assert priority < 0, f"{name} (priority {priority}) was shed"
                self.waiting.pop(name)
                return
            order = self.waiting.pop(name)[0]
            self.booked[name] = decision.decode_worker_id
            self.admitted.append((name, decision.decode_worker_id, order))
        if scope.cancelled_caught:
            self.waiting.pop(name, None)

    def free(self, name: str) -> None:
        del self.booked[name]
        self.pipeline.free(name)

    def free_on(self, worker_id: int) -> None:
        self.free(next(n for n, w in self.booked.items() if w == worker_id))

    def cancel(self, name: str) -> None:
        if name in self.waiting:  # (else it got its slot already)
            self.waiting[name][2].cancel()

    async def join(self, worker_id: int) -> None:
        await self.pipeline.add_worker(worker(worker_id))
        self.workers.add(worker_id)

    async def settled(self) -> None:
        await trio.testing.wait_all_tasks_blocked()

    def holds(self, name: str) -> int | None:
        return self.booked.get(name)


async def _gateway_test(body: Any) -> None:
    async with build_pipeline(CONFIG, Components(workers=[worker(w) for w in (1, 2, 3)])) as p:
        async with trio.open_nursery() as nursery:
            gateway = Gateway(p, nursery)
            with trio.fail_after(3600):  # virtual seconds: a stuck queue fails, not hangs
                await body(gateway)
            for name in list(gateway.waiting):
                gateway.cancel(name)
            for name in list(gateway.booked):
                gateway.free(name)
        await trio.testing.wait_all_tasks_blocked()
        assert p.queued == 0 and await p.load() == {}


async def _fill(gateway: Gateway) -> None:
    """One base request on each worker: every slot taken."""
    for _ in range(3):
        gateway.arrive("base")
        await gateway.settled()
    assert sorted(gateway.booked.values()) == [1, 2, 3]


async def test_a_base_request_takes_an_idle_engine_while_an_adapter_request_waits_ahead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The reverted attempt held a base request behind an adapter's waiter while an engine
    the adapter does not use was idle."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        adapter = gateway.arrive("ad1")  # waits for engine 1, at the head
        await gateway.settled()
        base = gateway.arrive("base")  # waits for any
        await gateway.settled()
        assert adapter in gateway.waiting and base in gateway.waiting
        gateway.free_on(2)  # engine 2: no use to the adapter
        await gateway.settled()
        assert gateway.holds(base) == 2 and adapter in gateway.waiting
        gateway.free_on(1)
        await gateway.settled()
        assert gateway.holds(adapter) == 1

    await _gateway_test(body)


async def test_an_adapter_request_waits_behind_a_base_request_that_wants_its_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        base = gateway.arrive("base")  # the head: any engine will do
        await gateway.settled()
        adapter = gateway.arrive("ad1")  # only engine 1, which the head may take too
        await gateway.settled()
        gateway.free_on(1)
        await gateway.settled()
        # Both want engine 1: the head gets it, the adapter request waits on.
        assert gateway.holds(base) == 1 and adapter in gateway.waiting, (
            gateway.booked,
            gateway.waiting,
        )
        gateway.free_on(1)
        await gateway.settled()
        assert gateway.holds(adapter) == 1

    await _gateway_test(body)


@pytest.mark.parametrize("newcomer", ["base", "ad2"])
async def test_a_just_joined_worker_goes_to_the_waiter_ahead_not_to_a_newcomer(
    autojump_clock: trio.testing.MockClock, newcomer: str
) -> None:
    """The reverted attempt let a request arriving after a worker joined take it ahead of
    the waiters (a newcomer of the waiter's pool, or of another pool the new worker is in)."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        waiter = gateway.arrive("base")
        await gateway.settled()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.join, 4)
            # Arrives while the membership change makes its way to the router.
            await trio.lowlevel.checkpoint()
            late = gateway.arrive(newcomer)
        await gateway.settled()
        assert gateway.holds(waiter) == 4, (gateway.booked, gateway.waiting)
        assert late in gateway.waiting

    await _gateway_test(body)


async def test_two_gateway_subsets_wait_each_for_their_own_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """GAIE's subset hint (``x-gateway-destination-endpoint-subset``) through the picker:
    a request for subset {1} waiting for engine 1 does not hold back one for {2, 3}."""
    async with picking(KV.evolve(max_inflight_per_worker=1)) as p:

        def pick(name: str, subset: list[int]) -> Any:
            headers = request_headers(
                extra=[("x-request-id", name)], subset=[p.endpoint(w) for w in subset]
            )
            return exchange(p.picker, [headers, request_body(chat_body(), True)])

        # Engine 1 is full (a booking held until freed: an exchange's ends with it).
        held = PreprocessedRequest(token_ids=(1, 2, 3), request_id="on-1")
        await p.pipeline.query(held, book=True, admit=True, candidates=frozenset({1}))
        answers: dict[str, Any] = {}

        async def waiting(name: str, subset: list[int]) -> None:
            answers[name] = await pick(name, subset)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting, "for-1", [1])
            await trio.testing.wait_all_tasks_blocked()
            assert p.pipeline.queued == 1
            with trio.fail_after(60):
                other = await pick("for-2-3", [2, 3])
            chosen = set_headers(other[0], "request_headers")[DESTINATION].split(",")[0]
            assert chosen in {p.endpoint(2), p.endpoint(3)}
            assert "for-1" not in answers
            p.pipeline.free("on-1")
        assert answers["for-1"][0].WhichOneof("response") == "request_headers"
        assert p.pipeline.queued == 0


#: Scheduler checkpoints from one action to the next: some land while a waiter's ask is on its
#: way through the actors (6 to 12 of them with this pipeline).
GAPS = range(16)


@pytest.mark.parametrize("gap", GAPS)
async def test_a_slot_freed_while_a_waiter_asks_goes_to_the_first_that_can_take_it(
    autojump_clock: trio.testing.MockClock, gap: int
) -> None:
    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        names = []
        for kind in ("ad1", "sub12", "ad2"):  # waiting for {1}, {1, 2}, {2, 3}
            names.append(gateway.arrive(kind))
            await gateway.settled()
        gateway.free_on(3)  # a pass: the adapter's refused, the subset's request asks ...
        for _ in range(gap):
            await trio.lowlevel.checkpoint()
        gateway.free_on(1)  # ... and engine 1 frees meanwhile: the adapter's, not the subset's
        await gateway.settled()
        assert [gateway.holds(n) for n in names] == [1, None, 3], gateway.booked

    await _gateway_test(body)


@pytest.mark.parametrize("gap", GAPS)
async def test_a_slot_freed_while_a_newcomer_first_asks_is_not_left_idle(
    autojump_clock: trio.testing.MockClock, gap: int
) -> None:
    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        newcomer = gateway.arrive("base")  # nobody waits: it asks at once, and is refused
        for _ in range(gap):
            await trio.lowlevel.checkpoint()
        gateway.free_on(2)  # perhaps after its refusal, before it joined the queue
        await gateway.settled()
        assert gateway.holds(newcomer) == 2, gateway.booked

    await _gateway_test(body)


@pytest.mark.parametrize("gap", GAPS)
async def test_a_waiter_cancelled_while_it_holds_the_baton_hands_it_on(
    autojump_clock: trio.testing.MockClock, gap: int
) -> None:
    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        first = gateway.arrive("base")
        await gateway.settled()
        second = gateway.arrive("base")
        await gateway.settled()
        gateway.free_on(3)
        for _ in range(gap):
            await trio.lowlevel.checkpoint()
        gateway.cancel(first)  # before, while or after it asks
        await gateway.settled()
        assert gateway.pipeline._admission._holder is None
        if gateway.holds(first) is None:
            assert gateway.holds(second) == 3  # the slot it did not take went on
        else:
            assert second in gateway.waiting  # it got the slot before it was cancelled

    await _gateway_test(body)


# -- the properties, over random arrivals, frees, cancellations and a worker joining -----------

_ACTION = st.one_of(
    st.tuples(st.just("arrive"), st.sampled_from(sorted(KINDS)), st.sampled_from((0, 0, 0, 1, -1))),
    st.tuples(st.just("free"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("join"), st.just(0), st.just(0)),
    st.tuples(st.just("recheck"), st.just(0), st.just(0)),
)
#: Optionally, a second action this many scheduler checkpoints after the first, before
#: anything settles: a slot that frees while a waiter's ask is in flight (or a newcomer's
#: first ask), a waiter cancelled while it holds the baton, a worker that joins while a
#: waiter asks, a sheddable request (refused at once while anyone waits: no slot freed), a
#: request that arrives while the pass a free started asks (its kind by index; after a free
#: only).
_FOLLOW = st.none() | st.tuples(
    st.integers(0, 14),
    st.sampled_from(("free", "cancel", "join", "shed", "arrive")),
    st.integers(0, 7),
)
_STEPS = st.lists(st.tuples(_ACTION, _FOLLOW), max_size=30)
_CANCEL = (("cancel", 0, 0), None)


def _check_settled(gateway: Gateway, waited: set[str], since: int, pipeline: Any) -> None:
    """At quiescence: no waiter has a worker with room in its pool (the first waiter that
    did would have no one ahead of it wanting that worker), and no request got a worker
    that one waiting ahead of it all along could have taken."""
    queue = pipeline._admission
    assert queue._holder is None, "a pass is stuck: its baton holder is not asking"
    load = gateway.load()
    for name, (order, kind, _) in sorted(gateway.waiting.items(), key=lambda i: i[1][0]):
        room = {w for w in gateway.pool(kind) if load[w] < LIMIT}
        assert not room, f"{name} ({kind}, order {order}) waits while {room} have room"
    for name, chosen, order in gateway.admitted[since:]:
        for other, (ahead, kind, _) in gateway.waiting.items():
            if other in waited and ahead < order and chosen in gateway.pool(kind):
                raise AssertionError(
                    f"{name} (order {order}) got worker {chosen}, which {other} ({kind}, "
                    f"order {ahead}) waiting ahead of it could take"
                )


@given(steps=_STEPS)
# Pinned: a waiter that gives up while another pool's waiter waits (a wake(None) asked it).
@example(steps=[(("arrive", k, 0), None) for k in ("base",) * 3 + ("ad1", "ad2")] + [_CANCEL])
async def test_waiters_of_different_pools_neither_idle_a_worker_nor_overtake(
    autojump_clock: trio.testing.MockClock, steps: list[tuple[Any, Any]]
) -> None:
    asks: list[str | None] = []
    select = _router.RouterActor._select

    def counting(self: Any, message: Any) -> Any:
        if message.admit:
            asks.append(message.request_id)
        return select(self, message)

    async with build_pipeline(CONFIG, Components(workers=[worker(w) for w in (1, 2, 3)])) as p:
        async with trio.open_nursery() as nursery:
            gateway = Gateway(p, nursery)
            # (Not the monkeypatch fixture: it would outlive hypothesis's examples.)
            with pytest.MonkeyPatch.context() as patch, trio.fail_after(3600):
                patch.setattr(_router.RouterActor, "_select", counting)
                await _drive(gateway, steps, asks)  # (virtual seconds: stuck fails, not hangs)
        await trio.testing.wait_all_tasks_blocked()
        queue = p._admission
        assert p.queued == 0 and p.in_flight == 0
        assert queue._levels == {} and queue._pools == {} and queue._holder is None
        assert queue._held == 0
        assert await p.load() == {}


async def _drive(
    gateway: Gateway, steps: list[tuple[Any, Any]], asks: list[str | None] | None = None
) -> None:
    """Run ``steps``, checking each settled state; ``asks``: the Router's admitting Selects,
    as counted so far (a waiter that gives up with none on its way must add none)."""

    def nth(names: Any, index: int) -> str | None:
        names = sorted(names)
        return names[index % len(names)] if names else None

    def act(kind: str, first: Any, second: Any) -> None:
        if kind == "arrive":
            if not isinstance(first, str):
                first = sorted(KINDS)[first % len(KINDS)]
            gateway.arrive(first, second)
        elif kind == "free" and (name := nth(gateway.booked, first)) is not None:
            gateway.free(name)
        elif kind == "cancel" and (name := nth(gateway.waiting, first)) is not None:
            gateway.cancel(name)
        elif kind == "shed":
            gateway.arrive(sorted(KINDS)[first % len(KINDS)], -1)
        elif kind == "join" and (absent := sorted({4, 5} - gateway.workers)):
            gateway.nursery.start_soon(gateway.join, absent[0])

    pipeline = gateway.pipeline
    for (kind, first, second), follow in steps:
        waited = set(gateway.waiting)
        since = len(gateway.admitted)
        asked = None if asks is None else len(asks)
        if kind == "join":
            if absent := sorted({4, 5} - gateway.workers):
                await gateway.join(absent[0])
        elif kind == "recheck":
            await trio.sleep(RECHECK * 1.5)
        else:
            act(kind, first, second)
            if follow is not None:
                gap, then, which = follow
                for _ in range(gap):
                    await trio.lowlevel.checkpoint()
                # (Only after a free: two newcomers that both ask before either joins the
                # queue join it in whichever order their answers wake them.)
                if then != "arrive" or kind == "free":
                    act(then, which, 0)
        await gateway.settled()
        _check_settled(gateway, waited, since, pipeline)
        if kind == "cancel" and follow is None and asks is not None:
            # Settled before: nobody asked, and it held no slot.
            assert asks[asked:] == [], f"a waiter gave up and {asks[asked:]} asked again"
            assert len(gateway.admitted) == since
    # Everyone waiting gets a slot as the others free theirs: nothing hangs.
    while gateway.waiting:
        assert gateway.booked, f"{sorted(gateway.waiting)} wait with every slot free"
        waited = set(gateway.waiting)
        since = len(gateway.admitted)
        gateway.free(sorted(gateway.booked)[0])
        await gateway.settled()
        _check_settled(gateway, waited, since, pipeline)
    for name in list(gateway.booked):
        gateway.free(name)


async def test_room_a_worker_makes_by_itself_is_taken_within_recheck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No request ends, yet engine 3 takes one more (its limit is what it reports, and it
    reports more now) and starts serving 'ad1' (as an engine whose /v1/models changed):
    within `RECHECK` the 'ad1' waiter has it, though what it learned before (only engine 1,
    which the head wants too) said it could not."""
    engines = [worker(w) for w in (1, 2, 3)]
    for engine in engines:
        engine.max_num_seqs = 1
    config = CONFIG.evolve(max_inflight_per_worker=None)
    async with build_pipeline(config, Components(workers=engines)) as p, trio.open_nursery() as n:
        gateway = Gateway(p, n)
        await _fill(gateway)
        head = gateway.arrive("sub12")  # waits for {1, 2}
        await gateway.settled()
        behind = gateway.arrive("ad1")  # waits for {1}
        await gateway.settled()
        engines[2].max_num_seqs = 2
        engines[2].adapters = frozenset({"ad1", "ad2"})  # type: ignore[attr-defined]
        await trio.sleep(RECHECK * 1.5)
        assert gateway.holds(behind) == 3 and head in gateway.waiting
        gateway.cancel(head)
        for name in list(gateway.booked):
            gateway.free(name)


# -- review findings --------------------------------------------------------------------------


async def test_a_priority_whose_waiters_all_gave_up_during_a_pass_does_not_break_the_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pass walks the priorities lazily: a lower priority whose waiters all left while
    the holder asked (an admitted query without booking, cancelled: no wake, so no restart)
    must not crash the holder's answer (nor leave a late joiner unasked)."""

    async def body(gateway: Gateway) -> None:
        pipeline = gateway.pipeline
        await _fill(gateway)
        head = gateway.arrive("ad1", priority=1)  # waits for engine 1
        await gateway.settled()
        low = trio.CancelScope()

        async def unbooked() -> None:
            request = PreprocessedRequest(token_ids=prompt(16, start=7000), request_id="low")
            with low:
                await pipeline.query(request, admit=True)  # waits, books nothing

        gateway.nursery.start_soon(unbooked)
        await gateway.settled()
        assert pipeline.queued == 2
        gateway.free_on(2)  # a pass: the head asks first
        low.cancel()  # priority 0 empties while the head asks
        late = gateway.arrive("ad2", priority=1)  # joins during the pass
        await gateway.settled()
        assert head in gateway.waiting
        assert gateway.holds(late) == 2, (gateway.booked, gateway.waiting)

    await _gateway_test(body)


@pytest.mark.parametrize("gap", range(4))
async def test_a_worker_joining_while_a_later_waiter_asks_goes_to_the_waiter_ahead(
    autojump_clock: trio.testing.MockClock, gap: int
) -> None:
    """The newcomer case of the just-joined worker, for a waiter of the pass: one behind
    whose ask is in flight when worker 4 (ad2) joins must not take it from the 'ad2' waiter
    ahead, whose pool was reserved before 4 existed."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        ahead = gateway.arrive("ad2")  # waits for {2, 3}
        await gateway.settled()
        behind = gateway.arrive("base")  # waits for any
        await gateway.settled()
        gateway.free_on(1)  # a pass: 'ad2' refused, then 'base' asks (engine 1 is free)
        for _ in range(gap):
            await trio.lowlevel.checkpoint()
        gateway.nursery.start_soon(gateway.join, 4)
        await gateway.settled()
        load = gateway.load()
        for name, (_, kind, _) in gateway.waiting.items():
            room = {w for w in gateway.pool(kind) if load[w] < LIMIT}
            assert not room, f"{name} ({kind}) waits while {room} have room: {gateway.booked}"
        assert not (ahead in gateway.waiting and gateway.holds(behind) == 4), gateway.booked

    await _gateway_test(body)


async def test_a_stream_of_shed_requests_does_not_hold_a_waiter_off_an_idle_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every shed request (a 429: sheddable, or the queue full) ends with a `wake`, which
    restarts the pass from the head once the ask in flight is answered. While they come
    faster than one router ask, only the head (an 'ad1' request whose engine is full) is
    ever asked, and the base waiter behind it never hears of the engine that freed."""
    config = CONFIG.evolve(routing="discover")
    engines = [worker(w) for w in (1, 2, 3)]
    async with build_pipeline(config, Components(workers=engines)) as p, trio.open_nursery() as n:
        gateway = Gateway(p, n)
        await _fill(gateway)
        adapter = gateway.arrive("ad1")
        await gateway.settled()
        base = gateway.arrive("base")
        await gateway.settled()
        shedding = True
        shed = 0

        async def sheddable() -> None:
            nonlocal shed
            while shedding:
                request = PreprocessedRequest(
                    token_ids=prompt(8, start=9000), routing=RoutingHints(priority=-1)
                )
                with pytest.raises(Overloaded):
                    async for _ in p.generate(request):
                        pass
                shed += 1
                await trio.lowlevel.checkpoint()

        n.start_soon(sheddable)
        gateway.free_on(2)  # engine 2: no use to the adapter, the base waiter's
        for _ in range(300):
            await trio.lowlevel.checkpoint()
        held = gateway.holds(base)
        shedding = False
        await gateway.settled()
        assert shed > 50
        assert held == 2, f"engine 2 idle through {shed} shed requests: {gateway.booked}"
        gateway.cancel(adapter)
        for name in list(gateway.booked):
            gateway.free(name)


async def test_a_gateways_prefill_completion_wakes_a_waiter_for_the_prefill_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`Pipeline.mark_prefill_complete` frees the prefill worker's slot of a booking (the
    picker calls it at the first token): a waiter for that prefill worker gets it at once,
    not after `RECHECK` (generate's own prefill leg wakes the queue; the gateway's does not)."""
    components = Components(
        workers=[MockEngine(1, role="decode"), MockEngine(2, role="decode")],
        prefill_workers=[MockEngine(10, role="prefill")],
    )
    async with build_pipeline(CONFIG, components) as p, trio.open_nursery() as n:
        first = PreprocessedRequest(token_ids=prompt(16, start=1), request_id="first")
        decision = await p.query(first, book=True, admit=True)
        assert decision.disaggregated and decision.prefill_worker_id == 10
        got: list[Any] = []

        async def waiter() -> None:
            second = PreprocessedRequest(token_ids=prompt(16, start=500), request_id="second")
            got.append(await p.query(second, book=True, admit=True))

        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert p.queued == 1  # the prefill worker is full
        p.mark_prefill_complete("first")
        await trio.testing.wait_all_tasks_blocked()  # (no virtual time passes)
        admitted = list(got)
        await trio.sleep(RECHECK * 2)
        assert got and got[0].prefill_worker_id == 10  # within RECHECK, by the head's timer
        assert admitted, "the freed prefill slot sat idle until the waiter's RECHECK"
        p.free("first")
        p.free("second")


async def test_room_a_worker_makes_by_itself_is_taken_within_recheck_while_requests_are_shed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As `test_room_a_worker_makes_by_itself_is_taken_within_recheck`, while sheddable
    requests are refused (429) a few times a second: each one's end `wake`s the queue, the
    head is given the baton and its `RECHECK` timer starts over, so the refresh that would
    make the 'ad1' waiter ask again (its pool grew to engine 3) never comes."""
    engines = [worker(w) for w in (1, 2, 3)]
    for engine in engines:
        engine.max_num_seqs = 1
    config = CONFIG.evolve(max_inflight_per_worker=None, routing="discover")
    async with build_pipeline(config, Components(workers=engines)) as p, trio.open_nursery() as n:
        gateway = Gateway(p, n)
        await _fill(gateway)
        head = gateway.arrive("sub12")  # waits for {1, 2}
        await gateway.settled()
        behind = gateway.arrive("ad1")  # waits for {1}
        await gateway.settled()
        shedding = True

        async def sheddable() -> None:
            while shedding:
                request = PreprocessedRequest(
                    token_ids=prompt(8, start=9000), routing=RoutingHints(priority=-1)
                )
                with pytest.raises(Overloaded):
                    async for _ in p.generate(request):
                        pass
                await trio.sleep(RECHECK / 5)  # five 429s a second

        n.start_soon(sheddable)
        engines[2].max_num_seqs = 2
        engines[2].adapters = frozenset({"ad1", "ad2"})  # type: ignore[attr-defined]
        await trio.sleep(RECHECK * 6)
        held = gateway.holds(behind)
        shedding = False
        await trio.sleep(RECHECK)
        assert held == 3, f"engine 3 idle for {RECHECK * 6} s: {gateway.booked}"
        gateway.cancel(head)
        gateway.cancel(behind)
        for name in list(gateway.booked):
            gateway.free(name)


async def test_a_priority_emptied_during_a_pass_does_not_lose_the_served_holders_booking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same lazy walk of the priorities, when the holder is served: its booking must
    reach it (or be freed), not be lost to an error raised while the baton is handed on."""
    async with build_pipeline(CONFIG, Components(workers=[worker(w) for w in (1, 2, 3)])) as p:
        async with trio.open_nursery() as nursery:
            gateway = Gateway(p, nursery)
            await _fill(gateway)
            gateway.free_on(3)  # engine 3 stays free: none of the waiters may go there
            await gateway.settled()
            outcome: list[Any] = []

            async def holder() -> None:
                request = PreprocessedRequest(
                    token_ids=prompt(16, start=6000),
                    request_id="holder",
                    routing=RoutingHints(priority=1),
                )
                try:
                    outcome.append(
                        await p.query(request, book=True, admit=True, candidates=frozenset({1, 2}))
                    )
                except Exception as exc:  # what the caller would see
                    outcome.append(exc)

            nursery.start_soon(holder)
            await gateway.settled()
            low = trio.CancelScope()

            async def unbooked() -> None:
                request = PreprocessedRequest(token_ids=prompt(16, start=7000), request_id="low")
                with low:
                    await p.query(request, admit=True, candidates=frozenset({1, 2}))

            nursery.start_soon(unbooked)
            await gateway.settled()
            assert p.queued == 2
            gateway.free_on(2)  # a pass: the holder asks, and gets engine 2 (3 has room left)
            low.cancel()  # priority 0 empties meanwhile, without a wake
            late = gateway.arrive("ad1", priority=1)  # joins during the pass
            await gateway.settled()
            gateway.cancel(late)
            await gateway.settled()
            assert outcome
            if not isinstance(outcome[0], Exception):
                p.free("holder")  # (a caller that got an error has nothing to free)
            for name in list(gateway.booked):
                gateway.free(name)
        await trio.testing.wait_all_tasks_blocked()
        assert await p.load() == {}, f"a booking leaked; the holder got {outcome[0]!r}"
        assert outcome[0].decode_worker_id == 2


async def test_a_freed_slot_asks_only_the_pools_that_named_its_worker(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a pool per worker (each engine its own adapter), a freed slot costs one Router
    ask, the freed worker's pool's, not one per waiting pool; and the waiter of that pool
    gets it whatever its place in the queue."""
    asks: list[str | None] = []
    select = _router.RouterActor._select

    def counting(self: Any, message: Any) -> Any:
        if message.admit:
            asks.append(message.request.model)
        return select(self, message)

    monkeypatch.setattr(_router.RouterActor, "_select", counting)
    pools = 8
    engines = []
    for worker_id in range(1, pools + 1):
        engine = MockEngine(worker_id)
        engine.adapters = frozenset({f"ad{worker_id}"})  # type: ignore[attr-defined]
        engines.append(engine)
    pipeline = build_pipeline(CONFIG, Components(workers=engines))
    async with pipeline as p, trio.open_nursery() as nursery:
        got: dict[str, int] = {}

        async def book(name: str, adapter: str) -> None:
            request = PreprocessedRequest(token_ids=(1, 2, 3), request_id=name, model=adapter)
            got[name] = (await p.query(request, book=True, admit=True)).decode_worker_id

        for worker_id in range(1, pools + 1):
            nursery.start_soon(book, f"on-{worker_id}", f"ad{worker_id}")
            await trio.testing.wait_all_tasks_blocked()
        for worker_id in range(1, pools + 1):  # one waiter per pool, ad1's at the head
            nursery.start_soon(book, f"wait-{worker_id}", f"ad{worker_id}")
            await trio.testing.wait_all_tasks_blocked()
        assert p.queued == pools
        for worker_id in (6, 3, 8):
            asks.clear()
            p.free(f"on-{worker_id}")
            await trio.testing.wait_all_tasks_blocked()
            assert got.get(f"wait-{worker_id}") == worker_id
            assert asks == [f"ad{worker_id}"], f"freeing worker {worker_id} asked {asks}"
        nursery.cancel_scope.cancel()


# -- second review ------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", GAPS)
async def test_a_slot_freed_as_the_holder_takes_the_last_one_goes_to_a_pool_that_joined_meanwhile(
    autojump_clock: trio.testing.MockClock, gap: int
) -> None:
    """The head ('ad1') asks for engine 1; meanwhile an 'ad2' request joins (a pool nothing is
    known of, so no refusal names engine 2) and engine 2 frees after the head's Select
    reached the Router. The head is served with no room left (as the Router saw it before
    the free), the pass ends, and the wake for engine 2 dirtied no pool: the 'ad2' waiter
    waits beside an idle engine 2 until `RECHECK`."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        head = gateway.arrive("ad1")  # waits for engine 1
        await gateway.settled()
        gateway.free_on(1)  # a pass: the head asks
        await trio.lowlevel.checkpoint()
        late = gateway.arrive("ad2")  # joins while the head asks
        for _ in range(gap):
            await trio.lowlevel.checkpoint()
        gateway.free_on(2)
        await gateway.settled()  # (no virtual time passes)
        assert gateway.holds(head) == 1
        assert gateway.holds(late) == 2, (gateway.booked, sorted(gateway.waiting))

    await _gateway_test(body)


async def test_a_prefill_fallback_wakes_a_waiter_for_the_decode_worker_it_left(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disaggregated request booked prefill worker 10 and decode worker 1; its prefill leg
    stalls and it falls back to aggregated on worker 2. The fallback's Select frees both old
    bookings, but the wake names only the prefill worker: the waiter for worker 1 is not
    asked (until `RECHECK`, made long here), while worker 1 sits idle."""
    from interlock import _admission

    monkeypatch.setattr(_admission, "RECHECK", 3600.0)
    config = CONFIG.evolve(routing="discover", first_token_timeout=5.0)
    stalled = MockEngine(10, role="prefill")
    components = Components(
        workers=[MockEngine(1, role="decode"), MockEngine(2, role="decode")],
        prefill_workers=[stalled],
    )
    async with build_pipeline(config, components) as p, trio.open_nursery() as n:
        # Engine 2 full (twice: the second unadmitted, so round robin's fallback picks 2).
        for name in ("x1", "x2"):
            request = PreprocessedRequest(token_ids=prompt(16, start=len(name)), request_id=name)
            await p.query(request, book=True, admit=name == "x1", candidates=frozenset({2}))
        stalled.stall(100)

        async def disaggregated() -> None:
            request = PreprocessedRequest(token_ids=prompt(16, start=100), max_tokens=10_000)
            async for _ in p.generate(request):
                pass

        n.start_soon(disaggregated)
        await trio.testing.wait_all_tasks_blocked()
        assert (await p.load()).keys() == {1, 2, 10}
        got: list[tuple[float, int]] = []

        async def waiter() -> None:
            request = PreprocessedRequest(token_ids=prompt(16, start=300), request_id="w")
            decision = await p.query(request, book=True, admit=True, candidates=frozenset({1}))
            got.append((trio.current_time(), decision.decode_worker_id))

        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert p.queued == 1
        await trio.sleep(6)  # the prefill leg stalls out at 5 s and falls back
        assert p.stats.fallbacks == 1
        assert (await p.load())[2].active_requests == 3  # the fallback left worker 1 for 2
        assert got == [(pytest.approx(5.0), 1)], f"worker 1 idle while 'w' waits for it: {got}"
        n.cancel_scope.cancel()


async def test_a_stream_of_requests_that_give_up_does_not_hold_a_waiter_off_an_idle_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As the shed 429s of the first review, with clients that give up (cancelled) before
    they got a slot: they held none, yet each one's end is a `wake(None)` that makes every
    pool dirty and restarts the pass from the head, so only the head ('ad1', its engine
    full) is ever asked and the base waiter behind it never hears of engine 2."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        adapter = gateway.arrive("ad1")
        await gateway.settled()
        base = gateway.arrive("base")
        await gateway.settled()
        impatient = True
        gave_up = 0

        async def giving_up() -> None:
            nonlocal gave_up
            while impatient:
                name = gateway.arrive("ad1")
                await trio.lowlevel.checkpoint()
                gateway.cancel(name)
                gave_up += 1
                await trio.lowlevel.checkpoint()

        gateway.nursery.start_soon(giving_up)
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        gateway.free_on(2)  # engine 2: no use to the adapter, the base waiter's
        for _ in range(300):
            await trio.lowlevel.checkpoint()
        held = gateway.holds(base)
        impatient = False
        await gateway.settled()
        assert gave_up > 50
        assert held == 2, f"engine 2 idle through {gave_up} requests that gave up (held {held})"
        gateway.cancel(adapter)

    await _gateway_test(body)


async def test_a_worker_that_starts_serving_a_waiters_adapter_goes_to_it_not_to_one_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Engine 3 starts serving 'ad1' (its /v1/models changed; no event) and then frees a
    slot. The 'ad1' waiter at the head could take it, but its pool is known full ({1}, which
    names no 3), so the wake for engine 3 asks only the 'ad2' waiter behind it, with only
    engine 1 reserved: it takes engine 3 from the waiter ahead (the pass of every waiting
    pool asked the head first). The module's promise: a waiter "can never take a worker an
    earlier waiter could use"."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        ahead = gateway.arrive("ad1")  # waits for {1}
        await gateway.settled()
        behind = gateway.arrive("ad2")  # waits for {2, 3}
        await gateway.settled()
        engine = gateway.pipeline.engine(3)
        engine.adapters = frozenset({"ad1", "ad2"})  # serves 'ad1' too, from now on
        gateway.free_on(3)
        await gateway.settled()  # (no virtual time passes: no RECHECK)
        assert gateway.holds(behind) != 3 or ahead not in gateway.waiting, (
            f"{behind} (behind) took engine 3, which {ahead} (ahead, 'ad1') could use: "
            f"{gateway.booked}"
        )

    await _gateway_test(body)


async def test_a_waiter_that_gives_up_asks_no_pool_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a pool per worker, a waiter cancelled in the queue held no slot and freed
    nothing: no Router ask should follow (its end is a `wake(None)`, which makes all 8
    pools dirty and asks each again)."""
    asks: list[str | None] = []
    select = _router.RouterActor._select

    def counting(self: Any, message: Any) -> Any:
        if message.admit:
            asks.append(message.request.model)
        return select(self, message)

    monkeypatch.setattr(_router.RouterActor, "_select", counting)
    pools = 8
    engines = []
    for worker_id in range(1, pools + 1):
        engine = MockEngine(worker_id)
        engine.adapters = frozenset({f"ad{worker_id}"})  # type: ignore[attr-defined]
        engines.append(engine)
    pipeline = build_pipeline(CONFIG, Components(workers=engines))
    async with pipeline as p, trio.open_nursery() as nursery:
        scopes: dict[str, trio.CancelScope] = {}

        async def book(name: str, adapter: str) -> None:
            request = PreprocessedRequest(token_ids=(1, 2, 3), request_id=name, model=adapter)
            with scopes.setdefault(name, trio.CancelScope()):
                await p.query(request, book=True, admit=True)

        for worker_id in range(1, pools + 1):
            nursery.start_soon(book, f"on-{worker_id}", f"ad{worker_id}")
            await trio.testing.wait_all_tasks_blocked()
        for worker_id in range(1, pools + 1):
            nursery.start_soon(book, f"wait-{worker_id}", f"ad{worker_id}")
            await trio.testing.wait_all_tasks_blocked()
        assert p.queued == pools
        asks.clear()
        scopes["wait-5"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert p.queued == pools - 1
        assert asks == [], f"a waiter that gave up asked {asks} again"
        nursery.cancel_scope.cancel()


async def test_a_slot_booked_for_a_waiter_that_fails_as_it_is_served_goes_to_the_next(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue raises as the head is served (after the pass ended: no room left), so the
    pipeline frees the booking its caller never gets: the waiter behind, for the same worker,
    takes it at once (not at the next `RECHECK`, made long here)."""
    from interlock import _admission

    monkeypatch.setattr(_admission, "RECHECK", 3600.0)
    leave = _admission.AdmissionQueue.leave
    armed = False

    def failing(self: Any, ticket: Any, *, served: bool = False, room_left: bool = True) -> None:
        nonlocal armed
        leave(self, ticket, served=served, room_left=room_left)
        if served and armed:
            armed = False
            raise RuntimeError("injected: the queue failed as its head was served")

    monkeypatch.setattr(_admission.AdmissionQueue, "leave", failing)
    async with (
        build_pipeline(CONFIG, Components(workers=[MockEngine(1)])) as p,
        trio.open_nursery() as nursery,
    ):
        got: dict[str, int] = {}

        async def book(name: str) -> None:
            request = PreprocessedRequest(token_ids=(1, 2, 3), request_id=name)
            got[name] = (await p.query(request, book=True, admit=True)).decode_worker_id

        async def failing_head() -> None:
            with pytest.raises(RuntimeError, match="injected"):
                await book("head")

        await book("on")
        nursery.start_soon(failing_head)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(book, "behind")
        await trio.testing.wait_all_tasks_blocked()
        assert p.queued == 2
        armed = True
        p.free("on")
        await trio.testing.wait_all_tasks_blocked()
        assert not armed and p.queued == 0
        assert got == {"on": 1, "behind": 1}, f"worker 1 idle while 'behind' waits: {got}"
        p.free("behind")


async def test_a_worker_whose_ejection_ends_is_held_for_the_waiter_refused_over_it(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine 3 is ejected (it broke a stream) with a free slot when an 'ad2' waiter is
    refused (engine 2 full). The ejection ends with no message; a base request that arrives
    then must not take engine 3 from the waiter ahead, which could use it: the refusal named
    engine 3 too, so it is held for that waiter. Held until its next ask: the wake at the
    ejection's end (`wake_at`) is turned off here, as if the newcomer came first in the
    instant the ejection ends, and `RECHECK` made long."""
    from interlock import _admission

    monkeypatch.setattr(_admission, "RECHECK", 3600.0)
    monkeypatch.setattr(_admission.AdmissionQueue, "wake_at", lambda queue, times: None)
    config = CONFIG.evolve(outlier_failures=1, outlier_ejection_time=1.0)
    workers = [worker(w) for w in (1, 2, 3)]
    async with build_pipeline(config, Components(workers=workers)) as p, trio.open_nursery() as n:
        gateway = Gateway(p, n)
        await _fill(gateway)
        p.report_failed_stream(3)
        assert 3 in await p.worker_states()
        gateway.free_on(3)
        ahead = gateway.arrive("ad2")  # engine 2 full, engine 3 ejected
        await gateway.settled()
        assert ahead in gateway.waiting
        await trio.sleep(2)  # the ejection ends
        assert 3 not in await p.worker_states()
        behind = gateway.arrive("base")
        await gateway.settled()
        assert gateway.holds(behind) != 3, f"{behind} took engine 3 from {ahead}: {gateway.booked}"
        for name in list(gateway.waiting):
            gateway.cancel(name)
        for name in list(gateway.booked):
            gateway.free(name)


@pytest.mark.parametrize("ejected", ["before it waits", "while it waits"])
async def test_a_waiter_gets_a_worker_as_its_ejection_ends(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, ejected: str
) -> None:
    """Engine 3, the only 'ad2' engine with a free slot, is ejected (1 s): the 'ad2' request
    waits. The ejection ends with no message, but the refusal said when it ends: the queue
    wakes engine 3's waiters then, and the request has it at once, not at the next `RECHECK`
    (made long here, so that only the wake can admit it). Refused on its first ask, or on
    an ask from the queue (engine 3 freed while ejected)."""
    from interlock import _admission

    monkeypatch.setattr(_admission, "RECHECK", 3600.0)
    config = CONFIG.evolve(outlier_failures=1, outlier_ejection_time=1.0)
    workers = [worker(w) for w in (1, 2, 3)]
    async with build_pipeline(config, Components(workers=workers)) as p, trio.open_nursery() as n:
        waited: dict[str, float] = {}
        p.queue_time_observers.append(waited.__setitem__)
        gateway = Gateway(p, n)
        await _fill(gateway)
        if ejected == "while it waits":
            ahead = gateway.arrive("ad2")  # engines 2 and 3 full
            await gateway.settled()
        p.report_failed_stream(3)
        assert (await p.worker_states())[3] == pytest.approx(1.0)
        gateway.free_on(3)
        if ejected == "before it waits":
            ahead = gateway.arrive("ad2")  # engine 2 full, engine 3 ejected
        await gateway.settled()
        assert ahead in gateway.waiting and gateway.holds(ahead) is None
        await trio.sleep(2)
        assert gateway.holds(ahead) == 3
        assert waited[ahead] == pytest.approx(1.0), (
            f"{ahead} had engine 3 {waited[ahead] - 1.0:.3f} s after its ejection ended"
        )
        for name in list(gateway.booked):
            gateway.free(name)


async def test_an_engine_that_changes_its_adapters_unannounced_is_taken_within_recheck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An engine whose adapters change with no `WorkerChanged` (a duck-typed engine that
    announces nothing) differs from what `Select.members` recorded, so queued asks count it
    as reserved; the next `RECHECK` reads what each worker serves again, and the waiter has
    it then rather than never."""

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        waiter = gateway.arrive("base")
        await gateway.settled()
        engine = gateway.pipeline.engine(3)
        engine._adapters = frozenset({"ad1", "ad2"})  # no announcement, unlike its setter
        gateway.free_on(3)
        await trio.sleep(RECHECK * 1.5)
        assert gateway.holds(waiter) == 3, f"engine 3 idle while {waiter} waits"

    await _gateway_test(body)


# -- third review -------------------------------------------------------------------------------


async def test_a_request_whose_engines_are_all_ejected_uses_one_held_for_a_waiter_ahead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Engine 1 (the only 'ad1' engine) is ejected with a free slot. A base request waits
    (engines 2 and 3 full; engine 1 ejected, so not for it while 2 and 3 are healthy). An
    'ad1' request alone would go to engine 1 (every candidate ejected: panic mode), but the
    base waiter's refusal now names engine 1 (before the ejection filter), so engine 1 is
    reserved for the waiter ahead, which cannot use it: the 'ad1' request waits beside an
    idle engine for as long as the base waiter waits (here: the ejection's 60 s; every
    `RECHECK` asks the base waiter again, which names engine 1 again)."""
    config = CONFIG.evolve(outlier_failures=1, outlier_ejection_time=60.0)
    workers = [worker(w) for w in (1, 2, 3)]
    async with build_pipeline(config, Components(workers=workers)) as p, trio.open_nursery() as n:
        gateway = Gateway(p, n)
        await _fill(gateway)
        p.report_failed_stream(1)
        assert 1 in await p.worker_states()
        gateway.free_on(1)
        ahead = gateway.arrive("base")  # engines 2 and 3 full, engine 1 ejected
        await gateway.settled()
        assert ahead in gateway.waiting
        behind = gateway.arrive("ad1")  # only engine 1, ejected and idle: panic mode
        await gateway.settled()
        await trio.sleep(10)
        assert ahead in gateway.waiting and 1 in await p.worker_states()
        assert gateway.holds(behind) == 1, (
            f"{behind} ('ad1') waits beside idle engine 1, held for {ahead} which cannot use "
            f"it while it is ejected: {gateway.booked}"
        )
        for name in list(gateway.waiting):
            gateway.cancel(name)
        for name in list(gateway.booked):
            gateway.free(name)


@pytest.mark.parametrize("changed", ["before its Select is sent", "as the Router takes it"])
async def test_an_engine_newly_serving_an_adapter_mid_ask_goes_to_the_waiter_ahead(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, changed: str
) -> None:
    """The in-flight case of `WorkerChanged`: engine 3 frees, the pass passes over the 'ad1'
    head (known full: {1}) and hands the baton to the base waiter behind; then, before that
    waiter's Select is sent or as the Router takes it from its mailbox, engine 3 starts
    serving 'ad1'. The Select carries only engine 1 as reserved, but also what each worker
    served when that was worked out (`Select.members`): engine 3 serves more now, so it
    counts as reserved, as a worker that joined would, and goes to the head once the Router
    knows of the change."""
    select = _router.RouterActor._select
    change: list[str] = []  # the request whose Select changes engine 3 first

    def changing(router: Any, message: Any) -> Any:
        if change and message.request_id == change[0]:
            change.clear()
            router._engines[3].adapters = frozenset({"ad1", "ad2"})
        return select(router, message)

    monkeypatch.setattr(_router.RouterActor, "_select", changing)

    async def body(gateway: Gateway) -> None:
        await _fill(gateway)
        ahead = gateway.arrive("ad1")  # waits for {1}
        await gateway.settled()
        behind = gateway.arrive("base")  # waits for any
        await gateway.settled()
        if changed == "as the Router takes it":
            change.append(behind)
        gateway.free_on(3)  # a pass: the baton goes to the base waiter (the head is known full)
        if changed == "before its Select is sent":
            engine = gateway.pipeline.engine(3)
            engine.adapters = frozenset({"ad1", "ad2"})
        await gateway.settled()
        assert not change, "the base waiter was not asked"
        assert gateway.holds(ahead) == 3 and behind in gateway.waiting, (
            f"{behind} (behind) took engine 3, which {ahead} (ahead, 'ad1') could use once it "
            f"served 'ad1': {gateway.booked}"
        )

    await _gateway_test(body)
