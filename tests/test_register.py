"""``interlock register``: a sidecar that holds an etcd lease for each third-party engine (vLLM)
while its ``/health`` answers, so that ``interlock serve --etcd`` finds vLLM engines as it finds
``interlock worker``s.

The flags are checked without I/O; the health/lease loop runs against a real etcd (started per
test as tests/test_etcd_discovery.py starts it; skipped when the binary is missing) and a small
real HTTP server standing in for an engine's ``/health``; end to end, real ``interlock worker
--openai-port`` engines, an ``interlock register`` process and an ``interlock serve --etcd``
process answer the official openai client. Leases are long (60 s) wherever a record must go:
it can then only go because it was revoked. Every wait polls its condition, bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from test_etcd_discovery import ETCD, Etcd, wait_for
from test_http_cli import _command

from interlock import ConfigError
from interlock.cli import build_parser, main
from interlock.discovery import (
    EtcdClient,
    EtcdError,
    EtcdOptions,
    WatchEvent,
    WorkerRecord,
    worker_key,
)
from interlock.discovery._engine_address import EngineAddress
from interlock.discovery._register import (
    EngineRegistration,
    RegisterSetup,
    register_engines,
    resolve_register,
)

TIMEOUT = 20
PREFIX = "reg"
#: Long enough that a record gone within a test's bound was revoked, not expired.
LONG_TTL = 60


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["register", *argv])


# -- flags -------------------------------------------------------------------------------------


def test_the_flags_become_one_openai_record_per_engine() -> None:
    setup = resolve_register(
        _parse(
            "--etcd",
            "http://etcd:2379",
            "--engine",
            "1=http://10.0.0.5:8000",
            "--engine",
            "2=http://10.0.0.6:8000/prefill",
            "--kv-replay",
            "2=tcp://10.0.0.6:5561",
            "--block-size",
            "32",
            "--etcd-prefix",
            "prod",
            "--etcd-ttl",
            "5",
            "--health-interval",
            "0.5",
            "--health-timeout",
            "2",
            "--unhealthy-after",
            "4",
        )
    )
    assert (setup.etcd_url, setup.prefix, setup.ttl) == ("http://etcd:2379", "prod", 5)
    assert (setup.health_interval, setup.health_timeout, setup.unhealthy_after) == (0.5, 2, 4)
    assert setup.records() == [
        WorkerRecord(worker_id=1, kind="openai", url="http://10.0.0.5:8000", block_size=32),
        WorkerRecord(
            worker_id=2,
            kind="openai",
            url="http://10.0.0.6:8000",
            role="prefill",
            block_size=32,
            kv_replay="tcp://10.0.0.6:5561",
        ),
    ]
    # What a frontend reads back is what was meant.
    for record in setup.records():
        assert WorkerRecord.from_json(record.to_json()) == record


def test_the_defaults() -> None:
    setup = resolve_register(_parse("--etcd", "http://e:2379", "--engine", "3=http://v:8000"))
    assert setup == RegisterSetup(
        etcd=EtcdOptions(url="http://e:2379", prefix="interlock"),
        engines=setup.engines,
        ttl=10,
        block_size=16,
        kv_replay={},
        health_interval=1.0,
        health_timeout=5.0,
        unhealthy_after=3,
    )


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--engine", "http://v:8000"], "no '=' between the engine id and its URL"),
        (["--engine", "1=v:8000"], "does not start with http:// or https://"),
        (["--engine", "1=http://a:1", "--engine", "1=http://b:1"], "have the same id"),
        (["--engine", "1=http://a:1", "--engine", "2=http://a:1"], "both point at http://a:1"),
        (["--engine", "1=http://a:1", "--kv-replay", "1=a:5561"], "the form is ID=ENDPOINT"),
        (["--engine", "1=http://a:1", "--kv-replay", "2=tcp://a:1"], "no --engine has id 2"),
        (
            [
                "--engine",
                "1=http://a:1",
                "--kv-replay",
                "1=tcp://a:1",
                "--kv-replay",
                "1=tcp://b:1",
            ],
            "has a --kv-replay already",
        ),
        (["--engine", "1=http://a:1", "--etcd-prefix", "/"], "--etcd-prefix must not be empty"),
    ],
)
def test_bad_flags_are_refused_with_what_to_fix(argv: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        resolve_register(_parse("--etcd", "http://e:2379", *argv))


def test_bad_flags_exit_2_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register", "--etcd", "etcd:2379", "--engine", "1=http://v:1"]) == 2
    assert "--etcd 'etcd:2379' is not a URL" in capsys.readouterr().err
    assert main(["register", "--etcd", "http://e:1", "--engine", "1=v:1"]) == 2
    assert "interlock register: --engine '1=v:1'" in capsys.readouterr().err
    for argv in (
        ["--engine", "1=http://v:1"],  # no --etcd
        ["--etcd", "http://e:1"],  # no --engine
        ["--etcd", "http://e:1", "--engine", "1=http://v:1", "--unhealthy-after", "0"],
        ["--etcd", "http://e:1", "--engine", "1=http://v:1", "--health-interval", "-1"],
    ):
        with pytest.raises(SystemExit) as exited:
            _parse(*argv)
        assert exited.value.code == 2, argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_unreachable_etcd_at_the_start_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["register", "--etcd", url, "--engine", "1=http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert f"interlock register: cannot reach etcd: etcd at {url}" in err


# -- the health/lease loop, against a real etcd ------------------------------------------------


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A real etcd of this test's own (as tests/test_etcd_discovery.py starts one)."""
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")
    server = Etcd(tmp_path / "etcd-data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@attrs.define
class HealthServer:
    """A stand-in for an engine's ``/health`` over real HTTP on loopback: answers the statuses
    of ``script`` in turn (None: never answers), then ``status``; counts the polls."""

    script: list[int | None] = attrs.field(factory=list)
    status: int = 200
    polls: int = 0
    url: str = ""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._answer, listeners)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                assert head.startswith(b"GET /health "), head
                self.polls += 1
                status = self.script.pop(0) if self.script else self.status
                if status is None:
                    await trio.sleep_forever()
                await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % status)


async def _events(client: EtcdClient, into: list[WatchEvent], *, task_status: Any) -> None:
    """Every change under the prefix, into ``into``, until etcd stops."""
    items, revision = await client.get_prefix(f"{PREFIX}/")
    assert items == []
    events = client.watch_prefix(f"{PREFIX}/", start_revision=revision + 1)
    task_status.started()
    with contextlib.suppress(EtcdError):
        async with aclosing(events):
            async for event in events:
                into.append(event)


@asynccontextmanager
async def registering(
    etcd: Etcd,
    *servers: HealthServer,
    on_registered: Callable[[EngineRegistration, int], None] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[list[EngineRegistration], list[WatchEvent], EtcdClient]]:
    """Health servers for engines 1, 2, ...; `register_engines` over them (polling every
    20 ms, deregistering after 3 failures, leases of 60 s); every change under the prefix."""
    events: list[WatchEvent] = []
    async with EtcdClient(etcd.url) as client, trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(server.serve)
        await nursery.start(functools.partial(_events, client, events))
        setup = RegisterSetup(
            etcd=EtcdOptions(url=etcd.url, prefix=PREFIX),
            engines=tuple(
                EngineAddress(n, server.url) for n, server in enumerate(servers, start=1)
            ),
            ttl=LONG_TTL,
            **({"health_interval": 0.02, "unhealthy_after": 3} | options),
        )
        registrations = await nursery.start(
            functools.partial(register_engines, client, setup, on_registered=on_registered)
        )
        yield registrations, events, client
        nursery.cancel_scope.cancel()


def _history(events: list[WatchEvent], worker_id: int) -> list[str]:
    key = worker_key(PREFIX, worker_id)
    return [event.kind for event in events if event.key == key]


async def test_a_healthy_engine_is_registered_and_cancelling_revokes_it(etcd: Etcd) -> None:
    server = HealthServer()
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client:
            async with registering(etcd, server, kv_replay={1: "tcp://v:5561"}) as (
                (registration,),
                events,
                _,
            ):
                await wait_for(lambda: _history(events, 1) == ["put"], "engine 1's record")
                record = WorkerRecord.from_json(events[0].value)
                assert record == WorkerRecord(
                    worker_id=1, kind="openai", url=server.url, kv_replay="tcp://v:5561"
                )
                # The watch may report the put before the registering task records it.
                await wait_for(lambda: registration.state == "registered", "the registration")
                assert registration.lease is not None
            # Cancelled: the lease is revoked on the way out, so the record is gone now.
            items, _ = await client.get_prefix(f"{PREFIX}/")
            assert items == []


async def test_an_engine_is_registered_only_once_its_health_answers(etcd: Etcd) -> None:
    server = HealthServer(script=[503, None, 503], status=200)
    polls_at_registration: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with registering(
            etcd,
            server,
            health_timeout=0.2,
            on_registered=lambda _, lease: polls_at_registration.append(server.polls),
        ) as ((registration,), events, _):
            await wait_for(lambda: registration.state == "registered", "the registration")
            # Two 503s and a poll without an answer came first; the fourth answered 200.
            assert polls_at_registration == [4]
            await wait_for(lambda: _history(events, 1) == ["put"], "engine 1's record")


async def test_failed_polls_in_a_row_revoke_and_health_registers_again(etcd: Etcd) -> None:
    # Registered at the first poll; three failures (the second without an answer) revoke;
    # the next 200 registers again.
    server = HealthServer(script=[200, 503, None, 500])
    with trio.fail_after(TIMEOUT):
        async with registering(etcd, server, health_timeout=0.2) as ((registration,), events, _):
            await wait_for(lambda: registration.registrations == 2, "a second registration")
            await wait_for(lambda: len(_history(events, 1)) == 3, "put, delete, put")
            assert _history(events, 1) == ["put", "delete", "put"]
            assert registration.deregistrations == 1 and registration.state == "registered"


async def test_fewer_failures_than_the_threshold_keep_the_record(etcd: Etcd) -> None:
    server = HealthServer(script=[200, 503, 503, 200, 503, 503])
    with trio.fail_after(TIMEOUT):
        async with registering(etcd, server) as ((registration,), events, _):
            await wait_for(lambda: server.polls >= 9, "the scripted polls and three more")
            assert registration.registrations == 1 and registration.deregistrations == 0
            assert _history(events, 1) == ["put"]


async def test_engines_are_independent(etcd: Etcd) -> None:
    failing, steady = HealthServer(), HealthServer()
    with trio.fail_after(TIMEOUT):
        async with registering(etcd, failing, steady) as (registrations, events, client):
            await wait_for(lambda: len(events) == 2, "both records")
            failing.status = 503
            await wait_for(lambda: _history(events, 1) == ["put", "delete"], "engine 1 revoked")
            items, _ = await client.get_prefix(f"{PREFIX}/")
            assert [WorkerRecord.from_json(i.value).url for i in items] == [steady.url]
            failing.status = 200
            await wait_for(lambda: _history(events, 1) == ["put", "delete", "put"], "engine 1")
            assert _history(events, 2) == ["put"]
            # The watch may report the put before the registering task counts it.
            await wait_for(
                lambda: [r.registrations for r in registrations] == [2, 1], "both counted"
            )


async def test_a_registration_etcd_refuses_is_tried_again(etcd: Etcd) -> None:
    server = HealthServer(status=503)
    with trio.fail_after(TIMEOUT):
        async with registering(etcd, server) as ((registration,), _, _):
            await wait_for(lambda: server.polls >= 2, "polls")
            etcd.stop()
            server.status = 200
            polls = server.polls
            await wait_for(lambda: server.polls >= polls + 3, "healthy polls while etcd is down")
            assert registration.registrations == 0
            etcd.start()
            await wait_for(lambda: registration.registrations == 1, "the registration")
        async with EtcdClient(etcd.url) as client:
            items, _ = await client.get_prefix(f"{PREFIX}/")
            assert items == []  # revoked on the way out


async def test_an_id_registered_by_another_is_named_and_replaced(
    etcd: Etcd, caplog: pytest.LogCaptureFixture
) -> None:
    server = HealthServer()
    worker = WorkerRecord(worker_id=1, host="10.0.0.9", port=7001)
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client, trio.open_nursery() as nursery:
            await client.put(worker_key(PREFIX, 1), worker.to_json())
            await nursery.start(server.serve)
            setup = RegisterSetup(
                etcd=EtcdOptions(url=etcd.url, prefix=PREFIX),
                engines=(EngineAddress(1, server.url),),
                ttl=LONG_TTL,
            )
            (registration,) = await nursery.start(
                functools.partial(register_engines, client, setup)
            )
            await wait_for(lambda: registration.registrations == 1, "the registration")
            items, _ = await client.get_prefix(f"{PREFIX}/")
            assert [WorkerRecord.from_json(i.value).url for i in items] == [server.url]
            nursery.cancel_scope.cancel()
    assert f"{PREFIX}/workers/1 is registered already, as" in caplog.text
    assert "engine 1 will replace it once healthy" in caplog.text


# -- end to end: worker engines, interlock register, interlock serve ---------------------------


async def _start(argv: list[str], log: Path, *, until: Callable[[str], bool]) -> tuple[Any, str]:
    """Start ``argv``; return it with its stdout so far, once ``until`` accepts that."""
    with log.open("ab") as stderr:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    text = ""
    while not until(text):
        chunk = await process.stdout.receive_some(65536)
        assert chunk, f"{argv[:4]} exited early:\n{log.read_text()}"  # noqa: ASYNC240
        text += chunk.decode()
    return process, text


async def _engine(tmp_path: Path, worker_id: int, openai_port: int = 0) -> tuple[Any, str]:
    """An ``interlock worker --openai-port`` engine; returns it and its root URL."""
    argv = [*_command(), "worker", "--id", str(worker_id), "--openai-port", str(openai_port)]
    argv += ["--zero-time", "--tokenizer", "builtin", "--log-level", "warning"]
    process, text = await _start(
        argv, tmp_path / f"engine-{worker_id}.log", until=lambda text: "\n" in text
    )
    return process, json.loads(text)["openai_url"]


async def _stop(process: Any, sig: int = signal.SIGTERM) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(sig)
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_serve_finds_registered_engines_drops_a_dead_one_and_takes_it_back(
    etcd: Etcd, tmp_path: Path
) -> None:
    processes: dict[str, Any] = {}

    async def records() -> dict[int, WorkerRecord]:
        items, _ = await client.get_prefix(f"{PREFIX}/workers/")
        return {r.worker_id: r for r in (WorkerRecord.from_json(i.value) for i in items)}

    try:
        with trio.fail_after(45):
            urls: dict[int, str] = {}
            outputs: dict[str, str] = {}

            async def engine(n: int) -> None:
                processes[f"engine {n}"], urls[n] = await _engine(tmp_path, n)

            async def start(name: str, argv: list[str], until: Callable[[str], bool]) -> None:
                processes[name], outputs[name] = await _start(
                    argv, tmp_path / f"{name}.log", until=until
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine, 1)
                nursery.start_soon(engine, 2)
            url_1, url_2 = urls[1], urls[2]
            register = [*_command(), "register", "--etcd", etcd.url, "--etcd-prefix", PREFIX]
            register += ["--engine", f"1={url_1}", "--engine", f"2={url_2}", "--etcd-ttl", "60"]
            register += ["--health-interval", "0.1", "--unhealthy-after", "2"]
            serve = [*_command(), "serve", "--port", "0", "--etcd", etcd.url]
            serve += ["--etcd-prefix", PREFIX, "--model-name", "mock"]
            serve += ["--router-mode", "round_robin"]
            async with trio.open_nursery() as nursery:
                # The frontend may start before the engines are registered: it follows etcd.
                nursery.start_soon(start, "register", register, lambda t: t.count("\n") >= 2)
                nursery.start_soon(start, "serve", serve, lambda t: "configuration:\n" in t)
            lines = sorted(
                (json.loads(x) for x in outputs["register"].splitlines()),
                key=lambda x: x["worker_id"],
            )
            assert lines == [
                {
                    "worker_id": n,
                    "kind": "openai",
                    "url": url,
                    "role": "agg",
                    "block_size": 16,
                    "key": f"{PREFIX}/workers/{n}",
                    "lease": lines[n - 1]["lease"],
                }
                for n, url in ((1, url_1), (2, url_2))
            ]
            url = outputs["serve"].split("listening on ")[1].split(" ")[0]

            def ask(n: int) -> int:
                """One chat through the official client; the engine that answered it."""
                with openai.OpenAI(
                    base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT
                ) as client:
                    answer = client.chat.completions.create(
                        model="mock",
                        messages=[{"role": "user", "content": f"question {n}"}],
                        max_tokens=4,
                        extra_body={"nvext": {"extra_fields": ["worker_id"]}},
                    )
                    assert answer.usage is not None and answer.usage.completion_tokens == 4
                    assert answer.model_extra is not None
                    return int(answer.model_extra["nvext"]["worker_id"]["decode_worker_id"])

            async def served_by(count: int) -> set[int]:
                return {await trio.to_thread.run_sync(ask, n) for n in range(count)}

            async with EtcdClient(etcd.url) as client, httpx.AsyncClient(base_url=url) as http:

                async def frontend_workers() -> list[int]:
                    workers: list[int] = (await http.get("/health")).json()["workers"]
                    return workers

                while await frontend_workers() != [1, 2]:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.05)
                assert await served_by(4) == {1, 2}

                # The engine dies: its record is revoked, and the frontend drops it.
                processes.pop("engine 1").kill()
                while set(await records()) != {2}:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.05)
                while await frontend_workers() != [2]:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert await served_by(4) == {2}

                # Back on the same URL: registered again, served again.
                port_1 = httpx.URL(url_1).port
                assert port_1 is not None
                processes["engine 1"], again = await _engine(tmp_path, 1, port_1)
                assert again == url_1
                while set(await records()) != {1, 2}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                while await frontend_workers() != [1, 2]:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert await served_by(4) == {1, 2}

                # SIGTERM revokes every lease (60 s: only a revocation is this quick).
                register = processes.pop("register")
                await _stop(register)
                assert register.returncode == 0
                assert await records() == {}
                log = (tmp_path / "register.log").read_text()
                assert "engine 1" in log and "deregistered" in log and "registered again" in log
    finally:
        for process in processes.values():
            await _stop(process)
