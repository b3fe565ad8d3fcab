"""Pipelines over `interlock worker` processes: real processes on 127.0.0.1, the real clock.

Each test starts its workers (zero-time or sped-up mock timing, so a test takes a second or
two), reads the port each printed in its JSON line, and builds a pipeline of `RemoteEngine`s
over them. Waits are bounded by ``trio.fail_after``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
from test_remote_workers_protocol import Events

from interlock import Components, NoWorkersAvailable, PipelineConfig, build_pipeline
from interlock.actors import GetWorkers
from interlock.engines import Role
from interlock.engines.mock import mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.kv import KvRemoved
from interlock.testing import check_invariants
from interlock.wire import (
    FrameParser,
    PreprocessedRequest,
    WorkerJoined,
    WorkerLeft,
    encode_frame,
)
from interlock.wire._frames import Goodbye, Hello, Start, Welcome

TIMEOUT = 20

#: A worker to start: its id, its role, and its flags.
Spec = tuple[int, Role, Sequence[str]]

_STANDALONE = "import sys; from interlock.engines.remote._cli import main; raise SystemExit(main())"


def _worker_command() -> list[str]:
    """``interlock worker`` once the top-level CLI has the command, else the same parser run
    standalone."""
    from interlock.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(["worker", "--id", "0"])
        except SystemExit:
            return [sys.executable, "-c", _STANDALONE]
    return [sys.executable, "-m", "interlock", "worker"]


WORKER = _worker_command()


@attrs.define
class WorkerProcess:
    """One ``interlock worker`` process and what it printed."""

    worker_id: int
    role: Role
    port: int
    process: trio.Process
    log: Path

    def engine(self, **kwargs: Any) -> RemoteEngine:
        options: dict[str, Any] = {"max_backoff": 0.1} | kwargs
        return RemoteEngine(
            "127.0.0.1", self.port, instance_id=self.worker_id, role=self.role, **options
        )

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def start_worker(
    tmp_path: Path, worker_id: int, *flags: str, role: Role = "agg", port: int = 0
) -> WorkerProcess:
    """Start a worker; return once it printed its JSON line (it is listening then)."""
    # Unique: a test may start the same worker id twice (a restart), and both logs matter.
    log = tmp_path / f"worker-{worker_id}-{time.monotonic_ns()}.log"
    argv = [*WORKER, "--id", str(worker_id), "--role", role, "--port", str(port), *flags]
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    line = b""
    with trio.fail_after(TIMEOUT):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise AssertionError(f"worker {worker_id} exited early:\n{log.read_text()}")
            line += chunk
    info = json.loads(line)
    assert info["worker_id"] == worker_id and info["host"] == "127.0.0.1"
    return WorkerProcess(worker_id, role, info["port"], process, log)


async def stop(worker: WorkerProcess) -> None:
    with trio.CancelScope(shield=True):
        if worker.process.returncode is None:
            worker.process.terminate()
            with trio.move_on_after(5):
                await worker.process.wait()
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
        if worker.process.stdout is not None:
            await worker.process.stdout.aclose()


@contextlib.asynccontextmanager
async def worker_processes(
    tmp_path: Path, specs: Sequence[Spec]
) -> AsyncIterator[list[WorkerProcess]]:
    """Start workers ``(id, role, flags)`` side by side; stop them all at the end."""
    started: dict[int, WorkerProcess] = {}

    async def one(worker_id: int, role: Role, flags: Sequence[str]) -> None:
        started[worker_id] = await start_worker(tmp_path, worker_id, *flags, role=role)

    try:
        async with trio.open_nursery() as nursery:
            for worker_id, role, flags in specs:
                nursery.start_soon(one, worker_id, role, flags)
        yield [started[worker_id] for worker_id, _, _ in specs]
    finally:
        for worker in started.values():
            await stop(worker)


async def generate(pipeline: Any, request: PreprocessedRequest) -> list[int]:
    tokens: list[int] = []
    async for output in pipeline.generate(request):
        tokens += output.token_ids
    return tokens


def prompt(n: int, length: int = 48) -> tuple[int, ...]:
    return tuple(1000 + (n * 7919 + i * 104_729) % 30_000 for i in range(length))


def worker_of(pipeline: Any, request_id: str) -> int:
    """The worker the request's latest leg went to."""
    starts = [r for r in pipeline.transition_log.records(request_id) if r.trigger == "start_decode"]
    worker_id: int = starts[-1].worker_id
    return worker_id


# -- serving -----------------------------------------------------------------------------------


async def test_a_pipeline_generates_over_tcp_against_worker_processes(tmp_path: Path) -> None:
    specs: list[Spec] = [(i, "agg", ["--zero-time"]) for i in (1, 2, 3)]
    results: dict[int, tuple[PreprocessedRequest, list[int]]] = {}
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, specs) as workers:
            engines = [w.engine() for w in workers]
            async with build_pipeline(PipelineConfig(), Components(workers=engines)) as pipeline:

                async def one(n: int) -> None:
                    request = PreprocessedRequest(
                        token_ids=prompt(n, 8 + n), max_tokens=1 + n % 23, request_id=f"r{n}"
                    )
                    results[n] = (request, await generate(pipeline, request))

                async with trio.open_nursery() as nursery:
                    for n in range(30):
                        nursery.start_soon(one, n)
                records = pipeline.transition_log.records()
                served_by = {worker_of(pipeline, f"r{n}") for n in range(30)}
    for request, tokens in results.values():
        assert request.max_tokens is not None
        assert tokens == mock_continuation(request.token_ids, request.max_tokens)
    assert len(results) == 30 and served_by == {1, 2, 3}
    check_invariants(records)


async def test_a_disaggregated_request_runs_over_tcp(tmp_path: Path) -> None:
    specs: list[Spec] = [(1, "prefill", ["--zero-time"]), (2, "decode", ["--zero-time"])]
    request = PreprocessedRequest(token_ids=prompt(1, 64), max_tokens=9, request_id="d")
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, specs) as (prefill, decode):
            components = Components(workers=[decode.engine()], prefill_workers=[prefill.engine()])
            async with build_pipeline(PipelineConfig(), components) as pipeline:
                tokens = await generate(pipeline, request)
                path = pipeline.transition_log.path("d")
    assert tokens == mock_continuation(request.token_ids, 9)
    assert "prefilling" in path and path[-1] == "done"


# -- faults ------------------------------------------------------------------------------------


async def test_a_worker_killed_mid_stream_is_migrated_from_with_every_token_once(
    tmp_path: Path,
) -> None:
    specs: list[Spec] = [(i, "agg", ["--speedup", "10"]) for i in (1, 2, 3)]
    request = PreprocessedRequest(token_ids=prompt(7), max_tokens=300, request_id="m")
    tokens: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, specs) as workers:
            by_id = {w.worker_id: w for w in workers}
            engines = [w.engine() for w in workers]
            config = PipelineConfig(migration_limit=2)
            async with build_pipeline(config, Components(workers=engines)) as pipeline:
                killed = None
                async for output in pipeline.generate(request):
                    tokens += output.token_ids
                    if killed is None and len(tokens) >= 10:
                        killed = worker_of(pipeline, "m")
                        by_id[killed].process.kill()  # SIGKILL: no goodbye, no final frame
                records = pipeline.transition_log.records()
                assert killed not in pipeline.workers
    assert tokens == mock_continuation(request.token_ids, 300)
    migrations = [r for r in records if r.trigger == "migrate"]
    assert [m.worker_id for m in migrations] == [killed]
    assert worker_of_records(records) != killed
    check_invariants(records, migration_limit=2)


def worker_of_records(records: list[Any]) -> int:
    worker_id: int = [r for r in records if r.trigger == "start_decode"][-1].worker_id
    return worker_id


async def test_a_crash_inside_a_worker_breaks_the_stream_and_migration_recovers(
    tmp_path: Path,
) -> None:
    specs: list[Spec] = [
        (1, "agg", ["--zero-time", "--crash-after-tokens", "5"]),
        (2, "agg", ["--zero-time"]),
    ]
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, specs) as workers:
            engines = [w.engine() for w in workers]
            events = Events(engines[0])
            config = PipelineConfig(migration_limit=1)
            async with build_pipeline(config, Components(workers=engines)) as pipeline:
                requests = [
                    PreprocessedRequest(token_ids=prompt(n), max_tokens=8, request_id=f"c{n}")
                    for n in range(4)
                ]
                for request in requests:
                    assert await generate(pipeline, request) == mock_continuation(
                        request.token_ids, 8
                    )
                await events.wait_for(WorkerLeft)
                # The process lives on (its connection too); the worker left routing.
                assert engines[0].connected and 1 not in pipeline.workers
                records = pipeline.transition_log.records()
    assert sum(r.trigger == "migrate" for r in records) == 1
    check_invariants(records, migration_limit=1)


async def test_cancelling_over_the_wire_frees_the_remote_slot(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, [(1, "agg", ["--speedup", "1"])]) as (worker,):
            engine = worker.engine()
            async with build_pipeline(PipelineConfig(), Components(workers=[engine])) as pipeline:
                long = PreprocessedRequest(token_ids=prompt(3), max_tokens=10_000)
                # Leaving the iteration early...
                async with contextlib.aclosing(pipeline.generate(long)) as outputs:
                    async for _ in outputs:
                        assert len((await engine.snapshot()).active) == 1
                        break
                await _until_idle(engine)
                # ...and cancelling the task that iterates.
                with trio.CancelScope() as scope:
                    async for _ in pipeline.generate(long):
                        assert len((await engine.snapshot()).active) == 1
                        scope.cancel()
                await _until_idle(engine)
                assert pipeline.stats.cancelled == 2 and pipeline.in_flight == 0


async def _until_idle(engine: RemoteEngine) -> None:
    # The cancel frame is queued on leaving the stream; the worker acts on it when it arrives.
    while (await engine.snapshot()).active:
        pass


async def test_a_garbage_frame_closes_only_that_connection(tmp_path: Path) -> None:
    hello = encode_frame(Hello(versions=(1,)))
    start = encode_frame(Start(stream=0, request=PreprocessedRequest(token_ids=(1, 2))))
    cases = [
        (b"\x00\x00\x00\x03abc", "not valid msgpack"),
        (b"\xff\xff\xff\xff", "over the 67108864-byte frame limit"),
        (hello + _frame(["teleport", {}]), "unknown frame tag 'teleport'"),
        (
            hello + encode_frame(Welcome(version=1, worker_id=9, role="agg", block_size=16)),
            "a frontend does not send 'welcome' frames",
        ),
        (hello + start + start, "stream 0 was started twice"),
    ]
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, [(1, "agg", ["--zero-time"])]) as (worker,):
            engine = worker.engine()
            async with build_pipeline(PipelineConfig(), Components(workers=[engine])) as pipeline:
                for garbage, reason in cases:
                    stream = await trio.open_tcp_stream("127.0.0.1", worker.port)
                    await stream.send_all(garbage)
                    received = await _read_until_closed(stream)
                    assert type(received[-1]) is Goodbye and reason in received[-1].reason
                request = PreprocessedRequest(token_ids=prompt(1), max_tokens=5)
                assert await generate(pipeline, request) == mock_continuation(prompt(1), 5)
                assert engine.connections == 1 and worker.process.returncode is None
    log = worker.log_text()
    for _, reason in cases:
        assert reason in log


def _frame(body: Any) -> bytes:
    packed: bytes = msgpack.packb(body)
    return len(packed).to_bytes(4, "big") + packed


async def _read_until_closed(stream: trio.SocketStream) -> list[Any]:
    parser = FrameParser()
    received: list[Any] = []
    while data := await stream.receive_some():
        received += parser.feed(data)
    await stream.aclose()
    return received


async def test_a_worker_restarted_on_the_same_port_is_reconnected_and_routed_to(
    tmp_path: Path,
) -> None:
    config = PipelineConfig(router_mode="kv")
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, [(1, "agg", ["--zero-time"])]) as (worker,):
            engine = worker.engine()
            events = Events(engine)
            async with build_pipeline(config, Components(workers=[engine])) as pipeline:
                first = PreprocessedRequest(token_ids=prompt(1, 64), max_tokens=4)
                assert await generate(pipeline, first) == mock_continuation(first.token_ids, 4)
                worker.process.kill()
                await events.wait_for(WorkerLeft)
                await pipeline.actors["discovery"].ask(GetWorkers())
                with pytest.raises(NoWorkersAvailable):
                    await generate(pipeline, first)
                again = await start_worker(tmp_path, 1, "--zero-time", port=worker.port)
                try:
                    await events.wait_for(WorkerJoined, count=2)
                    await pipeline.actors["discovery"].ask(GetWorkers())
                    second = PreprocessedRequest(token_ids=prompt(2, 64), max_tokens=4)
                    tokens = await generate(pipeline, second)
                    # The router reloaded the new process's (empty) cache, then indexed this.
                    snapshot = await engine.snapshot()
                    index = await pipeline.kv_blocks()
                finally:
                    await stop(again)
    assert tokens == mock_continuation(second.token_ids, 4)
    assert engine.connections == 2
    assert index.get(1, frozenset()) == _block_ids(snapshot) and _block_ids(snapshot)


def _block_ids(snapshot: Any) -> frozenset[int]:
    return frozenset(b.block_hash for stored in snapshot.kv_blocks for b in stored.blocks)


async def test_the_kv_index_mirrors_the_workers_caches(tmp_path: Path) -> None:
    # A small cache, so blocks are evicted (KvRemoved) as well as stored.
    flags = ["--zero-time", "--num-gpu-blocks", "40"]
    specs: list[Spec] = [(i, "agg", flags) for i in (1, 2, 3)]
    prefixes = [prompt(100 + f, 64) for f in range(3)]
    with trio.fail_after(TIMEOUT):
        async with worker_processes(tmp_path, specs) as workers:
            engines = [w.engine() for w in workers]
            removals = [Events(e) for e in engines]
            config = PipelineConfig(router_mode="kv")
            async with build_pipeline(config, Components(workers=engines)) as pipeline:

                async def one(n: int) -> None:
                    tokens = prefixes[n % 3] + prompt(n, n % 40)
                    request = PreprocessedRequest(token_ids=tokens, max_tokens=8 + n % 30)
                    assert request.max_tokens is not None
                    expected = mock_continuation(tokens, request.max_tokens)
                    assert await generate(pipeline, request) == expected

                async with trio.open_nursery() as nursery:
                    for n in range(40):
                        nursery.start_soon(one, n)
                index = await pipeline.kv_blocks()
                snapshots = [await e.snapshot() for e in engines]
    for snapshot in snapshots:
        assert index.get(snapshot.worker_id, frozenset()) == _block_ids(snapshot)
    assert sum(bool(_block_ids(s)) for s in snapshots) >= 2
    assert any(type(e) is KvRemoved for events in removals for e in events.seen)


# -- the command -------------------------------------------------------------------------------


async def test_the_worker_prints_one_json_line_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        worker = await start_worker(tmp_path, 4, "--zero-time")
        worker.process.send_signal(signal.SIGTERM)
        await worker.process.wait()
        assert worker.process.stdout is not None
        rest = b""
        while chunk := await worker.process.stdout.receive_some():
            rest += chunk
    assert worker.process.returncode == 0 and rest == b""


def test_the_worker_refuses_bad_flags_and_a_port_in_use() -> None:
    bad = subprocess.run(
        [*WORKER, "--id", "1", "--speedup", "0"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert bad.returncode == 2 and "--zero-time" in bad.stderr
    both = subprocess.run(
        [*WORKER, "--id", "1", "--speedup", "2", "--zero-time"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [*WORKER, "--id", "1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert busy.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert busy.stdout == ""
