"""Following a live log: new lines as they complete, across rotation and truncation, driven a
bounded number of polls with an injected sleep (no wall-clock waiting)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from interlock.inspect import LoadedLog, LogEntry, LogFollower, LogProblem, follow, summarize
from interlock.statemachines import JsonlSink, TransitionRecord


def _line(request_id: str, seq: int, src: str, dst: str, trigger: str) -> str:
    record = TransitionRecord(request_id, seq, "discover", float(seq), 1.0, src, dst, trigger)
    return json.dumps(record.to_json_dict()) + "\n"


START = ("received", "preprocessed", "preprocess")
END = ("preprocessed", "cancelled", "cancel")


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _seqs(items: list[LogEntry | LogProblem]) -> list[tuple[str, int, int]]:
    return [(e.request_id, e.seq, e.line) for e in items if isinstance(e, LogEntry)]


def test_the_follower_returns_lines_as_they_complete(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    follower = LogFollower(path)
    assert follower.poll() == []  # no file yet: wait for it
    _append(path, _line("a", 0, *START))
    assert _seqs(follower.poll()) == [("a", 0, 1)]
    assert follower.poll() == []
    whole = _line("a", 1, *END)
    _append(path, whole[:20])  # the writer is mid-line
    assert follower.poll() == []
    _append(path, whole[20:] + "not json\n")
    found = follower.poll()
    assert _seqs(found) == [("a", 1, 2)]
    assert [str(p).split(" (")[0] for p in found if isinstance(p, LogProblem)] == [
        f"{path}:3: not JSON"
    ]
    follower.close()


def test_the_follower_reads_the_old_file_out_then_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    follower = LogFollower(path)
    _append(path, _line("a", 0, *START))
    assert len(follower.poll()) == 1
    _append(path, _line("a", 1, *END))  # written just before the rotation
    os.replace(path, f"{path}.1")  # JsonlSink's rotation: rename, then a new file
    assert _seqs(follower.poll()) == [("a", 1, 2)]
    _append(path, _line("b", 0, *START))
    assert _seqs(follower.poll()) == [("b", 0, 1)]  # line numbers restart with the new file
    assert follower.rotations == 1
    follower.close()


def test_the_follower_rereads_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    follower = LogFollower(path)
    _append(path, _line("a", 0, *START) + _line("a", 1, *END))
    assert len(follower.poll()) == 2
    with open(path, "w", encoding="utf-8") as f:  # copytruncate-style rotation
        f.write(_line("b", 0, *START))
    assert _seqs(follower.poll()) == [("b", 0, 1)]
    assert follower.rotations == 1
    follower.close()


def test_follow_updates_the_summary_after_each_poll_that_read_something(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    _append(path, _line("a", 0, *START))
    writes = iter(
        [
            _line("a", 1, *END),
            "",  # a quiet interval: no update
            _line("b", 0, *START) + _line("b", 1, *END),
        ]
    )
    slept: list[float] = []
    summaries: list[tuple[int, dict[str, int]]] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        _append(path, next(writes))

    def on_update(log: LoadedLog) -> None:
        summary = summarize(log.requests())
        summaries.append((summary.requests, summary.final_states))

    log = follow(path, on_update, interval=0.25, sleep=sleep, iterations=4)
    assert slept == [0.25, 0.25, 0.25]  # no sleep after the last poll
    assert summaries == [
        (1, {"preprocessed": 1}),
        (1, {"cancelled": 1}),
        (2, {"cancelled": 2}),
    ]
    assert len(log.entries) == 4


def test_follow_keeps_whole_requests_across_a_sink_rotation(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    sink = JsonlSink(path, max_bytes=400, backups=3)
    lines = [("r", 0, *START), ("r", 1, *END), ("s", 0, *START), ("s", 1, *END)]
    pending = iter(lines)

    def write_one(_: float) -> None:
        request_id, seq, src, dst, trigger = next(pending)
        sink.offer(
            TransitionRecord(request_id, seq, "discover", float(seq), 1.0, src, dst, trigger)
        )
        sink._write_batch()

    write_one(0)
    final = follow(path, lambda log: None, sleep=write_one, iterations=4)
    assert sink.rotations >= 1
    assert {k: h.path for k, h in final.requests().items()} == {
        "r": ["received", "preprocessed", "cancelled"],
        "s": ["received", "preprocessed", "cancelled"],
    }
