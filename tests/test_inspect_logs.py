"""Reading logs the pipeline wrote under faults (migration, prefill fallback, cancellation,
failure, query_only): the summary, timelines, replays and validation say what happened; a
corrupted line is reported with its line number and the rest is still read."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import trio
import trio.testing

from interlock import Components, InterlockError, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.inspect import (
    LoadedLog,
    LogEntry,
    LogProblem,
    RequestFilter,
    load_log,
    parse_line,
    parse_time,
    render_summary,
    render_timeline,
    replay_decision,
    replay_decisions,
    summarize,
    validate,
)
from interlock.inspect._summary import percentile
from interlock.statemachines import SCHEMA_VERSION
from interlock.wire import PreprocessedRequest

PROMPT = list(range(1, 41))


def _request(request_id: str, max_tokens: int = 6) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=PROMPT, max_tokens=max_tokens, request_id=request_id)


async def _drain(pipeline: object, request: PreprocessedRequest) -> None:
    async for _ in pipeline.generate(request):  # type: ignore[attr-defined]
        pass


async def produce_fault_log(path: Path) -> None:
    """Three pipelines append to ``path``: one request of each fate.

    ``migrated``: decode worker 1 breaks after 3 tokens, the request moves to 2 (done).
    ``cancelled``: its client stops reading after the first output.
    ``fell-back``: prefill worker 9 refuses; the request runs aggregated on 2 (done).
    ``failed``: worker 3 breaks and migration is off (WorkerGone).
    ``queried``: a query_only pipeline answers (done, nothing executes).
    """
    config = PipelineConfig(migration_limit=1, transition_log_path=str(path))
    prefill = MockEngine(9, role="prefill")
    workers = [MockEngine(1, role="decode", crash_after_tokens=3), MockEngine(2, role="decode")]
    components = Components(workers=workers, prefill_workers=[prefill])
    async with build_pipeline(config, components) as pipeline:
        await _drain(pipeline, _request("migrated"))
        async with contextlib.aclosing(pipeline.generate(_request("cancelled"))) as stream:
            async for _ in stream:
                break
        prefill.refuse_new()
        await _drain(pipeline, _request("fell-back"))
    config = PipelineConfig(transition_log_path=str(path))
    broken = Components(workers=[MockEngine(3, crash_after_tokens=2)])
    async with build_pipeline(config, broken) as pipeline:
        with pytest.raises(InterlockError):
            await _drain(pipeline, _request("failed"))
    config = PipelineConfig(routing="query_only", transition_log_path=str(path))
    idle = Components(workers=[MockEngine(4), MockEngine(5)])
    async with build_pipeline(config, idle) as pipeline:
        await pipeline.query(_request("queried"))


def write_fault_log(path: Path) -> Path:
    """`produce_fault_log`, from synchronous code (in virtual time)."""
    trio.run(produce_fault_log, path, clock=trio.testing.MockClock(autojump_threshold=0))
    return path


@pytest.fixture
def fault_log(tmp_path: Path) -> LoadedLog:
    log = load_log(write_fault_log(tmp_path / "transitions.jsonl"))
    assert not log.problems, log.problems
    return log


# --- what happened --------------------------------------------------------------------------


def test_each_request_ends_as_its_fault_says(fault_log: LoadedLog) -> None:
    finals = {key: h.final_state for key, h in fault_log.requests().items()}
    assert finals == {
        "migrated": "done",
        "cancelled": "cancelled",
        "fell-back": "done",
        "failed": "failed",
        "queried": "done",
    }
    assert "migrated" in fault_log.request("migrated").path
    assert "prefilling" in fault_log.request("fell-back").path


def test_the_summary_counts_fates_modes_workers_and_faults(fault_log: LoadedLog) -> None:
    summary = summarize(fault_log.requests())
    assert summary.requests == 5
    assert summary.final_states == {"done": 3, "failed": 1, "cancelled": 1}
    assert summary.modes == {"discover+migration": 3, "discover": 1, "query_only": 1}
    assert (summary.migrations, summary.migrated_requests, summary.fallbacks) == (1, 1, 1)
    assert summary.failures == {"WorkerGone": 1}
    assert summary.cancellations == {"GeneratorExit": 1}
    assert summary.workers[1].migrations == 1  # the stream broke on worker 1
    assert summary.workers[9].fallbacks == 1  # the prefill leg failed on worker 9
    assert summary.workers[3].failed == 1
    assert summary.workers[2].done == 2
    assert summary.incomplete == 0
    # Round robin does not look up prefix overlap: the rate is unknown, not 0%.
    assert summary.prefix_hit_rate is None
    for state, stats in summary.durations.items():
        assert 0 <= stats.p50 <= stats.p90 <= stats.p99 <= stats.max, state
    assert summary.durations["decoding"].count >= 4
    assert "received" not in summary.durations  # the log does not say when a request arrived
    text = render_summary(summary, show_wall=False)
    assert "prefix hit rate: n/a" in text
    assert "WorkerGone 1" in text
    json.dumps(summary.to_json_dict())  # plain data all the way down


def test_state_durations_add_up_to_the_request_time(fault_log: LoadedLog) -> None:
    for key, history in fault_log.requests().items():
        spans = history.spans
        assert spans[-1].duration is None, key
        total = sum(s.duration for s in spans[:-1] if s.duration is not None)
        assert total == pytest.approx(history.elapsed), key


def test_the_timeline_says_why_the_request_went_to_its_worker(fault_log: LoadedLog) -> None:
    text = render_timeline(fault_log.request("migrated"), show_wall=False)
    assert "request migrated · mode discover+migration · done" in text
    assert "worker 1 went away after 3" in text
    assert "#5 migrate off worker 1: attempt 1; excluding worker(s) 1" in text
    assert "decode leg: round_robin chose worker 1" in text
    assert "decode leg: round_robin chose worker 2" in text
    assert "excluded (broke this request before): 1" in text
    winners = [line.split()[1] for line in text.splitlines() if line.strip().startswith("▶")]
    assert winners == ["9", "1", "9", "2"]  # prefill then decode, before and after migrating
    fallback = render_timeline(fault_log.request("fell-back"), show_wall=False)
    assert "fall_back" in fallback and "agg leg: round_robin chose worker 2" in fallback
    assert "prefill worker 9 failed; falling back to aggregated" in fallback


def test_every_routing_decision_replays_to_the_recorded_worker(fault_log: LoadedLog) -> None:
    replayed = 0
    for history in fault_log.requests().values():
        for replay in replay_decisions(history):
            assert replay.matches, (history.key, replay)
            replayed += len(replay.legs)
    assert replayed >= 8


def test_a_tampered_decision_does_not_replay(fault_log: LoadedLog) -> None:
    history = fault_log.request("migrated")
    entry = history.routing_entries[0]
    decision = json.loads(json.dumps(entry.decision))
    decision["selections"][1]["inputs"]["cursor"] = 1  # round robin would have chosen 2
    tampered = LogEntry(**{**entry.to_json_dict(), "decision": decision})
    replay = replay_decision(tampered)
    assert not replay.matches
    decode = replay.legs[1]
    assert (decode.recorded, decode.replayed) == (1, 2)


def test_pipeline_logs_under_faults_validate(fault_log: LoadedLog) -> None:
    assert validate(fault_log.requests(), migration_limit=1) == []


# --- filters --------------------------------------------------------------------------------


def test_filters_select_whole_requests(fault_log: LoadedLog) -> None:
    def keys(**criteria: object) -> set[str]:
        return set(fault_log.requests(RequestFilter(**criteria)))  # type: ignore[arg-type]

    assert keys(states="failed") == {"failed"}
    assert keys(states=["migrated", "cancelled"]) == {"migrated", "cancelled"}
    assert keys(workers=1) == {"migrated"}
    assert keys(workers=[3, 4]) == {"failed", "queried"}
    assert keys(modes="query_only") == {"queried"}
    assert keys(modes="discover+migration", states="done") == {"migrated", "fell-back"}
    walls = [e.wall for e in fault_log.entries]
    assert len(keys(since=min(walls), until=max(walls))) == 5
    assert keys(since=max(walls) + 1) == set()
    assert keys(until=min(walls) - 1) == set()
    # A selected request keeps its whole path (its records are not filtered one by one).
    assert fault_log.requests(RequestFilter(workers=9))["migrated"].path[0] == "received"


def test_times_parse_as_unix_seconds_or_iso_8601() -> None:
    assert parse_time("1735689600") == 1735689600.0
    assert parse_time("2025-01-01T00:00:00Z") == 1735689600.0
    assert parse_time("2025-01-01T01:00:00+01:00") == 1735689600.0
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


# --- bad lines ------------------------------------------------------------------------------


def test_a_corrupted_line_is_reported_with_its_number_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    path = write_fault_log(tmp_path / "transitions.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    total = len(lines)
    lines[4] = lines[4][: len(lines[4]) // 2]  # line 5: cut short (a crash mid-write)
    lines.insert(9, "\x00\x00garbage")  # line 10: not JSON
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = load_log(path)
    assert [(p.line, p.reason.split(" (")[0]) for p in log.problems] == [
        (5, "not JSON"),
        (10, "not JSON"),
    ]
    assert str(log.problems[0]).startswith(f"{path}:5: not JSON")
    assert len(log.entries) == total - 1  # everything else was read
    # The request that lost its record no longer validates, and the report says where.
    violations = validate(log.requests(), migration_limit=1)
    assert [v.request_id for v in violations] == ["migrated"]
    assert "sequence numbers skip or repeat" in violations[0].message
    assert f"{path}:1-4,6-9" in violations[0].locations


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[1, 2]", "not a transition record (a JSON list)"),
        ('{"seq": 0}', "no schema version ('v' field)"),
        ('{"v": 2, "request_id": "r"}', "schema version 2 is not supported"),
        ('{"v": "1"}', "schema version '1' is not supported"),
        ('{"v": 1, "request_id": "r"}', "missing field 'seq'"),
    ],
)
def test_unreadable_records_say_what_is_wrong(line: str, reason: str) -> None:
    problem = parse_line(line, "log.jsonl", 7)
    assert isinstance(problem, LogProblem)
    assert str(problem).startswith(f"log.jsonl:7: {reason}")


def _record(**changes: object) -> str:
    data = {
        "v": SCHEMA_VERSION,
        "request_id": "r",
        "seq": 0,
        "mode": "discover",
        "t": 0.0,
        "wall": 1.0,
        "src": "received",
        "dst": "preprocessed",
        "trigger": "preprocess",
        "worker_id": None,
        "decision": None,
        "detail": None,
    }
    data.update(changes)
    return json.dumps(data)


def test_a_good_record_parses_and_bad_fields_are_named() -> None:
    entry = parse_line(_record(), "log.jsonl", 1)
    assert isinstance(entry, LogEntry) and entry.location == "log.jsonl:1"
    assert json.loads(_record()) == entry.to_json_dict()
    assert parse_line("   ", "log.jsonl", 2) is None
    for changes, reason in [
        ({"seq": "0"}, "field 'seq' must be an integer"),
        ({"seq": True}, "field 'seq' must be an integer"),
        ({"seq": -1}, "field 'seq' must be 0 or more"),
        ({"t": None}, "field 't' must be an integer or a number"),
        ({"worker_id": 1.5}, "field 'worker_id' must be an integer or null"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ]:
        problem = parse_line(_record(**changes), "log.jsonl", 3)
        assert isinstance(problem, LogProblem), changes
        assert problem.reason.startswith(reason), (changes, problem.reason)


def test_reading_several_files_keeps_their_order_and_sources(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(_record() + "\n", encoding="utf-8")
    second.write_text(
        _record(seq=1, src="preprocessed", dst="cancelled", trigger="cancel") + "\n",
        encoding="utf-8",
    )
    log = load_log([first, second])
    assert [e.location for e in log.entries] == [f"{first}:1", f"{second}:1"]
    assert log.request("r").path == ["received", "preprocessed", "cancelled"]
    with pytest.raises(FileNotFoundError):
        load_log(tmp_path / "missing.jsonl")


def test_a_repeated_request_id_from_a_second_run_is_a_second_request(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    run = [_record(), _record(seq=1, src="preprocessed", dst="cancelled", trigger="cancel")]
    path.write_text("\n".join(run + run) + "\n", encoding="utf-8")
    log = load_log(path)
    assert list(log.requests()) == ["r", "r@2"]
    assert log.namesakes("r") == ["r", "r@2"]
    assert validate(log.requests()) == []
    with pytest.raises(KeyError, match="did you mean 'r@2'"):
        log.request("r@3")


# --- prefix hit rate ------------------------------------------------------------------------


def _routed(request_id: str, selections: list[dict[str, object]], **decision: object) -> str:
    chosen = selections[-1]["chosen"]
    data = {
        "request_id": request_id,
        "decode_worker_id": chosen,
        "prefill_worker_id": chosen,
        "disaggregated": False,
        "selections": selections,
        **decision,
    }
    return _record(
        request_id=request_id,
        seq=1,
        src="preprocessed",
        dst="routed",
        trigger="route",
        worker_id=chosen,
        decision=data,
    )


def _selection(policy: str, chosen: int, overlaps: dict[int, int], **inputs: object) -> dict:
    return {
        "leg": "agg",
        "policy": policy,
        "chosen": chosen,
        "candidates": [{"worker_id": w, "overlap_blocks": o} for w, o in overlaps.items()],
        "inputs": inputs,
    }


def test_the_prefix_hit_rate_comes_from_the_chosen_workers_overlap(tmp_path: Path) -> None:
    path = tmp_path / "kv.jsonl"
    lines = [
        # 64 tokens = 4 blocks of 16; the chosen worker caches 3 of them.
        _record(request_id="a"),
        _routed("a", [_selection("kv", 1, {1: 3, 2: 0})], prompt_tokens=64),
        # 40 tokens in blocks of 8 (recorded by the decision) = 5 blocks; 1 cached.
        _record(request_id="b"),
        _routed("b", [_selection("kv", 2, {1: 4, 2: 1}, block_size=8)], token_ids=[0] * 40),
        # Round robin looks nothing up: not counted, whatever the prompt.
        _record(request_id="c"),
        _routed("c", [_selection("round_robin", 1, {1: 0, 2: 0}, cursor=0)], prompt_tokens=64),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = summarize(load_log(path).requests())
    assert (summary.prefix_blocks_hit, summary.prefix_blocks) == (4, 9)
    assert summary.prefix_hit_rate == pytest.approx(4 / 9)
    assert "prefix hit rate: 44.4% (4 of 9 prompt blocks" in render_summary(summary)
    assert summary.final_states == {"routed": 3}
    assert "routed (in flight)" in render_summary(summary)
    # With another block size assumed, decision "a" has 2 blocks of 32 (both cached: capped).
    assert summarize(load_log(path).requests(), block_size=32).prefix_blocks == 2 + 5


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([1.0], 99) == 1.0
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile([float(i) for i in range(101)], 90) == 90.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
