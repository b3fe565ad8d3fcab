"""router_mode='kv': route to cached prefixes, mirror the engines' caches exactly, stay
replayable, and keep load bookkeeping honest."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock import Components, ConfigError, PipelineConfig, build_pipeline
from interlock.actors import replay_selection
from interlock.engines.mock import MockEngine
from interlock.kv import KvStored
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest, RouterConfigOverride, RoutingHints

KV = PipelineConfig(router_mode="kv")


def ask(prompt: list[int], **fields: Any) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=prompt, max_tokens=fields.pop("max_tokens", 4), **fields)


def family_prompt(family: int, turn: int, prefix_tokens: int = 256) -> list[int]:
    """Requests of one family share a long prefix (a system prompt, a conversation)."""
    return [family * 10_000 + i for i in range(prefix_tokens)] + [turn + 1] * 24


async def run(pipeline: Any, request: PreprocessedRequest) -> Any:
    final = None
    async for output in pipeline.generate(request):
        final = output
    return final


async def _hit_rate(config: PipelineConfig, families: int = 7, turns: int = 5) -> float:
    workers = [MockEngine(i) for i in range(8)]
    cached = total = 0
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        for turn in range(turns):
            async with trio.open_nursery() as nursery:
                for family in range(families):

                    async def one(f: int = family, t: int = turn) -> None:
                        nonlocal cached, total
                        request = ask(family_prompt(f, t))
                        final = await run(pipeline, request)
                        cached += final.usage.cached_tokens
                        total += final.usage.prompt_tokens

                    nursery.start_soon(one)
    return cached / total


async def test_kv_finds_shared_prefixes_round_robin_misses(autojump_clock: object) -> None:
    kv = await _hit_rate(KV)
    round_robin = await _hit_rate(PipelineConfig())
    # Five turns of seven families on eight workers: at best only each family's first turn
    # misses (a bound of 4/5 x 256/280 = 0.73); round robin scatters each family.
    assert kv > 0.6, (kv, round_robin)
    assert kv > round_robin + 0.2, (kv, round_robin)


async def _drain() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_the_index_mirrors_every_cache(autojump_clock: object) -> None:
    workers = [MockEngine(i, num_gpu_blocks=40) for i in range(3)]
    async with build_pipeline(KV, Components(workers=workers)) as pipeline:
        for turn in range(6):
            for family in range(5):
                await run(
                    pipeline,
                    PreprocessedRequest(token_ids=family_prompt(family, turn, 100), max_tokens=20),
                )
        await _drain()
        indexed = await pipeline.kv_blocks()
        cached = {w.instance_id: w.kv_cache.cached_blocks() for w in workers}
    assert any(w.kv_cache.evictions for w in workers), "the workload must evict"
    assert indexed == cached


@st.composite
def kv_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "blocks": draw(st.integers(12, 80)),
        "requests": draw(
            st.lists(
                st.tuples(
                    st.integers(0, 4),  # family
                    st.integers(0, 120),  # prefix length
                    st.integers(1, 40),  # own tokens
                    st.integers(1, 30),  # max_tokens
                    st.floats(0, 1.0),  # arrival
                ),
                min_size=1,
                max_size=14,
            )
        ),
        "faults": draw(
            st.lists(
                st.tuples(
                    st.floats(0, 1.0), st.integers(0, 2), st.sampled_from(["crash", "restart"])
                ),
                max_size=4,
            )
        ),
        "router_crash": draw(st.none() | st.floats(0, 1.0)),
    }


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(scenario=kv_scenarios())
async def test_after_events_drain_the_index_equals_the_caches(
    autojump_clock: object, scenario: dict[str, Any]
) -> None:
    workers = [MockEngine(i, num_gpu_blocks=scenario["blocks"]) for i in range(3)]
    config = KV.evolve(migration_limit=2)
    async with build_pipeline(config, Components(workers=workers)) as pipeline:

        async def client(family: int, prefix: int, own: int, limit: int, at: float) -> None:
            await trio.sleep(at)
            prompt = [family * 1000 + i for i in range(prefix)] + [7] * own
            try:
                await run(pipeline, PreprocessedRequest(token_ids=prompt, max_tokens=limit))
            except Exception:
                pass

        async def fault(at: float, worker: int, kind: str) -> None:
            await trio.sleep(at)
            getattr(workers[worker], kind)()

        async def crash_router(at: float) -> None:
            await trio.sleep(at)
            pipeline.actors["router"].crash_nowait()

        async with trio.open_nursery() as nursery:
            for spec in scenario["requests"]:
                nursery.start_soon(client, *spec)
            for spec in scenario["faults"]:
                nursery.start_soon(fault, *spec)
            if scenario["router_crash"] is not None:
                nursery.start_soon(crash_router, scenario["router_crash"])
        await _drain()
        indexed = await pipeline.kv_blocks()
        cached = {w.instance_id: w.kv_cache.cached_blocks() for w in workers if not w.is_down}
        log = pipeline.transition_log.records()
        routes = [r for r in log if r.trigger in ("route", "fall_back")]
    check_invariants(log, migration_limit=2)
    assert indexed == cached, "the index and the caches disagree (a crashed worker is absent)"
    for record in routes:
        for selection in record.decision.selections:
            assert replay_selection(selection) == selection.chosen


async def test_a_lost_event_is_repaired_from_a_dump(autojump_clock: object) -> None:
    class Lossy(MockEngine):
        """Drops its third KV event, as a lossy event plane would."""

        def _publish(self, event: Any) -> None:
            if isinstance(event, KvStored) and event.event_id == 2:
                return
            super()._publish(event)

    worker = Lossy(0)
    async with build_pipeline(KV, Components(workers=[worker])) as pipeline:
        for family in range(5):
            await run(pipeline, ask(family_prompt(family, 0, 64)))
        await _drain()
        assert (await pipeline.kv_blocks())[0] == worker.kv_cache.cached_blocks()


async def test_workers_that_left_are_never_chosen(autojump_clock: object) -> None:
    workers = [MockEngine(i) for i in range(4)]
    async with build_pipeline(KV, Components(workers=workers)) as pipeline:
        for family in range(4):
            await run(pipeline, ask(family_prompt(family, 0)))
        workers[1].leave()
        workers[2].crash()
        await _drain()
        for family in range(4):
            await run(pipeline, ask(family_prompt(family, 1)))
        routes = [r for r in pipeline.transition_log if r.trigger == "route"][4:]
        assert {r.decision.decode_worker_id for r in routes} <= {0, 3}
        assert set(await pipeline.kv_blocks()) == {0, 1, 3} - {1}


async def test_a_restarted_router_rebuilds_its_index(autojump_clock: object) -> None:
    workers = [MockEngine(i) for i in range(3)]
    async with build_pipeline(KV, Components(workers=workers)) as pipeline:
        for family in range(6):
            await run(pipeline, ask(family_prompt(family, 0)))
        before = await pipeline.kv_blocks()
        pipeline.actors["router"].crash_nowait()
        await _drain()
        assert pipeline.supervisor.restarts("router") == 1
        assert await pipeline.kv_blocks() == before
        final = await run(pipeline, ask(family_prompt(3, 1)))
    assert final.usage.cached_tokens == 256


async def test_block_size_mismatch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="blocks of 64 tokens") as info:
        build_pipeline(KV, Components(workers=[MockEngine(1, block_size=64)]))
    assert "kv_block_size" in info.value.knobs
    build_pipeline(KV.evolve(kv_block_size=64), Components(workers=[MockEngine(1, block_size=64)]))


async def test_adding_a_mismatched_worker_is_refused(autojump_clock: object) -> None:
    async with build_pipeline(KV, Components(workers=[MockEngine(1)])) as pipeline:
        with pytest.raises(ConfigError, match="kv_block_size=16"):
            await pipeline.add_worker(MockEngine(2, block_size=32))


async def test_approximate_mode_learns_from_its_own_decisions(autojump_clock: object) -> None:
    config = KV.evolve(kv_events=False, kv_approx_ttl=30.0)
    workers = [MockEngine(i) for i in range(4)]
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        first = [(await run(pipeline, ask(family_prompt(f, 0)))).usage for f in range(4)]
        again = [(await run(pipeline, ask(family_prompt(f, 1)))).usage for f in range(4)]
        await trio.sleep(60)  # longer than the TTL: the router forgets
        routes_before = [r for r in pipeline.transition_log if r.trigger == "route"]
        await run(pipeline, ask(family_prompt(0, 2)))
        last = [r for r in pipeline.transition_log if r.trigger == "route"][-1]
    assert all(u.cached_tokens == 0 for u in first)
    assert all(u.cached_tokens == 256 for u in again), "the same family went elsewhere"
    assert len(routes_before) == 8
    assert all(c.overlap_blocks == 0 for c in last.decision.selections[0].candidates)


async def test_gateway_bookkeeping_can_be_skipped(autojump_clock: object) -> None:
    workers = [MockEngine(i) for i in range(2)]
    async with build_pipeline(
        KV.evolve(allow_request_worker_ids=True), Components(workers=workers)
    ) as pipeline:
        hints = RoutingHints(enable_local_updates=False)
        request = PreprocessedRequest(token_ids=family_prompt(0, 0), max_tokens=200, routing=hints)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, pipeline, request)
            await trio.sleep(0.05)
            assert await pipeline.load() == {}, "enable_local_updates=False booked load"
        decision = await pipeline.query(ask(family_prompt(1, 0)))
        assert await pipeline.load() == {}
        booked = await pipeline.query(
            PreprocessedRequest(token_ids=family_prompt(1, 0), request_id="gw-1"), book=True
        )
        load = await pipeline.load()
        assert load[booked.decode_worker_id].prefill_tokens == 280
        pipeline.mark_prefill_complete("gw-1")
        assert (await pipeline.load())[booked.decode_worker_id].prefill_tokens == 0
        pipeline.free("gw-1")
        assert await pipeline.load() == {}
    assert decision.decode_worker_id in (0, 1)


async def test_disaggregated_kv_routes_prefill_by_overlap_and_decode_by_load(
    autojump_clock: object,
) -> None:
    decode = [MockEngine(i, role="decode") for i in (1, 2)]
    prefill = [MockEngine(i, role="prefill") for i in (10, 11)]
    async with build_pipeline(KV, Components(workers=decode, prefill_workers=prefill)) as pipeline:
        for turn in range(3):
            await run(pipeline, ask(family_prompt(5, turn)))
        routes = [r.decision for r in pipeline.transition_log if r.trigger == "route"]
    prefill_choices = [d.prefill_worker_id for d in routes]
    assert len(set(prefill_choices)) == 1, "the family's prefill should stay where it is cached"
    for decision in routes:
        pre, dec = decision.selections
        assert (pre.leg, dec.leg) == ("prefill", "decode")
        assert dec.inputs["kv"]["overlap_score_weight"] == 0.0
        assert pre.inputs["kv"]["overlap_score_weight"] == 1.0
    assert (
        routes[-1].selections[0].candidates[0].overlap_blocks
        + routes[-1].selections[0].candidates[1].overlap_blocks
        == 16
    )


async def test_per_request_override_turns_overlap_off(autojump_clock: object) -> None:
    async with build_pipeline(KV, Components(workers=[MockEngine(i) for i in range(2)])) as p:
        await run(p, ask(family_prompt(0, 0)))
        override = RouterConfigOverride(overlap_score_weight=0.0, router_temperature=0.5)
        decision = await p.query(
            PreprocessedRequest(token_ids=family_prompt(0, 1), router_config_override=override)
        )
    selection = decision.selections[0]
    assert selection.inputs["kv"]["overlap_score_weight"] == 0.0
    assert selection.inputs["kv"]["temperature"] == 0.5
    assert all(c.overlap_blocks == 0 for c in selection.candidates)
    assert replay_selection(selection) == selection.chosen


class _BusyElsewhere(MockEngine):
    """A worker whose engine reports load that no request of this frontend put there (another
    frontend's, or a direct client's), as an `OpenAIEngine` does from the engine's /metrics."""

    reported_load: tuple[int, int] | None = None


async def test_load_an_engine_reports_counts_besides_the_routers_own(
    autojump_clock: object,
) -> None:
    busy, idle = _BusyElsewhere(1), _BusyElsewhere(2)
    config = PipelineConfig(router_mode="kv", router_temperature=0.0)
    async with build_pipeline(config, Components(workers=[busy, idle])) as pipeline:
        prompt = list(range(100, 164))
        first = await pipeline.query(ask(prompt))
        # Nothing reported, nothing booked: a tie, broken the same way every time.
        tie_winner = first.decode_worker_id
        loser = 2 if tie_winner == 1 else 1
        engines = {1: busy, 2: idle}
        engines[tie_winner].reported_load = (8, 400)  # 8 requests, 400 KV blocks in use
        decision = await pipeline.query(ask(prompt))
        assert decision.decode_worker_id == loser
        (record,) = decision.selections
        loads = {c.worker_id: (c.active_requests, c.decode_blocks) for c in record.candidates}
        # The record counts this request's own 4 blocks on top (64 tokens, blocks of 16).
        assert loads[tie_winner] == (8, 400 + 4)
        # A report below the router's own bookkeeping changes nothing.
        engines[tie_winner].reported_load = (0, 0)
        again = await pipeline.query(ask(prompt))
        assert again.decode_worker_id == tie_winner
