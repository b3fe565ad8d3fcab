"""``interlock serve --processes N``: N frontend processes on one port under a supervisor.

Real processes on 127.0.0.1: ``interlock worker`` processes (remote workers, or mock engines
behind vLLM's HTTP surface publishing KV events over ZMQ), and ``interlock serve --processes
2`` over them. Which process answered is in each response's ``x-interlock-process`` header;
every wait polls a condition under a deadline; every process is stopped in a ``finally``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from helpers import frontend_parser, stop_processes
from hypothesis import given
from hypothesis import strategies as st
from test_drain import Stream, read_stream
from test_http_engines import _free_tcp_endpoint
from test_http_remote_workers import Serve

from interlock import ConfigError
from interlock.http import ModelRewrites
from interlock.http._cli import resolve
from interlock.http._processes import ChildSpec, child_seed

TIMEOUT = 60
WORKER_FLAGS = ["--tokenizer", "builtin", "--log-level", "warning"]
CHAT: dict[str, Any] = {
    "model": "mock",
    "messages": [{"role": "user", "content": "Which process answers?"}],
    "max_tokens": 4,
}


def setup_of(*argv: str):  # type: ignore[no-untyped-def]
    return resolve(frontend_parser().parse_args(list(argv)))


# -- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--processes", "0"], "--processes must be at least 1, got 0"),
        (
            ["serve", "--processes", "2"],
            "--processes 2 with in-process mock workers (--workers 4, --prefill-workers 0): "
            "each process would have mock workers of its own",
        ),
        (
            ["serve", "--processes", "2", "--remote-worker", "5=h:7001", "--workers", "1"],
            "--processes 2 with in-process mock workers (--workers 1,",
        ),
        (
            ["route", "--processes", "2", "--remote-worker", "1=h:7001", "--once", "{}"],
            "--processes 2 with --once",
        ),
        (
            ["route", "--processes", "2", "--engine", "1=http://h:1", "--ext-proc-port", "9002"],
            "--processes 2 with --ext-proc-port",
        ),
        (["serve", "--process-child", "{}"], "--process-child is internal"),
    ],
)
def test_processes_that_cannot_work_are_refused_naming_the_flags(
    argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        setup_of(*argv)
    assert str(caught.value).startswith(message), caught.value


def test_the_configuration_file_can_set_the_processes(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[server]\nprocesses = 3\n\n[workers]\nremote_workers = ["1=h:7001"]\n')
    assert setup_of("serve", "--config", str(config)).processes == 3
    # The flag wins over the file.
    assert setup_of("serve", "--config", str(config), "--processes", "1").processes == 1
    config.write_text('[server]\nprocesses = "3"\n')
    with pytest.raises(ConfigError, match=r"\[server\] processes must be a whole number"):
        setup_of("serve", "--config", str(config))


def test_the_processes_flag_wins_over_a_bad_processes_key_of_the_file(tmp_path: Path) -> None:
    # "The flag wins over the file": `_resolve_processes` reads [server] processes only when
    # --processes is not given, so a file whose key the flag replaces starts as before.
    # server_table now refuses processes = 0 whenever any reader (the API keys' too) reads
    # the table, so the flag no longer wins.
    config = tmp_path / "serve.toml"
    config.write_text('[server]\nprocesses = 0\n\n[workers]\nremote_workers = ["1=h:7001"]\n')
    assert setup_of("serve", "--config", str(config), "--processes", "1").processes == 1


def test_each_process_takes_its_share_of_the_frontend_wide_limits() -> None:
    spec = ChildSpec(1, 2, os.getpid(), listen_fd=-1, ready_fd=-1, lifeline_fd=-1)
    argv = ["serve", "--processes", "2", "--remote-worker", "1=h:7001"]
    argv += ["--max-inflight-per-worker", "5", "--max-queued-requests", "100"]
    argv += ["--metrics-port", "9100"]
    child = setup_of(*argv, "--process-child", spec.encode())
    assert child.process == spec
    assert child.config.max_inflight_per_worker == 3  # 5 / 2, rounded up
    assert child.config.max_queued_requests == 50
    assert child.metrics_port == 9101  # --metrics-port + the process's index
    supervisor = setup_of(*argv)
    assert supervisor.process is None
    assert supervisor.config.max_inflight_per_worker == 5


@given(seed=st.integers(-(2**70), 2**70), processes=st.integers(2, 64))
def test_each_process_has_a_seed_of_its_own_and_the_seed_repeats_them(
    seed: int, processes: int
) -> None:
    seeds = [child_seed(seed, index) for index in range(processes)]
    assert len(set(seeds)) == processes, seeds
    assert seeds == [child_seed(seed, index) for index in range(processes)]
    assert all(type(s) is int and s >= 0 for s in seeds)


def test_each_process_seeds_its_random_draws_with_its_own_seed() -> None:
    # With --processes N every child read the one router_seed: the first requests each child
    # took went to the same [[model_rewrites]] target and the same `random` pick. Both
    # generators are seeded from the config's router_seed (`Frontend`, `RandomPolicy`), which
    # each child now derives from its index.
    argv = ["serve", "--processes", "2", "--remote-worker", "1=h:7001", "--router-seed", "7"]
    children = [
        setup_of(*argv, "--process-child", ChildSpec(i, 2, os.getpid(), -1, -1, -1).encode())
        for i in range(2)
    ]
    seeds = [child.config.router_seed for child in children]
    assert seeds == [child_seed(7, 0), child_seed(7, 1)]
    assert setup_of(*argv).config.router_seed == 7  # the supervisor's, as given
    split = ModelRewrites.from_table(
        [{"name": "ab", "targets": [{"model_rewrite": "a"}, {"model_rewrite": "b"}]}]
    )
    draws = []
    for seed in seeds:
        rng = random.Random(seed)
        draws.append([split.choose("m", rng).target for _ in range(16)])  # type: ignore[union-attr]
    assert draws[0] != draws[1], draws


# -- real processes ----------------------------------------------------------------------------


async def _start(argv: list[str], log: Path, *, until: bytes = b"\n") -> tuple[trio.Process, str]:
    """Start ``python -m interlock ARGV``; return it with its stdout up to ``until``. Three
    interlock processes start per serve (the supervisor and its two children) on a shared
    box: the deadline is generous."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    text = b""
    with trio.fail_after(TIMEOUT):
        while until not in text:
            chunk = await process.stdout.receive_some(65536)
            assert chunk, f"{argv[0]} exited early:\n{log.read_text()}"  # noqa: ASYNC240
            text += chunk
    return process, text.decode()


async def _serve(argv: list[str], log: Path, processes: list[trio.Process]) -> Serve:
    process, text = await _start(argv, log, until=b"configuration:\n")
    processes.append(process)
    lines = text.splitlines()
    return Serve(process, lines[0].split("listening on ")[1].split(" ")[0], lines, log)


@asynccontextmanager
async def serving_over(
    tmp_path: Path, worker_flags: list[str], *flags: str
) -> AsyncIterator[Serve]:
    """`interlock worker` 1 and 2 with ``worker_flags``, and `interlock serve` over them."""
    processes: list[trio.Process] = []
    ports: dict[int, int] = {}

    async def worker(worker_id: int) -> None:
        process, line = await _start(
            ["worker", "--id", str(worker_id), "--port", "0", *worker_flags],
            tmp_path / f"worker-{worker_id}.log",
        )
        processes.append(process)
        ports[worker_id] = json.loads(line.splitlines()[0])["port"]

    try:
        argv = ["serve", "--port", "0", *flags]
        # The workers start side by side: one start-up's wait instead of two.
        async with trio.open_nursery() as nursery:
            for worker_id in (1, 2):
                nursery.start_soon(worker, worker_id)
        for worker_id in (1, 2):
            argv += ["--remote-worker", f"{worker_id}=127.0.0.1:{ports[worker_id]}"]
        yield await _serve(argv, tmp_path / "serve.log", processes)
    finally:
        await stop_processes(processes)


@asynccontextmanager
async def serving_over_engines(tmp_path: Path, *serve_flags: str) -> AsyncIterator[Serve]:
    """Two `interlock worker --openai-port 0` engines publishing KV events to the endpoint
    `interlock serve --processes 2 --kv-events-bind` binds (its supervisor, that is)."""
    bind = _free_tcp_endpoint()
    processes: list[trio.Process] = []
    urls: dict[int, str] = {}

    async def worker(worker_id: int) -> None:
        worker_argv = ["worker", "--id", str(worker_id), "--openai-port", "0", "--zero-time"]
        worker_argv += [*WORKER_FLAGS, "--kv-events-endpoint", bind]
        process, line = await _start(worker_argv, tmp_path / f"worker-{worker_id}.log")
        processes.append(process)
        info = json.loads(line.splitlines()[0])
        urls[info["worker_id"]] = info["openai_url"]

    try:
        argv = ["serve", "--port", "0", "--kv-events-bind", bind, *serve_flags]
        # The workers start side by side: one start-up's wait instead of two.
        async with trio.open_nursery() as nursery:
            for worker_id in (1, 2):
                nursery.start_soon(worker, worker_id)
        for worker_id in (1, 2):
            argv += ["--engine", f"{worker_id}={urls[worker_id]}"]
        yield await _serve(argv, tmp_path / "serve.log", processes)
    finally:
        await stop_processes(processes)


def _pids(serve: Serve) -> list[int]:
    line = next(line for line in serve.banner if line.strip().startswith("processes"))
    found = re.search(r"\(pids ([\d, ]+)\)", line)
    assert found, line
    return [int(pid) for pid in found.group(1).split(", ")]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def _wait_for(condition: Any, what: str) -> None:
    with trio.fail_after(TIMEOUT):
        while not condition():  # noqa: ASYNC110 (another process changes it: polling is the point)
            await trio.sleep(0.02)


async def _answered_by_each(url: str, processes: int) -> set[str]:
    """Send chats, each on a connection of its own, until every process answered one; the
    processes seen (the kernel decides which process accepts a connection)."""
    seen: set[str] = set()
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            while len(seen) < processes:
                answer = await client.post(
                    "/v1/chat/completions", json=CHAT, headers={"connection": "close"}
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"]
                seen.add(answer.headers["x-interlock-process"])
    return seen


async def test_two_processes_answer_on_one_port_and_a_killed_one_is_started_again(
    tmp_path: Path,
) -> None:
    flags = ["--zero-time", *WORKER_FLAGS]
    async with serving_over(tmp_path, flags, "--processes", "2") as serve:
        pids = _pids(serve)
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        assert any("worker 2 at 127.0.0.1:" in line for line in serve.banner)
        assert await _answered_by_each(serve.url, 2) == {"0", "1"}

        def with_the_openai_client() -> str:
            with openai.OpenAI(
                base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT
            ) as client:
                answer = client.chat.completions.create(**CHAT)
                return answer.choices[0].message.content or ""

        assert await trio.to_thread.run_sync(with_the_openai_client)

        os.kill(pids[1], signal.SIGKILL)
        await _wait_for(
            lambda: "process 1 serving again" in serve.log.read_text(), "process 1 to restart"
        )
        log = serve.log.read_text()
        assert f"process 1 (pid {pids[1]}) was killed by SIGKILL; starting it again" in log
        assert await _answered_by_each(serve.url, 2) == {"0", "1"}

        # The supervisor killed: its processes notice, drain and exit.
        restarted = int(re.findall(r"process 1 serving again \(pid (\d+)\)", log)[-1])
        serve.process.kill()
        await serve.process.wait()
        await _wait_for(lambda: not _alive(pids[0]) and not _alive(restarted), "the exits")
        assert "the supervisor (pid" in serve.log.read_text()


async def test_sigterm_drains_every_process_and_exits_zero(tmp_path: Path) -> None:
    # --speedup 1: about 3 s a stream, so that streams are in flight at the signal.
    flags = ["--speedup", "1", *WORKER_FLAGS]
    async with serving_over(tmp_path, flags, "--processes", "2") as serve:
        streams: list[Stream] = []
        processes: set[str] = set()

        async def one(client: httpx.AsyncClient, stream: Stream) -> None:
            await read_stream(client, len(streams), 500, stream)

        with trio.fail_after(TIMEOUT):
            async with AsyncExitStack() as clients, trio.open_nursery() as nursery:
                # A client (and a connection) per stream, until both processes hold one.
                while processes != {"0", "1"}:
                    client = await clients.enter_async_context(
                        httpx.AsyncClient(base_url=serve.url, timeout=TIMEOUT)
                    )
                    health = await client.get("/health")
                    processes.add(health.headers["x-interlock-process"])
                    stream = Stream()
                    streams.append(stream)
                    nursery.start_soon(one, client, stream)
                await _wait_for(lambda: all(s.started for s in streams), "the streams to start")
                serve.process.send_signal(signal.SIGTERM)
            code = await serve.process.wait()
        assert code == 0
        for stream in streams:
            assert stream.done and stream.finish_reason == "length" and not stream.errors
        log = serve.log.read_text()
        assert log.count("SIGTERM, stopping: draining") == 2
        assert log.count("drained:") == 2
        assert "all 2 processes exited" in log
        assert "starting it again" not in log


async def test_the_engines_kv_events_reach_every_process_router(tmp_path: Path) -> None:
    flags = ["--processes", "2", "--router-mode", "kv", "--router-temperature", "0"]
    async with serving_over_engines(tmp_path, *flags, "--metrics-port", "0") as serve:
        metrics = re.findall(r"process (\d): /metrics at (\S+)", "\n".join(serve.banner))
        assert [index for index, _ in metrics] == ["0", "1"]
        body = {
            "model": "mock",
            "messages": [{"role": "user", "content": "You are a signalling assistant. " * 30}],
            "max_tokens": 4,
            "nvext": {"extra_fields": ["worker_id"]},
        }
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            answer = await client.post(serve.url + "/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            owner = answer.json()["nvext"]["worker_id"]["decode_worker_id"]
            pattern = re.compile(
                rf'^interlock_router_kv_blocks\{{worker_id="{owner}"\}} (\S+)$', re.M
            )

            async def blocks(url: str) -> float:
                found = pattern.search((await client.get(url)).text)
                return float(found.group(1)) if found else 0.0

            # Only one process routed the request; both routers saw the engine cache it.
            with trio.fail_after(TIMEOUT):
                for _, url in metrics:
                    while await blocks(url) < 40:  # noqa: ASYNC110 (another process)
                        await trio.sleep(0.05)


async def test_a_process_that_cannot_start_stops_the_others_with_its_status(
    tmp_path: Path,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once closed
    log = tmp_path / "serve.log"
    argv = ["serve", "--port", "0", "--processes", "2", "--remote-worker", f"1=127.0.0.1:{port}"]
    argv += ["--worker-connect-timeout", "0.5"]  # not the 10 s default: nothing will answer
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        with trio.fail_after(TIMEOUT):
            code = await process.wait()
        assert code == 1
        text = log.read_text()
        assert "interlock serve: cannot reach a remote worker" in text
        assert "all 2 processes exited" in text
        assert process.stdout is not None
        assert b"listening on" not in await process.stdout.receive_some(65536)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
