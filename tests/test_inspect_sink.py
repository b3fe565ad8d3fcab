"""The JSONL sink rotates by size and never blocks the pipeline: records it cannot keep are
counted as dropped and the count is logged, never silently lost."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.inspect import load_log, rotated_paths, validate
from interlock.statemachines import JsonlSink, TransitionRecord
from interlock.wire import PreprocessedRequest


def _sizes(paths: list[str]) -> list[int]:
    return [os.path.getsize(name) for name in paths]


def _record(request_id: str, seq: int, detail: str | None = None) -> TransitionRecord:
    return TransitionRecord(
        request_id, seq, "discover", float(seq), 0.0, "a", "b", "preprocess", detail=detail
    )


async def _run_requests(sink: JsonlSink, count: int, *, migration: bool = False) -> list[str]:
    """Run ``count`` requests through a pipeline whose only file sink is ``sink``; return the
    ids, oldest first. With ``migration``, every request migrates once."""
    workers = [MockEngine(1, crash_after_tokens=2), MockEngine(2)] if migration else []
    workers = workers or [MockEngine(1)]
    config = PipelineConfig(migration_limit=1 if migration else 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        async with build_pipeline(
            config, Components(workers=workers, transition_sinks=[sink])
        ) as pipeline:
            for index in range(count):
                request = PreprocessedRequest(token_ids=[1, 2, 3, index + 4], max_tokens=4)
                async for _ in pipeline.generate(request):
                    pass
                if migration:
                    workers[0].restart()
        nursery.cancel_scope.cancel()
    return [f"req-{i}" for i in range(count)]


async def test_rotation_keeps_every_record_across_files(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "transitions.jsonl"
    sink = JsonlSink(path, max_bytes=3000, backups=50, buffer_size=10_000)
    ids = await _run_requests(sink, 12)
    assert sink.rotations >= 3
    paths = rotated_paths(path)
    assert len(paths) == sink.rotations + 1
    assert paths[-1] == str(path) and paths[0] == f"{path}.{sink.rotations}"
    assert all(0 < size <= 3000 for size in _sizes(paths))
    log = load_log(paths)
    assert not log.problems
    assert len(log.entries) == sink.written
    assert list(log.requests()) == ids  # oldest first, each whole
    assert validate(log.requests()) == []


async def test_rotation_deletes_the_oldest_beyond_backups(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "transitions.jsonl"
    sink = JsonlSink(path, max_bytes=2000, backups=2)
    await _run_requests(sink, 12)
    assert sink.rotations > 2
    assert sorted(os.listdir(tmp_path)) == [
        "transitions.jsonl",
        "transitions.jsonl.1",
        "transitions.jsonl.2",
    ]
    log = load_log(rotated_paths(path))
    assert not log.problems
    requests = log.requests()
    # The log now begins mid-way: only the first request left can be missing its head.
    assert "req-11" in requests and "req-0" not in requests
    first = next(iter(requests.values()))
    assert [v.request_id for v in validate(requests)] == ([] if first.complete else [first.key])
    assert all(h.complete for h in list(requests.values())[1:])


def test_a_record_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sink = JsonlSink(path, max_bytes=200, backups=5)
    sink.offer(_record("r", 0))
    sink.offer(_record("r", 1, detail="x" * 500))
    sink.offer(_record("r", 2))
    sink._write_batch()
    sizes = _sizes(rotated_paths(path))
    assert len(sizes) == 3 and sizes[1] > 500 and sizes[0] <= 200 and sizes[2] <= 200
    assert [e.seq for e in load_log(rotated_paths(path)).entries] == [0, 1, 2]


def test_backups_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sink = JsonlSink(path, max_bytes=300, backups=0)
    for seq in range(20):
        sink.offer(_record("r", seq))
    sink._write_batch()
    assert os.listdir(tmp_path) == ["t.jsonl"]
    assert sink.rotations > 0 and sink.written == 20
    assert os.path.getsize(path) <= 300


def test_an_existing_file_counts_towards_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("x" * 250 + "\n", encoding="utf-8")
    sink = JsonlSink(path, max_bytes=300, backups=1)
    sink.offer(_record("r", 0))
    sink._write_batch()
    assert (tmp_path / "t.jsonl.1").read_text(encoding="utf-8") == "x" * 250 + "\n"
    assert [e.seq for e in load_log(path).entries] == [0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_bytes": 0}, "max_bytes must be at least 1"), ({"backups": -1}, "backups must be")],
)
def test_bad_rotation_settings_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JsonlSink("t.jsonl", **kwargs)


def _drop_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "interlock.transitions" and "dropped" in r.getMessage()
    ]


async def test_drops_are_counted_and_logged_at_most_once_a_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="interlock.transitions")
    sink = JsonlSink(tmp_path / "t.jsonl", buffer_size=2)
    for seq in range(10):  # nothing drains the buffer: 8 dropped, within one instant
        sink.offer(_record("r", seq))
    assert sink.dropped == 8
    assert len(_drop_messages(caplog)) == 1  # the first drop, at once; the rest wait a second
    await trio.sleep(0.5)
    sink.offer(_record("r", 10))
    assert len(_drop_messages(caplog)) == 1
    await trio.sleep(0.6)
    sink.offer(_record("r", 11))
    messages = _drop_messages(caplog)
    assert len(messages) == 2
    assert "9 record(s) dropped since the last report, 10 in total" in messages[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        nursery.cancel_scope.cancel()
    assert sink.written == 2 and sink.dropped == 10
    assert len(_drop_messages(caplog)) == 2  # nothing new to report at the end


async def test_drops_outside_trio_are_reported_when_the_sink_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="interlock.transitions")
    sink = JsonlSink(tmp_path / "t.jsonl", buffer_size=1)

    def offer_without_a_clock() -> None:
        for seq in range(3):
            sink.offer(_record("r", seq))  # must not raise, even with no trio clock

    await trio.to_thread.run_sync(offer_without_a_clock)
    assert sink.dropped == 2
    assert _drop_messages(caplog) == []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        nursery.cancel_scope.cancel()
    assert len(_drop_messages(caplog)) == 1
    assert "2 in total" in _drop_messages(caplog)[0]


async def test_a_file_that_cannot_be_written_drops_records_instead_of_the_pipeline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="interlock.transitions")
    sink = JsonlSink(tmp_path / "no-such-dir" / "t.jsonl")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        for seq in range(3):
            sink.offer(_record("r", seq))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert (sink.written, sink.dropped) == (0, 3)
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert any("3 in total" in m for m in _drop_messages(caplog))


async def test_a_pipeline_log_that_migrates_reads_back_whole_after_rotation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "transitions.jsonl"
    sink = JsonlSink(path, max_bytes=4000, backups=20)
    await _run_requests(sink, 4, migration=True)
    assert sink.rotations >= 1 and sink.dropped == 0
    log = load_log(rotated_paths(path))
    assert validate(log.requests(), migration_limit=1) == []
    assert sum(h.count("migrate") for h in log.requests().values()) >= 1
