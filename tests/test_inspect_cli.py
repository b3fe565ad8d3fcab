"""``interlock inspect`` on the command line: summary, timeline, validation, replay, graphs,
follow, filters and JSON; exit statuses; errors that say what to do."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_inspect_logs import write_fault_log

import interlock.inspect
from interlock.inspect import _cli, add_parser
from interlock.statemachines import ALL_MODES, Mode, mode_edges

ROOT = Path(__file__).resolve().parents[1]


def inspect(*argv: str) -> int:
    """Parse ``interlock inspect ARGV`` on a fresh parser (as cli.py will) and run it."""
    parser = argparse.ArgumentParser(prog="interlock")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return int(args.run(args))


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fault_log(tmp_path_factory.mktemp("logs") / "transitions.jsonl")


def _hand_made(path: Path, steps: list[tuple[str, str, str]], mode: str = "discover") -> Path:
    """A log of request ``bad`` taking ``steps`` (src, trigger, dst), one record each."""
    lines = []
    for seq, (src, trigger, dst) in enumerate(steps):
        worker = 1 if trigger in ("start_decode", "finish", "migrate") else None
        lines.append(
            json.dumps(
                {
                    "v": 1,
                    "request_id": "bad",
                    "seq": seq,
                    "mode": mode,
                    "t": seq * 0.5,
                    "wall": 1700000000.0 + seq,
                    "src": src,
                    "dst": dst,
                    "trigger": trigger,
                    "worker_id": worker,
                    "decision": None,
                    "detail": None,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


LEGAL_START = [("received", "preprocess", "preprocessed"), ("preprocessed", "route", "routed")]


# --- summary --------------------------------------------------------------------------------


def test_the_summary_is_tables_for_people(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path)) == 0
    out = capsys.readouterr().out
    for heading in ("5 request(s)", "Final state", "Mode", "Workers", "Time in state"):
        assert heading in out
    assert "migrations: 1 (1 request(s))" in out and "prefill fallbacks: 1" in out
    assert "failures: WorkerGone 1" in out
    assert "prefix hit rate: n/a" in out


def test_the_summary_as_json_for_scripts(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 5
    assert data["final_states"] == {"done": 3, "failed": 1, "cancelled": 1}
    assert data["workers"]["1"]["migrations"] == 1
    assert data["prefix_hit_rate"] is None
    assert set(data["durations"]["decoding"]) == {"count", "p50", "p90", "p99", "max"}


def test_filters_narrow_the_summary(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--json", "--state", "failed", "--state", "cancelled") == 0
    assert json.loads(capsys.readouterr().out)["final_states"] == {"failed": 1, "cancelled": 1}
    assert inspect(str(log_path), "--json", "--worker", "9", "--mode", "discover+migration") == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 3
    assert inspect(str(log_path), "--json", "--since", "2999-01-01T00:00:00Z") == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 0


def test_a_bad_filter_is_an_argument_error(log_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_:
        inspect(str(log_path), "--since", "last tuesday")
    assert exit_.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inspect(str(log_path), "--state", "finished")


def test_stdin_and_several_files_are_read_in_order(
    log_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(log_path.read_text(encoding="utf-8")))
    assert inspect("-", "--json") == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 5
    assert inspect(str(log_path), str(log_path), "--json") == 0
    # The second copy repeats every id: a second run's requests, not one request twice.
    assert json.loads(capsys.readouterr().out)["requests"] == 10


def test_rotated_backups_are_read_first(tmp_path: Path, capsys: Any) -> None:
    lines = write_fault_log(tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "t.jsonl.2").write_text("".join(lines[:10]), encoding="utf-8")
    (tmp_path / "t.jsonl.1").write_text("".join(lines[10:20]), encoding="utf-8")
    (tmp_path / "t.jsonl").write_text("".join(lines[20:]), encoding="utf-8")
    assert inspect(str(tmp_path / "t.jsonl"), "--rotated", "--validate") == 0
    assert "5 request(s): every path is legal" in capsys.readouterr().out
    assert inspect(str(tmp_path / "t.jsonl"), "--validate") == 1  # without the backups


def test_unreadable_lines_go_to_stderr_with_their_numbers(tmp_path: Path, capsys: Any) -> None:
    path = write_fault_log(tmp_path / "t.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"v": 2, "request_id": "from-the-future"}'
    lines.extend(["oops"] * 25)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert inspect(str(path)) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == (
        f"{path}:3: schema version 2 is not supported: this interlock reads version 1 (see "
        "docs/transition-logs.md); inspect the log with the interlock version that wrote it; "
        "line skipped"
    )
    assert err[1].startswith(f"{path}:{len(lines) - 24}: not JSON")
    assert len(err) == 21 and "more unreadable lines" in err[-1]
    assert "26 unreadable line(s) skipped" in captured.out
    assert inspect(str(path), "--validate") == 1  # a log that cannot be read does not validate


def test_a_missing_file_or_no_file_is_exit_2(tmp_path: Path, capsys: Any) -> None:
    assert inspect(str(tmp_path / "nope.jsonl")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert inspect() == 2
    assert "give the transition log" in capsys.readouterr().err
    assert inspect(str(tmp_path / "nope.jsonl"), "--format", "dot") == 2
    assert "--format and --output go with --graph" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--graph", "discover", "--json"], "drop --json"),
        (["LOG", "--migration-limit", "1"], "go with --validate"),
        (["LOG", "--allow-unfinished"], "go with --validate"),
        (["LOG", "--request", "r", "--state", "done"], "name their request already"),
        (["LOG", "--replay-decision", "r", "--until", "0"], "name their request already"),
    ],
)
def test_options_that_do_not_go_together_are_refused(
    argv: list[str], message: str, capsys: Any
) -> None:
    assert inspect(*argv) == 2
    assert message in capsys.readouterr().err


# --- one request ----------------------------------------------------------------------------


def test_request_shows_the_timeline_and_why(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--request", "fell-back") == 0
    out = capsys.readouterr().out
    words = " ".join(out.split())  # the why column wraps
    assert "request fell-back · mode discover+migration · done" in out
    assert "worker 9 refuses new requests" in words
    assert "agg leg: round_robin chose worker 2" in out
    assert re.search(r"▶\s+2\s", out)


def test_request_as_json_carries_spans_and_records(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--request", "migrated", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["final_state"] == "done" and "migrated" in data["path"]
    assert data["spans"][-1]["duration"] is None
    assert data["records"][0]["line"] == 1 and data["records"][0]["source"] == str(log_path)


def test_an_unknown_request_suggests_close_ids(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--request", "migrate") == 2
    assert "did you mean 'migrated'" in capsys.readouterr().err


# --- validate -------------------------------------------------------------------------------


def test_validate_passes_a_pipeline_log(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--validate", "--migration-limit", "1") == 0
    assert "5 request(s): every path is legal" in capsys.readouterr().out


def test_validate_catches_a_hand_made_illegal_path(tmp_path: Path, capsys: Any) -> None:
    path = _hand_made(
        tmp_path / "bad.jsonl", [*LEGAL_START, ("routed", "finish", "done")], mode="discover"
    )
    assert inspect(str(path), "--validate") == 1
    out = capsys.readouterr().out
    assert f"{path}:1-3: request 'bad'" in out
    assert "#2 routed --finish--> done worker=1 is not an edge of mode 'discover'" in out
    assert "1 of 1 request(s) break an invariant" in out
    assert inspect(str(path), "--validate", "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["violations"][0]["records"] == [f"{path}:{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("steps", "mode", "flags", "message"),
    [
        (
            [*LEGAL_START, ("routed", "start_decode", "decoding")],
            "query_only",
            (),
            "not an edge of mode 'query_only'",
        ),
        (
            [
                *LEGAL_START,
                ("routed", "start_decode", "decoding"),
                ("decoding", "migrate", "migrated"),
                ("migrated", "route", "routed"),
                ("routed", "start_decode", "decoding"),
                ("decoding", "migrate", "migrated"),
                ("migrated", "route", "routed"),
                ("routed", "start_decode", "decoding"),
                ("decoding", "finish", "done"),
            ],
            "discover+migration",
            ("--migration-limit", "1"),
            "migration #2 exceeds migration_limit=1",
        ),
        (LEGAL_START, "discover", (), "ends in 'routed', which is not terminal"),
        ([("received", "preprocess", "preprocessed")], "discover+bogus", (), "unknown mode"),
    ],
)
def test_validate_names_the_broken_invariant(
    tmp_path: Path,
    capsys: Any,
    steps: list[tuple[str, str, str]],
    mode: str,
    flags: tuple[str, ...],
    message: str,
) -> None:
    path = _hand_made(tmp_path / "bad.jsonl", steps, mode=mode)
    assert inspect(str(path), "--validate", *flags) == 1
    assert message in capsys.readouterr().out


def test_allow_unfinished_accepts_a_log_still_being_written(tmp_path: Path, capsys: Any) -> None:
    path = _hand_made(tmp_path / "live.jsonl", LEGAL_START)
    assert inspect(str(path), "--validate", "--allow-unfinished") == 0
    assert inspect(str(path), "--json") == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[-1] or "{}") is not None


# --- replay ---------------------------------------------------------------------------------


def test_replay_decision_recomputes_and_matches(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--replay-decision", "migrated") == 0
    out = capsys.readouterr().out
    assert out.count(" match\n") == 4  # four legs
    assert "all 4 selection(s) of 2 decision(s) replay to the recorded workers" in out
    assert inspect(str(log_path), "--replay-decision", "queried", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matches"] is True
    leg = data["decisions"][0]["legs"][0]
    assert leg["replayed"] == leg["recorded"] and leg["matches"] is True


def test_replay_decision_reports_a_tampered_record(tmp_path: Path, capsys: Any) -> None:
    path = write_fault_log(tmp_path / "t.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    route = next(r for r in rows if r["request_id"] == "queried" and r["trigger"] == "route")
    route["decision"]["selections"][0]["chosen"] = 5  # the policy chose 4
    route["decision"]["decode_worker_id"] = 5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert inspect(str(path), "--replay-decision", "queried") == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "does not match" in out
    assert "the record names worker 4, the decision decode worker 5" in out


def test_replay_decision_without_decisions_is_exit_2(tmp_path: Path, capsys: Any) -> None:
    path = _hand_made(tmp_path / "t.jsonl", [("received", "cancel", "cancelled")])
    assert inspect(str(path), "--replay-decision", "bad") == 2
    assert "no routing decision to replay" in capsys.readouterr().out


# --- graphs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [m.name for m in ALL_MODES])
def test_graph_as_dot_has_every_edge_of_the_mode(mode: str, capsys: Any) -> None:
    assert inspect("--graph", mode, "--format", "dot") == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph")
    for trigger, src, dst in mode_edges(Mode.from_name(mode)):
        edge = re.search(rf'"{src}" -> "{dst}" \[label="([^"]*)"\]', out)
        assert edge is not None and trigger in edge.group(1).split(" | "), (trigger, src, dst)


def test_graph_as_mermaid_comes_from_the_transitions_machine(capsys: Any) -> None:
    assert inspect("--graph", "discover+migration") == 0
    out = capsys.readouterr().out
    assert "stateDiagram-v2" in out
    assert "migrated --> routed: route" in out
    assert inspect("--graph", "query_only") == 0
    assert "decoding" not in capsys.readouterr().out


def test_graph_to_a_file(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "g.dot"
    assert inspect("--graph", "discover", "--format", "dot", "-o", str(target)) == 0
    assert target.read_text(encoding="utf-8").startswith("digraph")
    assert f"wrote {target}" in capsys.readouterr().out


def test_png_without_dot_says_to_install_graphviz(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot here
    monkeypatch.chdir(tmp_path)
    assert inspect("--graph", "discover", "--format", "png") == 2
    assert "install graphviz" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_png_runs_dot_when_it_exists(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    # A stand-in for Graphviz: records its arguments and input, writes the -o file.
    fake.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncat > "$(dirname "$0")/input"\n'
        'printf PNG > "$3"\n',
        encoding="utf-8",
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.chdir(tmp_path)
    assert inspect("--graph", "discover+migration", "--format", "png") == 0
    assert (tmp_path / "discover+migration.png").read_text() == "PNG"
    assert (fake.parent / "args").read_text().split() == ["-Tpng", "-o", "discover+migration.png"]
    assert (fake.parent / "input").read_text().startswith("digraph")
    assert "wrote discover+migration.png" in capsys.readouterr().out


def test_graph_takes_no_log(log_path: Path, capsys: Any) -> None:
    assert inspect(str(log_path), "--graph", "discover") == 2
    assert "drop the LOG files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inspect("--graph", "discover+everything")


# --- follow ---------------------------------------------------------------------------------


def test_follow_prints_the_summary_as_the_log_grows(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, log_path: Path
) -> None:
    live = tmp_path / "live.jsonl"
    lines = log_path.read_text(encoding="utf-8").splitlines(True)
    live.write_text("".join(lines[:10]), encoding="utf-8")
    real_follow = _cli.follow

    def bounded(path: str, on_update: Any, *, interval: float) -> Any:
        def sleep(_: float) -> None:
            with open(live, "a", encoding="utf-8") as f:
                f.write("".join(lines[10:]))

        return real_follow(path, on_update, interval=interval, sleep=sleep, iterations=2)

    monkeypatch.setattr(_cli, "follow", bounded)
    assert inspect(str(live), "--follow", "--json") == 0
    updates = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [u["requests"] for u in updates] == [1, 5]
    assert inspect(str(live), "--follow", "--state", "failed") == 0
    assert "1 request(s)" in capsys.readouterr().out


def test_follow_stops_quietly_on_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "follow", interrupted)
    assert inspect(str(tmp_path / "live.jsonl"), "--follow") == 0
    assert inspect("-", "--follow") == 2
    assert "one log file" in capsys.readouterr().err


# --- the command and its documentation ------------------------------------------------------


def test_every_option_is_documented() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices["inspect"]
    documented = (ROOT / "docs" / "inspecting.md").read_text(encoding="utf-8")
    for action in sub._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}" in documented, f"{option} is not in docs/inspecting.md"


def test_the_public_surface_is_pinned() -> None:
    assert sorted(interlock.inspect.__all__) == sorted(
        [
            "GRAPH_FORMATS",
            "DecisionReplay",
            "DurationStats",
            "GraphUnavailable",
            "LegReplay",
            "LoadedLog",
            "LogEntry",
            "LogFollower",
            "LogProblem",
            "RequestFilter",
            "RequestHistory",
            "StateSpan",
            "Summary",
            "Violation",
            "WorkerCounts",
            "add_parser",
            "follow",
            "graph_source",
            "load_log",
            "parse_line",
            "parse_time",
            "render_png",
            "render_replay",
            "render_summary",
            "render_timeline",
            "render_violations",
            "replay_decision",
            "replay_decisions",
            "rotated_paths",
            "summarize",
            "validate",
        ]
    )
    for name in interlock.inspect.__all__:
        assert hasattr(interlock.inspect, name)


def _wired() -> bool:
    from interlock import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "inspect" in commands.choices


@pytest.mark.skipif(not _wired(), reason="interlock/cli.py does not register `inspect` yet")
def test_python_dash_m_interlock_inspect(log_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "interlock", "inspect", str(log_path), "--validate"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "every path is legal" in result.stdout


def test_dot_from_transitions_graphviz_engine_when_installed(capsys: Any) -> None:
    pytest.importorskip("graphviz")
    assert inspect("--graph", "discover+migration", "--format", "dot") == 0
    out = capsys.readouterr().out
    assert "digraph" in out and "migrated" in out
