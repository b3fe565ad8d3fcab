"""``Components(selection_policy=...)``: your own way of choosing workers.

The policy is consulted for every leg the router selects and only those; invalid combinations
fail at build time; a policy that misbehaves fails only the request it was choosing for; a
restarted router gets a fresh policy; ``interlock replay`` runs one from ``module:attribute``;
``interlock inspect --replay-decision`` says it cannot recompute one; ``interlock serve`` and
``route`` take one as ``--selection-policy module:attribute``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from custom_policies import LeastActive, least_active
from helpers import frontend_parser, prompt, run_request
from test_replay import CONVERSATION, SETTINGS, needs_traces

import interlock.actors
import interlock.wire
from interlock import (
    Components,
    ConfigError,
    NoWorkersAvailable,
    Pipeline,
    PipelineConfig,
    SelectionPolicyError,
    build_pipeline,
)
from interlock.actors import (
    KvPolicy,
    SelectionPolicy,
    WorkerView,
    candidate_records,
    replay_selection,
)
from interlock.engines.mock import MockEngine
from interlock.http import build_app
from interlock.http._cli import banner, call_asgi, resolve
from interlock.http._errors import http_error_for
from interlock.inspect import add_parser as add_inspect_parser
from interlock.replay import ReplayPolicy, parse_policies, read_trace, replay
from interlock.replay.__main__ import main as replay_main
from interlock.testing import open_simulated_cluster
from interlock.wire import Leg, PreprocessedRequest, RoutingHints, SelectionRecord

# -- policies for the tests ----------------------------------------------------------------------


class Spy:
    """Takes turns like round robin, and remembers every consultation."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: list[tuple[Leg, tuple[int, ...], str | None]] = []

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        turn = len(self.calls)
        self.calls.append((leg, tuple(c.worker_id for c in candidates), request.request_id))
        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=candidates[turn % len(candidates)].worker_id,
            candidates=candidate_records(candidates),
            reason=f"turn {turn}",
            inputs={"turn": turn},
        )


class Misbehaving:
    """Chooses like `LeastActive`, except for requests annotated ``bad``: then ``fault`` runs
    instead, returning whatever it returns."""

    name = "misbehaving"

    def __init__(self, fault: Callable[[Leg, Sequence[WorkerView]], Any]) -> None:
        self.fault = fault

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        if "bad" in request.annotations:
            result: SelectionRecord = self.fault(leg, candidates)
            return result
        return LeastActive().choose(leg, candidates, request)


class Factory:
    """A selection-policy factory that keeps every policy it made."""

    def __init__(self, make: Callable[[], SelectionPolicy] = Spy) -> None:
        self.make = make
        self.made: list[Any] = []
        self.configs: list[PipelineConfig] = []

    def __call__(self, config: PipelineConfig) -> SelectionPolicy:
        self.configs.append(config)
        policy = self.make()
        self.made.append(policy)
        return policy


def request(n: int = 0, *annotations: str, **hints: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=prompt(40, start=1 + 100 * n),
        max_tokens=4,
        annotations=annotations,
        routing=RoutingHints(**hints) if hints else None,
    )


def routes(pipeline: Pipeline) -> list[Any]:
    return [r for r in pipeline.transition_log if r.trigger == "route"]


async def settle(pipeline: Pipeline) -> None:
    # A round trip through the router: it has handled everything sent to it before.
    await pipeline.load()


# -- the policy chooses every selected leg ----------------------------------------------------


async def test_the_policy_chooses_every_aggregated_leg(autojump_clock: object) -> None:
    factory = Factory()
    async with open_simulated_cluster(workers=3, selection_policy=factory) as cluster:
        pipeline = cluster.pipeline
        for n in range(5):
            await run_request(pipeline, request(n))
        decision = await pipeline.query(request(9))
    (spy,) = factory.made
    assert factory.configs == [cluster.config]
    assert [leg for leg, _, _ in spy.calls] == ["agg"] * 6
    assert {workers for _, workers, _ in spy.calls} == {(0, 1, 2)}
    records = routes(pipeline)
    assert [r.decision.decode_worker_id for r in records] == [0, 1, 2, 0, 1, 2]
    assert decision.decode_worker_id == 2
    (selection,) = records[0].decision.selections
    assert (selection.policy, selection.reason, selection.inputs) == ("spy", "turn 0", {"turn": 0})
    assert [c.worker_id for c in selection.candidates] == [0, 1, 2]


async def test_with_prefill_workers_it_chooses_the_prefill_and_the_decode_leg(
    autojump_clock: object,
) -> None:
    factory = Factory()
    async with open_simulated_cluster(
        workers=2, prefill_workers=1, decode_role="decode", selection_policy=factory
    ) as cluster:
        await run_request(cluster.pipeline, request(0))
    (spy,) = factory.made
    assert [(leg, workers) for leg, workers, _ in spy.calls] == [
        ("prefill", (2,)),
        ("decode", (0, 1)),
    ]
    (route,) = routes(cluster.pipeline)
    assert route.decision.disaggregated
    assert [s.policy for s in route.decision.selections] == ["spy", "spy"]


async def test_preselected_legs_bypass_the_policy(autojump_clock: object) -> None:
    factory = Factory()
    config = PipelineConfig(allow_request_worker_ids=True)
    async with open_simulated_cluster(
        config, workers=2, prefill_workers=1, decode_role="decode", selection_policy=factory
    ) as cluster:
        await run_request(cluster.pipeline, request(0, prefill_worker_id=2, decode_worker_id=1))
        await run_request(cluster.pipeline, request(1, decode_worker_id=0))
    (spy,) = factory.made
    assert [leg for leg, _, _ in spy.calls] == ["prefill"]  # the one leg nobody named
    first, second = routes(cluster.pipeline)
    assert [s.policy for s in first.decision.selections] == ["preselected", "preselected"]
    assert [s.policy for s in second.decision.selections] == ["spy", "preselected"]


async def test_a_kv_policy_from_the_factory_is_fed_kv_events(autojump_clock: object) -> None:
    class Cautious(KvPolicy):
        """Your own variant of the kv policy: the same index, its own name."""

    factory = Factory(lambda: Cautious(PipelineConfig(router_mode="kv")))
    async with open_simulated_cluster(workers=2, selection_policy=factory) as cluster:
        pipeline = cluster.pipeline
        shared = prompt(64, start=5000)
        for turn in range(2):
            turn_request = PreprocessedRequest(token_ids=[*shared, turn], max_tokens=2)
            _, final = await run_request(pipeline, turn_request)
        await settle(pipeline)
        assert await pipeline.kv_blocks()  # round_robin's router would index nothing
    assert final.usage is not None and final.usage.cached_tokens == 64
    first, second = routes(pipeline)
    assert second.decision.decode_worker_id == first.decision.decode_worker_id


# -- build-time errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message", "knobs"),
    [
        (
            PipelineConfig(routing="direct_to_known"),
            "Components.selection_policy with routing='direct_to_known': every request names "
            "its workers, so every leg is preselected and the policy would never be consulted; "
            "remove selection_policy, or set routing='discover' (or 'query_only') to let it "
            "choose",
            ("routing", "selection_policy"),
        ),
        (
            PipelineConfig(router_mode="direct", direct_worker_id=1),
            "Components.selection_policy with router_mode='direct': direct sends every request "
            "to direct_worker_id=1, a fixed worker the policy would silently override; remove "
            "router_mode='direct' and direct_worker_id to let the policy choose, or remove "
            "selection_policy",
            ("router_mode", "selection_policy"),
        ),
    ],
    ids=["direct_to_known", "direct"],
)
def test_a_policy_with_nothing_to_choose_is_refused_at_build_time(
    config: PipelineConfig, message: str, knobs: tuple[str, ...]
) -> None:
    components = Components(workers=[MockEngine(1)], selection_policy=least_active)
    with pytest.raises(ConfigError) as info:
        build_pipeline(config, components)
    assert str(info.value) == message
    assert info.value.knobs == knobs


def test_a_policy_instead_of_a_factory_is_refused_at_build_time() -> None:
    components = Components(workers=[MockEngine(1)], selection_policy=LeastActive())  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        build_pipeline(PipelineConfig(), components)
    assert str(info.value) == (
        "Components.selection_policy is a LeastActive, not a factory: pass a callable that "
        "takes the PipelineConfig and returns a new policy (e.g. selection_policy=lambda "
        "config: MyPolicy()), so that a restarted router gets a fresh one"
    )
    assert info.value.knobs == ("selection_policy",)


async def test_a_factory_that_returns_no_policy_stops_the_pipeline(
    autojump_clock: object,
) -> None:
    components = Components(workers=[MockEngine(1)], selection_policy=lambda config: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="returned None, which is not a SelectionPolicy"):
        async with build_pipeline(PipelineConfig(), components):
            await trio.sleep_forever()


# -- a misbehaving policy fails only its request ----------------------------------------------


def _wrong_id(leg: Leg, candidates: Sequence[WorkerView]) -> SelectionRecord:
    return SelectionRecord(leg=leg, policy="misbehaving", chosen=7)


def _raise(leg: Leg, candidates: Sequence[WorkerView]) -> SelectionRecord:
    raise KeyError("session-42")


def _not_a_record(leg: Leg, candidates: Sequence[WorkerView]) -> object:
    return candidates[0].worker_id


def _other_leg(leg: Leg, candidates: Sequence[WorkerView]) -> SelectionRecord:
    return SelectionRecord(leg="prefill", policy="misbehaving", chosen=candidates[0].worker_id)


@pytest.mark.parametrize(
    ("fault", "message", "cause"),
    [
        (
            _wrong_id,
            "selection policy 'misbehaving' chose worker 7 for the agg leg, which is not among "
            "its candidates; the candidates were [0, 1, 2]",
            None,
        ),
        (
            _raise,
            "selection policy 'misbehaving' raised KeyError: 'session-42' (choosing the agg "
            "leg among workers [0, 1, 2]); this request fails, the router carries on",
            KeyError,
        ),
        (
            _not_a_record,
            "selection policy 'misbehaving' returned int, not a SelectionRecord, for the agg "
            "leg; choose must return SelectionRecord(leg=leg, policy=..., chosen=<a "
            "candidate's worker_id>, ...)",
            None,
        ),
        (
            _other_leg,
            "selection policy 'misbehaving' returned a record for the 'prefill' leg when asked "
            "for the 'agg' leg; set SelectionRecord.leg to the leg it is given",
            None,
        ),
    ],
    ids=["wrong-id", "raises", "not-a-record", "other-leg"],
)
async def test_a_misbehaving_policy_fails_only_that_request(
    autojump_clock: object, fault: Any, message: str, cause: type[BaseException] | None
) -> None:
    factory = Factory(lambda: Misbehaving(fault))
    async with open_simulated_cluster(workers=3, selection_policy=factory) as cluster:
        pipeline = cluster.pipeline
        await run_request(pipeline, request(0))
        with pytest.raises(SelectionPolicyError) as info:
            await run_request(pipeline, request(1, "bad"))
        with pytest.raises(SelectionPolicyError):
            await pipeline.query(request(2, "bad"))
        for n in range(3, 6):  # the router serves the requests after it as before
            await run_request(pipeline, request(n))
        assert await pipeline.load() == {}  # the failed request booked nothing
        assert pipeline.supervisor.restarts("router") == 0
    error = info.value
    assert str(error) == message
    assert (error.policy, error.leg, error.candidates) == ("misbehaving", "agg", (0, 1, 2))
    assert (type(error.__cause__) if error.__cause__ else None) is cause
    assert len(factory.made) == 1  # the same router, the same policy throughout
    assert (pipeline.stats.done, pipeline.stats.failed) == (4, 2)
    failed = [r for r in pipeline.transition_log if r.trigger == "fail"]
    assert [r.request_id for r in failed] == ["req-1", "req-2"]
    assert failed[0].decision == {"error": "SelectionPolicyError", "message": message}


async def test_a_wrong_id_names_the_excluded_worker_it_chose(autojump_clock: object) -> None:
    def sticky_to_one(leg: Leg, candidates: Sequence[WorkerView]) -> SelectionRecord:
        return SelectionRecord(leg=leg, policy="misbehaving", chosen=1)

    factory = Factory(lambda: Misbehaving(sticky_to_one))
    config = PipelineConfig(migration_limit=1)
    async with open_simulated_cluster(config, workers=2, selection_policy=factory) as cluster:
        # Worker 1 is a fine choice for the first attempt; once it crashes mid-stream, the
        # migration's selection excludes it, and choosing it again is wrong.
        outputs = cluster.pipeline.generate(attrs.evolve(request(0, "bad"), max_tokens=50))
        await outputs.__anext__()
        cluster.engines[1].crash()
        with pytest.raises(SelectionPolicyError) as info:
            async for _ in outputs:
                pass
    assert str(info.value) == (
        "selection policy 'misbehaving' chose worker 1 for the agg leg, which is excluded for "
        "this request (its stream broke there); the candidates were [0]"
    )


async def test_a_policy_may_refuse_a_request_with_no_workers_available(
    autojump_clock: object,
) -> None:
    def refuse(leg: Leg, candidates: Sequence[WorkerView]) -> SelectionRecord:
        raise NoWorkersAvailable("every worker of this tenant is busy")

    factory = Factory(lambda: Misbehaving(refuse))
    async with open_simulated_cluster(workers=2, selection_policy=factory) as cluster:
        with pytest.raises(NoWorkersAvailable, match=r"^every worker of this tenant is busy$"):
            await run_request(cluster.pipeline, request(0, "bad"))
        await run_request(cluster.pipeline, request(1))


async def test_an_http_frontend_answers_a_policy_error_with_a_500(autojump_clock: object) -> None:
    class AlwaysWrong(Misbehaving):
        # The HTTP layer sets no annotations: be wrong for every request.
        def choose(
            self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
        ) -> SelectionRecord:
            return _wrong_id(leg, candidates)

    components = Components(
        workers=[MockEngine(1)], selection_policy=lambda config: AlwaysWrong(_wrong_id)
    )
    async with build_pipeline(PipelineConfig(postprocessing="engine"), components) as pipeline:
        app = build_app(pipeline)
        body = json.dumps({"model": "mock", "prompt": "hello", "max_tokens": 2}).encode()
        status, answer = await call_asgi(app, "POST", "/v1/completions", body)
        assert pipeline.supervisor.restarts("router") == 0
    assert status == 500
    assert json.loads(answer)["error"] == {
        "message": "selection policy 'misbehaving' chose worker 7 for the agg leg, which is "
        "not among its candidates; the candidates were [1]",
        "type": "server_error",
        "param": None,
        "code": "selection_policy_error",
    }
    mapped = http_error_for(SelectionPolicyError("x", policy="p", leg="agg"))
    assert (mapped.status, mapped.type, mapped.code) == (
        500,
        "server_error",
        "selection_policy_error",
    )


# -- restarts ----------------------------------------------------------------------------------


async def test_a_restarted_router_calls_the_factory_again(autojump_clock: object) -> None:
    factory = Factory()
    async with open_simulated_cluster(workers=2, selection_policy=factory) as cluster:
        pipeline = cluster.pipeline
        await run_request(pipeline, request(0))
        pipeline.actors["router"].crash_nowait()
        await settle(pipeline)
        await run_request(pipeline, request(1))
        assert pipeline.supervisor.restarts("router") == 1
    first, second = factory.made
    assert first is not second
    assert [leg for leg, _, _ in first.calls] == ["agg"]
    assert [leg for leg, _, _ in second.calls] == ["agg"]  # the new one starts afresh
    assert [r.decision.selections[0].inputs for r in routes(pipeline)] == [
        {"turn": 0},
        {"turn": 0},
    ]


# -- the public names a policy author needs ---------------------------------------------------


def test_a_policy_author_imports_everything_from_public_namespaces() -> None:
    for name in ("SelectionPolicy", "WorkerView", "WorkerLoad", "candidate_records"):
        assert name in interlock.actors.__all__, name
    for name in ("SelectionRecord", "CandidateRecord", "Leg"):
        assert name in interlock.wire.__all__, name
    assert "SelectionPolicyError" in interlock.__all__
    assert issubclass(SelectionPolicyError, interlock.InterlockError)


# -- interlock inspect --replay-decision ----------------------------------------------------------


def _inspect(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="interlock")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return int(args.run(args))


async def test_inspect_says_it_cannot_replay_a_custom_policy(
    autojump_clock: object, tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "transitions.jsonl"
    config = PipelineConfig(transition_log_path=str(path), allow_request_worker_ids=True)
    async with open_simulated_cluster(
        config, workers=2, prefill_workers=1, decode_role="decode", selection_policy=least_active
    ) as cluster:
        await run_request(cluster.pipeline, request(0, prefill_worker_id=2))
    selection = routes(cluster.pipeline)[0].decision.selections[1]
    with pytest.raises(ValueError, match="'least_active' selection: it is not a built-in policy"):
        replay_selection(selection)

    assert await trio.to_thread.run_sync(_inspect, str(path), "--replay-decision", "req-0") == 0
    out = " ".join(capsys.readouterr().out.split())  # whatever the table's widths
    assert "1 route prefill preselected 2 2 match" in out
    assert "1 route decode least_active 0 - not replayable" in out
    assert (
        "#1 decode leg: 'least_active' is not a built-in policy: interlock cannot recompute a "
        "custom selection policy's choice"
    ) in out
    assert (
        "1 of 2 selection(s) were made by a custom policy and cannot be recomputed; the other "
        "1 replay to the recorded workers"
    ) in out
    assert "MISMATCH" not in out and "does not match" not in out
    assert _inspect(str(path), "--replay-decision", "req-0", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    prefill, decode = data["decisions"][0]["legs"]
    assert (prefill["custom"], prefill["matches"], prefill["mismatch"]) == (False, True, False)
    assert (decode["custom"], decode["matches"], decode["mismatch"]) == (True, False, False)


# -- interlock replay with LABEL=module:attribute -----------------------------------------------


def test_a_replay_policy_may_be_a_factory_of_your_own(tmp_path: Path) -> None:
    tuned = tmp_path / "tuned.toml"
    tuned.write_text('router_mode = "kv"\n')
    base = PipelineConfig(migration_limit=1)
    policies = parse_policies(
        f"kv,kv:overlap_score_weight=4,{tuned},t={tuned},mine=custom_policies:least_active",
        base,
    )
    assert [p.label for p in policies] == ["kv", "kv:overlap_score_weight=4", "tuned", "t", "mine"]
    mine = policies[-1]
    assert mine.selection_policy is least_active
    assert (mine.import_path, mine.router_mode) == ("custom_policies:least_active",) * 2
    assert mine.config == base  # the base configuration, as given
    assert all(p.selection_policy is None for p in policies[:-1])
    assert ReplayPolicy.parse("x=custom_policies:LeastActive").selection_policy is LeastActive


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "mine=no_such_policies:make",
            "policy 'mine=no_such_policies:make': there is no module 'no_such_policies' to "
            "import (no module named 'no_such_policies'); run from the directory that holds "
            "it, or add that directory to PYTHONPATH",
        ),
        (
            "mine=custom_policies:nope",
            "policy 'mine=custom_policies:nope': module 'custom_policies' has no attribute "
            "'nope'; name a factory defined there (a callable taking the PipelineConfig and "
            "returning a SelectionPolicy)",
        ),
        (
            "mine=custom_policies:NOT_CALLABLE",
            "policy 'mine=custom_policies:NOT_CALLABLE': Components.selection_policy is a int, "
            "not a factory",
        ),
        ("mine=custom_policies:", "'custom_policies:' is not module:attribute"),
        ("mine=custom-policies:f", "'custom-policies:f' is not module:attribute"),
        ("=custom_policies:least_active", "give a label before '='"),
        ("custom_policies:least_active", "a policy of your own is LABEL=module:attribute"),
        ("mine=least_active", "needs a .toml configuration file or a selection policy factory"),
        ("fancy", "or a policy of your own (LABEL=module:attribute)"),
        ("mine=broken_policy:f", "importing 'broken_policy' raised RuntimeError: half-written"),
        ("mine=needy_policy:f", "importing 'needy_policy' failed: No module named 'not_here'"),
    ],
)
def test_a_bad_policy_import_says_what_to_fix(
    text: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_policy.py").write_text("raise RuntimeError('half-written')\n")
    (tmp_path / "needy_policy.py").write_text("import not_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        parse_policies(text)
    assert message in str(info.value)


def test_a_replay_policy_of_your_own_needs_something_to_choose() -> None:
    with pytest.raises(
        ConfigError, match=r"^policy 'm=custom_policies:least_active': Comp.*direct_to_known"
    ):
        parse_policies("m=custom_policies:least_active", PipelineConfig(routing="direct_to_known"))


def test_the_cli_refuses_a_bad_import_with_status_2(tmp_path: Path, capsys: Any) -> None:
    status = replay_main([str(tmp_path / "t.jsonl"), "--policies=kv,mine=custom_policies:nope"])
    assert status == 2
    assert "module 'custom_policies' has no attribute 'nope'" in capsys.readouterr().err


@needs_traces
def test_replay_runs_a_policy_of_your_own_beside_the_built_in_ones(capsys: Any) -> None:
    trace = read_trace(CONVERSATION, limit=40)
    report = replay(
        trace, parse_policies("round_robin,mine=custom_policies:least_active"), SETTINGS
    )
    rr, mine = report.policies
    assert (mine.policy, mine.router_mode) == ("mine", "custom_policies:least_active")
    assert (mine.completed, mine.failed) == (40, 0)
    assert sum(mine.requests_per_worker) == 40
    assert mine.requests_per_worker != rr.requests_per_worker  # it did choose differently

    status = replay_main(
        [
            str(CONVERSATION),
            "--limit=40",
            "--workers=4",
            "--num-gpu-blocks=4096",
            "--policies=mine=custom_policies:least_active",
            "--json",
            "--no-timing",
            "--no-progress",
        ]
    )
    assert status == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["policy"], row["router_mode"], row["completed"]) == (
        "mine",
        "custom_policies:least_active",
        40,
    )


# -- interlock serve and route -------------------------------------------------------------------


def test_route_chooses_with_the_policy_named_on_the_command_line(capsys: Any) -> None:
    args = frontend_parser().parse_args(
        [
            "route",
            "--workers",
            "3",
            "--selection-policy",
            "custom_policies:least_active",
            "--once",
            json.dumps({"token_ids": list(range(1, 20))}),
        ]
    )
    assert args.run(args) == 0
    (selection,) = json.loads(capsys.readouterr().out)["selections"]
    assert selection["policy"] == "least_active"
    assert selection["reason"] == "fewest active requests (0)"


def test_serve_shows_the_policy_it_imported() -> None:
    args = frontend_parser().parse_args(
        ["serve", "--selection-policy", "custom_policies:least_active"]
    )
    setup = resolve(args)
    assert setup.selection_policy is least_active
    assert "policy       custom_policies:least_active" in banner(setup, "http://127.0.0.1:8000")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--selection-policy", "custom_policies"], "is not module:attribute"),
        (["--selection-policy", "no_such_policies:make"], "there is no module 'no_such_policies'"),
        (["--selection-policy", "custom_policies:nope"], "has no attribute 'nope'"),
        (
            ["--selection-policy", "custom_policies:least_active", "--routing", "direct_to_known"],
            "--selection-policy 'custom_policies:least_active': .*every leg is preselected",
        ),
    ],
)
def test_a_bad_selection_policy_flag_exits_2_saying_what_to_fix(
    argv: list[str], message: str, capsys: Any
) -> None:
    args = frontend_parser().parse_args(["serve", *argv])
    assert args.run(args) == 2
    assert re.search(message, capsys.readouterr().err)
