"""The request lifecycle: each mode's graph, the compiled table against the `transitions`
specification, the hot-path `RequestFsm`, and its transition records and sinks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from transitions import Machine, MachineError

from interlock import IllegalTransition
from interlock.statemachines import (
    ALL_MODES,
    SCHEMA_VERSION,
    TERMINAL_STATES,
    JsonlSink,
    MemoryLog,
    Mode,
    RequestFsm,
    SpecModel,
    State,
    TransitionLog,
    TransitionRecord,
    Trigger,
    build_machine,
    compile_table,
    mermaid_diagram,
    mode_edges,
    mode_for,
    mode_states,
    read_jsonl,
    table_for,
)
from interlock.wire import RoutingDecision

EXECUTION_STATES = {State.PREFILLING, State.PREFILLED, State.DECODING, State.MIGRATED}
MODE_IDS = [mode.name for mode in ALL_MODES]


def counter_clock(start: float = 100.0, step: float = 0.5) -> Callable[[], float]:
    """A fake clock: each reading is ``step`` later than the one before."""
    ticks = itertools.count()
    return lambda: start + step * next(ticks)


def fake_log(capacity: int = 10_000) -> TransitionLog:
    return TransitionLog(MemoryLog(capacity), clock=counter_clock())


def spec_fire(model: SpecModel, machine: Machine, trigger: str) -> bool:
    """Fire ``trigger`` on the specification; False when it refuses.

    ``transitions`` raises MachineError for a known trigger with no edge from the current state;
    a trigger the mode never uses is not even an event of its machine.
    """
    if trigger not in machine.events:
        return False
    try:
        model.trigger(trigger)
    except MachineError:
        return False
    return True


def outgoing(mode: Mode, state: str) -> dict[str, str]:
    return {trigger: dst for (src, trigger), dst in table_for(mode).items() if src == state}


# --- Table against specification -----------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_compiled_table_holds_exactly_the_mode_edges(mode: Mode) -> None:
    expected = {(src, trigger): dst for trigger, src, dst in mode_edges(mode)}
    assert len(expected) == len(mode_edges(mode)), "two edges share a (state, trigger)"
    assert dict(table_for(mode)) == expected
    assert dict(compile_table(build_machine(mode, SpecModel()))) == expected


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_compiled_table_is_read_only(mode: Mode) -> None:
    with pytest.raises(TypeError):
        table_for(mode)[(State.RECEIVED, Trigger.FINISH)] = State.DONE  # type: ignore[index]


def test_compile_table_refuses_a_guarded_transition() -> None:
    machine = Machine(
        model=SpecModel(),
        states=["a", "b"],
        transitions=[{"trigger": "go", "source": "a", "dest": "b", "conditions": "ok"}],
        initial="a",
        auto_transitions=False,
    )
    with pytest.raises(ValueError, match="guarded or ambiguous"):
        compile_table(machine)


TRIGGERS = st.sampled_from([str(t) for t in Trigger])


@given(mode=st.sampled_from(ALL_MODES), triggers=st.lists(TRIGGERS, max_size=40))
def test_request_fsm_agrees_with_the_specification_on_every_step(
    mode: Mode, triggers: list[str]
) -> None:
    model = SpecModel()
    machine = build_machine(mode, model)
    log = fake_log()
    fsm = RequestFsm("req-1", mode, log)
    history: list[str] = []
    for trigger in triggers:
        before = fsm.state
        accepted = spec_fire(model, machine, trigger)
        assert fsm.can(trigger) == accepted, (mode.name, before, trigger, history)
        if accepted:
            assert fsm.fire(trigger) == model.state
        else:
            with pytest.raises(IllegalTransition):
                fsm.fire(trigger)
        history.append(f"{trigger}{'' if accepted else '(refused)'}")
        assert fsm.state == model.state, (mode.name, history)
        assert fsm.terminal == (fsm.state in TERMINAL_STATES)
    # Every accepted step, and only those, left a record.
    assert fsm.seq == len(log.memory)
    assert log.memory.path("req-1")[-1:] == ([fsm.state] if fsm.seq else [])


@st.composite
def walks(draw: st.DrawFn) -> tuple[Mode, list[str]]:
    """A mode and a path through its graph that only takes edges that exist."""
    mode = draw(st.sampled_from(ALL_MODES))
    state: str = State.RECEIVED
    taken: list[str] = []
    for _ in range(draw(st.integers(0, 30))):
        edges = sorted(outgoing(mode, state))
        if not edges:
            break
        trigger = draw(st.sampled_from(edges))
        taken.append(trigger)
        state = table_for(mode)[(state, trigger)]
    return mode, taken


@given(walks())
def test_legal_walks_end_in_the_same_state_on_both(walk: tuple[Mode, list[str]]) -> None:
    mode, triggers = walk
    model = SpecModel()
    machine = build_machine(mode, model)
    fsm = RequestFsm("walk", mode, fake_log())
    for trigger in triggers:
        assert spec_fire(model, machine, trigger)
        fsm.fire(trigger)
        assert fsm.state == model.state


# --- Graph shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_terminal_states_have_no_outgoing_edges(mode: Mode) -> None:
    for state in TERMINAL_STATES:
        assert outgoing(mode, state) == {}, (mode.name, state)


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_fail_and_cancel_leave_every_non_terminal_state(mode: Mode) -> None:
    non_terminal = [s for s in mode_states(mode) if s not in TERMINAL_STATES]
    assert non_terminal
    for state in non_terminal:
        edges = outgoing(mode, state)
        assert edges.get(Trigger.FAIL) == State.FAILED, (mode.name, state)
        assert edges.get(Trigger.CANCEL) == State.CANCELLED, (mode.name, state)


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_every_state_of_a_mode_is_reachable_and_can_end(mode: Mode) -> None:
    states = set(mode_states(mode))
    reached = {str(State.RECEIVED)}
    frontier = [str(State.RECEIVED)]
    while frontier:
        for dst in outgoing(mode, frontier.pop()).values():
            if dst not in reached:
                reached.add(dst)
                frontier.append(dst)
    assert reached == states
    assert State.DONE in states


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_only_executing_modes_have_execution_states(mode: Mode) -> None:
    present = EXECUTION_STATES & set(mode_states(mode))
    if mode.routing == "query_only":
        assert not mode.executes
        assert present == set()
        assert outgoing(mode, State.ROUTED).keys() == {Trigger.ANSWER, Trigger.FAIL, Trigger.CANCEL}
    else:
        assert mode.executes
        assert {State.PREFILLING, State.PREFILLED, State.DECODING} <= present


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_migrated_exists_only_with_migration(mode: Mode) -> None:
    assert (State.MIGRATED in mode_states(mode)) == mode.migration
    has_migrate = any(t == Trigger.MIGRATE for t, _, _ in mode_edges(mode))
    assert has_migrate == mode.migration
    if mode.migration:
        assert outgoing(mode, State.MIGRATED)[Trigger.ROUTE] == State.ROUTED


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_fall_back_only_in_discover_without_enforce_disagg(mode: Mode) -> None:
    has_fall_back = any(t == Trigger.FALL_BACK for t, _, _ in mode_edges(mode))
    assert has_fall_back == (mode.routing == "discover" and not mode.enforce_disagg)
    if has_fall_back:
        assert outgoing(mode, State.PREFILLING)[Trigger.FALL_BACK] == State.ROUTED


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_every_mode_answers_queries_from_routed(mode: Mode) -> None:
    assert outgoing(mode, State.ROUTED)[Trigger.ANSWER] == State.DONE


# --- Modes ------------------------------------------------------------------------------------


def test_mode_names() -> None:
    assert [m.name for m in ALL_MODES] == [
        "discover",
        "discover+migration",
        "discover+enforce_disagg",
        "discover+migration+enforce_disagg",
        "direct_to_known",
        "query_only",
    ]


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_mode_from_name_round_trips(mode: Mode) -> None:
    assert Mode.from_name(mode.name) == mode


@pytest.mark.parametrize("name", ["", "discover+", "migration+discover", "direct", "QUERY_ONLY"])
def test_mode_from_name_rejects_unknown_names_listing_the_modes(name: str) -> None:
    with pytest.raises(ValueError, match="unknown mode") as info:
        Mode.from_name(name)
    for mode in ALL_MODES:
        assert mode.name in str(info.value)


@pytest.mark.parametrize(
    ("routing", "migration_limit", "enforce_disagg", "expected"),
    [
        ("discover", 0, False, Mode("discover")),
        ("discover", 1, False, Mode("discover", migration=True)),
        ("discover", 5, True, Mode("discover", migration=True, enforce_disagg=True)),
        ("discover", 0, True, Mode("discover", enforce_disagg=True)),
        ("direct_to_known", 0, False, Mode("direct_to_known")),
        ("direct_to_known", 0, True, Mode("direct_to_known")),
        ("query_only", 0, False, Mode("query_only")),
        ("query_only", 0, True, Mode("query_only")),
    ],
)
def test_mode_for_maps_a_configuration_to_its_mode(
    routing: str, migration_limit: int, enforce_disagg: bool, expected: Mode
) -> None:
    mode = mode_for(routing, migration_limit, enforce_disagg)
    assert mode == expected
    assert mode in ALL_MODES


# --- RequestFsm and its records ---------------------------------------------------------------


def test_illegal_transition_names_the_request_the_state_and_the_legal_triggers() -> None:
    mode = Mode("discover")
    fsm = RequestFsm("req-42", mode, fake_log())
    fsm.fire(Trigger.PREPROCESS)
    with pytest.raises(IllegalTransition) as info:
        fsm.fire(Trigger.FINISH)
    error = info.value
    assert (error.request_id, error.state, error.trigger) == ("req-42", "preprocessed", "finish")
    message = str(error)
    for part in ("'req-42'", "'preprocessed'", "'finish'", "discover", "route", "fail", "cancel"):
        assert part in message, f"{part} missing from: {message}"
    assert fsm.state == State.PREPROCESSED
    assert fsm.seq == 1


def test_illegal_transition_from_a_terminal_state_says_so() -> None:
    fsm = RequestFsm("req-7", Mode("query_only"), fake_log())
    fsm.fire(Trigger.CANCEL)
    assert fsm.terminal
    with pytest.raises(IllegalTransition, match=r"terminal") as info:
        fsm.fire(Trigger.FAIL)
    assert info.value.state == "cancelled"


def test_a_refused_trigger_leaves_no_record() -> None:
    log = fake_log()
    fsm = RequestFsm("r", Mode("query_only"), log)
    with pytest.raises(IllegalTransition):
        fsm.fire(Trigger.START_DECODE)
    assert len(log.memory) == 0
    assert fsm.state == State.RECEIVED


def test_records_number_each_step_and_take_their_time_from_the_clock() -> None:
    mode = Mode("discover", migration=True)
    log = fake_log()
    fsm = RequestFsm("req-1", mode, log)
    decision = RoutingDecision(request_id="req-1", token_ids=(1,), decode_worker_id=4)
    steps = [
        (Trigger.PREPROCESS, {}),
        (Trigger.ROUTE, {"worker_id": 4, "decision": decision}),
        (Trigger.START_DECODE, {"worker_id": 4}),
        (Trigger.MIGRATE, {"worker_id": 4, "detail": "stream broke"}),
        (Trigger.ROUTE, {"worker_id": 5}),
        (Trigger.START_DECODE, {"worker_id": 5}),
        (Trigger.FINISH, {}),
    ]
    states = [str(State.RECEIVED)]
    for trigger, extra in steps:
        states.append(fsm.fire(trigger, **extra))
    records = log.memory.records("req-1")
    assert [r.seq for r in records] == list(range(len(steps)))
    assert [r.trigger for r in records] == [str(t) for t, _ in steps]
    assert [r.src for r in records] == states[:-1]
    assert [r.dst for r in records] == states[1:]
    assert [r.t for r in records] == [100.0 + 0.5 * i for i in range(len(steps))]
    assert {r.mode for r in records} == {"discover+migration"}
    assert {r.request_id for r in records} == {"req-1"}
    assert records[1].decision is decision
    assert [r.worker_id for r in records] == [None, 4, 4, 4, 5, 5, None]
    assert records[3].detail == "stream broke"
    assert log.memory.path("req-1") == states
    assert states[-1] == State.DONE


def test_requests_share_a_log_but_number_their_own_records() -> None:
    log = fake_log()
    first = RequestFsm("a", Mode("query_only"), log)
    second = RequestFsm("b", Mode("query_only"), log)
    for trigger in (Trigger.PREPROCESS, Trigger.ROUTE):
        first.fire(trigger)
        second.fire(trigger)
    first.fire(Trigger.ANSWER)
    grouped = log.memory.by_request()
    assert [r.seq for r in grouped["a"]] == [0, 1, 2]
    assert [r.seq for r in grouped["b"]] == [0, 1]
    assert log.memory.path("a") == ["received", "preprocessed", "routed", "done"]
    assert log.memory.path("missing") == []


async def test_the_default_clock_is_trio_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = TransitionLog(MemoryLog())
    fsm = RequestFsm("r", Mode("query_only"), log)
    fsm.fire(Trigger.PREPROCESS)
    await trio.sleep(7)
    fsm.fire(Trigger.ROUTE)
    first, second = log.memory.records()
    assert second.t - first.t == pytest.approx(7)


# --- MemoryLog --------------------------------------------------------------------------------


def record(
    request_id: str, seq: int, src: str = "received", dst: str = "failed"
) -> TransitionRecord:
    return TransitionRecord(request_id, seq, "discover", float(seq), 0.0, src, dst, "fail")


def test_memory_log_keeps_the_newest_and_counts_evictions() -> None:
    memory = MemoryLog(capacity=3)
    for seq in range(5):
        memory.offer(record("r", seq))
    assert len(memory) == 3
    assert memory.evicted == 2
    assert [r.seq for r in memory] == [2, 3, 4]
    assert [r.seq for r in memory.records()] == [2, 3, 4]
    memory.offer(record("r", 5))
    assert memory.evicted == 3
    assert [r.seq for r in memory.records("r")] == [3, 4, 5]


def test_memory_log_below_capacity_evicts_nothing() -> None:
    memory = MemoryLog(capacity=3)
    for seq in range(3):
        memory.offer(record("r", seq))
    assert memory.evicted == 0
    assert len(memory) == 3


def test_memory_log_path_and_clear() -> None:
    memory = MemoryLog()
    memory.offer(record("x", 0, "received", "preprocessed"))
    memory.offer(record("y", 0, "received", "cancelled"))
    memory.offer(record("x", 1, "preprocessed", "failed"))
    assert memory.path("x") == ["received", "preprocessed", "failed"]
    assert memory.path("y") == ["received", "cancelled"]
    assert [r.request_id for r in memory.records("x")] == ["x", "x"]
    memory.clear()
    assert len(memory) == 0
    assert memory.path("x") == []


def test_transition_log_fans_out_to_every_sink() -> None:
    extra = MemoryLog()
    log = TransitionLog(MemoryLog(), [extra], clock=counter_clock())
    fsm = RequestFsm("r", Mode("discover"), log)
    fsm.fire(Trigger.PREPROCESS)
    fsm.fire(Trigger.FAIL)
    assert log.memory.records() == extra.records()
    assert len(extra) == 2


# --- JsonlSink --------------------------------------------------------------------------------


async def test_jsonl_sink_writes_versioned_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "transitions.jsonl"
    sink = JsonlSink(path)
    log = TransitionLog(MemoryLog(), [sink], clock=counter_clock())
    decision = RoutingDecision(request_id="r", token_ids=(1, 2), decode_worker_id=9)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        fsm = RequestFsm("r", Mode("discover"), log)
        fsm.fire(Trigger.PREPROCESS)
        fsm.fire(Trigger.ROUTE, worker_id=9, decision=decision)
        await trio.testing.wait_all_tasks_blocked()
        fsm.fire(Trigger.START_DECODE, worker_id=9)
        fsm.fire(Trigger.FINISH, detail="stop")
        nursery.cancel_scope.cancel()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    for line in lines:
        json.loads(line)  # every line is a JSON document on its own
    rows = list(read_jsonl(path))
    assert rows == [r.to_json_dict() for r in log.memory.records()]
    assert {row["v"] for row in rows} == {SCHEMA_VERSION}
    assert [row["seq"] for row in rows] == [0, 1, 2, 3]
    assert [row["dst"] for row in rows] == ["preprocessed", "routed", "decoding", "done"]
    assert rows[1]["decision"]["decode_worker_id"] == 9
    assert rows[3]["detail"] == "stop"
    assert sink.written == 4
    assert sink.dropped == 0


async def test_jsonl_sink_drops_and_counts_when_its_buffer_is_full(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    sink = JsonlSink(path, buffer_size=2)
    for seq in range(5):
        sink.offer(record("r", seq))  # nothing drains the buffer yet
    assert sink.dropped == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        nursery.cancel_scope.cancel()
    assert [row["seq"] for row in read_jsonl(path)] == [0, 1]
    assert sink.written == 2
    assert sink.dropped == 3


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"v": 1, "seq": 0}\n\n  \n{"v": 1, "seq": 1}\n', encoding="utf-8")
    assert [row["seq"] for row in read_jsonl(path)] == [0, 1]


# --- Diagrams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_IDS)
def test_mermaid_diagram_draws_every_edge(mode: Mode) -> None:
    diagram = mermaid_diagram(mode)
    assert "stateDiagram-v2" in diagram
    assert mode.name in diagram
    for trigger, src, dst in mode_edges(mode):
        assert f"{src} --> {dst}: {trigger}" in diagram, (mode.name, trigger, src, dst)
    drawn = [line for line in diagram.splitlines() if "-->" in line and "[*]" not in line]
    assert len(drawn) == len(mode_edges(mode))
