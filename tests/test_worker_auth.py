"""Worker authentication: a worker with a shared secret serves only frontends that prove they
know it (HMAC challenge-response; the secret never crosses the wire, a recorded handshake does
not replay), and proves it knows it too; no secret on either side changes nothing.

In-process tests run `RemoteEngine` against the worker's real connection handler over
in-memory streams (virtual time); the end runs ``interlock serve`` and ``interlock worker``
processes with the flags and the environment variable.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from helpers import frontend_parser
from test_http_cli import _command
from test_http_remote_workers import CHAT, serving_over
from test_remote_workers import WORKER, start_worker, stop
from test_remote_workers_heartbeat import Worker, connected
from test_remote_workers_protocol import collect

from interlock import ConfigError
from interlock.engines import EngineContext, WorkerRecord, engine_from_record
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.engines.remote import RemoteEngine, WorkerAuthError, serve_worker
from interlock.engines.remote._auth import (
    SECRET_ENV,
    frontend_proof,
    load_secret,
    new_nonce,
    worker_proof,
)
from interlock.engines.remote._connection import FrameConnection
from interlock.http._cli import resolve
from interlock.wire import PreprocessedRequest, encode_frame
from interlock.wire._frames import PROTOCOL_VERSION, Auth, Challenge, Goodbye, Hello, Welcome

SECRET = b"0123456789abcdef-the-shared-secret"
OTHER = b"fedcba9876543210-another-secret!!"
REQUEST = PreprocessedRequest(token_ids=tuple(range(100, 140)), max_tokens=6)


def engine_for(worker: Worker, secret: bytes | None) -> RemoteEngine:
    return RemoteEngine(
        "worker", 1, instance_id=1, worker_secret=secret, open_connection=worker.connect
    )


@asynccontextmanager
async def worker_with(secret: bytes | None) -> AsyncIterator[Worker]:
    async with Worker(MockEngine(1, timing=MockTiming.zero()), secret=secret).running() as worker:
        yield worker


# -- the handshake, in-process ----------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, None], ids=["both-with-the-secret", "neither"])
async def test_a_frontend_with_the_workers_secret_is_served(
    secret: bytes | None, autojump_clock: trio.testing.MockClock
) -> None:
    async with worker_with(secret) as worker:
        engine = engine_for(worker, secret)
        async with connected(engine):
            outputs = await collect(engine, REQUEST)
            assert engine._link is not None
            welcome = engine._link.welcome
            assert welcome.version == PROTOCOL_VERSION
            assert (welcome.proof is not None) == (secret is not None)
    assert [t for o in outputs for t in o.token_ids] == mock_continuation(REQUEST.token_ids, 6)


async def test_a_frontend_without_the_secret_is_refused_with_the_fix(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with worker_with(SECRET) as worker:
        with pytest.raises(WorkerAuthError) as caught:
            await engine_for(worker, None).run()
        await trio.sleep(1)  # the worker logs the refusal
    assert str(caught.value) == (
        "the worker at worker:1 requires a secret; give --worker-secret-file PATH (or "
        "INTERLOCK_WORKER_SECRET) with the worker's secret (RemoteEngine(worker_secret=...) in "
        "Python)"
    )
    assert "the frontend gave up the handshake: this frontend has no secret" in caplog.text


async def test_a_wrong_secret_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with worker_with(SECRET) as worker:
        with pytest.raises(WorkerAuthError) as caught:
            await engine_for(worker, OTHER).run()
    assert str(caught.value).startswith(
        "the worker at worker:1 refused this frontend: authentication failed: the frontend's "
        "proof does not match this worker's secret; give the frontend the worker's secret"
    )


async def test_a_frontend_with_a_secret_refuses_a_worker_without_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with worker_with(None) as worker:
        with pytest.raises(WorkerAuthError, match="runs without a secret, but this frontend has"):
            await engine_for(worker, SECRET).run()


async def test_a_worker_that_cannot_prove_the_secret_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An impostor that challenges like a worker but has no secret: it can take the
    frontend's proof, not make its own."""
    taken: list[Auth] = []

    async def impostor(stream: trio.abc.Stream) -> None:
        conn = FrameConnection(stream, "frontend")
        hello = await conn.receive()
        assert type(hello) is Hello
        await stream.send_all(encode_frame(Challenge(version=2, nonce=new_nonce())))
        auth = await conn.receive()
        taken.append(auth)
        # Replays the frontend's own proof as its own: the labels differ, so it fails.
        welcome = Welcome(version=2, worker_id=1, role="agg", block_size=16, proof=auth.proof)
        await stream.send_all(encode_frame(welcome))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:

        async def connect(host: str, port: int) -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(impostor, theirs)
            await trio.lowlevel.checkpoint()
            return ours

        engine = RemoteEngine(
            "impostor", 1, instance_id=1, worker_secret=SECRET, open_connection=connect
        )
        with pytest.raises(WorkerAuthError, match="did not prove it knows the secret itself"):
            await engine.run()
        nursery.cancel_scope.cancel()
    assert len(taken) == 1 and SECRET not in msgpack.packb([taken[0].nonce, taken[0].proof])


async def _handshake_by_hand(
    connect: Callable[[str, int], Awaitable[trio.abc.Stream]],
    answer: Callable[[Challenge], Auth],
) -> tuple[Challenge, Auth, Any]:
    """Send hello, answer the challenge with ``answer(challenge)``; what came back."""
    stream = await connect("worker", 1)
    conn = FrameConnection(stream, "worker")
    await stream.send_all(encode_frame(Hello(versions=(1, 2))))
    challenge = await conn.receive()
    assert type(challenge) is Challenge and challenge.version == 2
    auth = answer(challenge)
    await stream.send_all(encode_frame(auth))
    reply = await conn.receive()
    await conn.aclose()
    return challenge, auth, reply


async def test_a_replayed_handshake_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    def honest(challenge: Challenge) -> Auth:
        nonce = new_nonce()
        return Auth(nonce=nonce, proof=frontend_proof(SECRET, 2, challenge.nonce, nonce))

    async with worker_with(SECRET) as worker:
        first, recorded, welcome = await _handshake_by_hand(worker.connect, honest)
        assert type(welcome) is Welcome
        assert welcome.proof == worker_proof(SECRET, 2, first.nonce, recorded.nonce)

        # An eavesdropper replays the recorded answer on a new connection: the worker's
        # nonce is new, so the proof no longer matches.
        second, _, refusal = await _handshake_by_hand(worker.connect, lambda _: recorded)
        assert second.nonce != first.nonce
        assert type(refusal) is Goodbye
        assert refusal.reason.startswith("authentication failed: the frontend's proof does not")


async def test_a_version_1_frontend_is_refused_by_a_worker_with_a_secret(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with worker_with(SECRET) as worker:
        stream = await worker.connect("worker", 1)
        await stream.send_all(encode_frame(Hello(versions=(1,))))
        reply = await FrameConnection(stream, "worker").receive()
    assert type(reply) is Goodbye
    assert reply.reason.startswith("the worker requires a secret, and this frontend speaks only")


def test_a_welcome_without_a_proof_is_what_version_1_frontends_decode() -> None:
    welcome = Welcome(version=1, worker_id=1, role="agg", block_size=16)
    _, fields = msgpack.unpackb(encode_frame(welcome)[4:])
    assert "proof" not in fields
    _, fields = msgpack.unpackb(encode_frame(attrs.evolve(welcome, proof=b"p"))[4:])
    assert fields["proof"] == b"p"


async def test_serve_worker_checks_its_secret() -> None:
    with pytest.raises(ConfigError, match="the worker secret has 5 bytes; it needs at least 16"):
        await serve_worker(MockEngine(1), secret="short")


# -- where the secret comes from --------------------------------------------------------------


def test_the_secret_comes_from_the_file_else_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    env = {SECRET_ENV: OTHER.decode()}
    assert load_secret(path, flag="--secret-file", environ=env) == SECRET  # the flag wins
    assert load_secret(None, flag="--secret-file", environ=env) == OTHER
    assert load_secret(None, flag="--secret-file", environ={}) is None
    path.write_text("too short\n")
    with pytest.raises(ConfigError, match=r"--secret-file '.*secret' has 9 bytes; it needs at"):
        load_secret(path, flag="--secret-file", environ={})
    with pytest.raises(ConfigError, match=f"{SECRET_ENV} has 3 bytes.*secrets.token_hex"):
        load_secret(None, flag="--secret-file", environ={SECRET_ENV: "abc"})
    with pytest.raises(ConfigError, match=r"--worker-secret-file '/nonexistent': cannot read"):
        load_secret("/nonexistent", flag="--worker-secret-file", environ={})


def test_serve_gives_the_secret_and_heartbeat_to_every_remote_engine(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    argv = ["serve", "--remote-worker", "1=h:7001", "--worker-secret-file", str(path)]
    argv += ["--worker-heartbeat-interval", "1", "--worker-heartbeat-timeout", "4"]
    setup = resolve(frontend_parser().parse_args(argv))
    assert setup.worker_secret == SECRET and SECRET.decode() not in repr(setup)
    (engine,), _ = setup.engines()
    assert isinstance(engine, RemoteEngine) and engine._secret == SECRET
    assert (engine.heartbeat_interval, engine.heartbeat_timeout) == (1, 4)
    context = setup.engine_context()
    assert context.worker_secret == SECRET and SECRET.decode() not in repr(context)
    assert (context.heartbeat_interval, context.heartbeat_timeout) == (1, 4)
    bad = ["serve", "--worker-heartbeat-interval", "5", "--worker-heartbeat-timeout", "5"]
    with pytest.raises(ConfigError, match="--worker-heartbeat-interval 5 must be positive and"):
        resolve(frontend_parser().parse_args(bad))


def test_workers_found_in_etcd_get_the_secret_and_heartbeat_through_the_context() -> None:
    context = EngineContext(worker_secret=SECRET, heartbeat_interval=1.5, heartbeat_timeout=6)
    record = WorkerRecord(worker_id=3, host="10.0.0.3", port=7003, role="agg", block_size=16)
    engine = engine_from_record(record, context)
    assert isinstance(engine, RemoteEngine) and engine._secret == SECRET
    assert (engine.heartbeat_interval, engine.heartbeat_timeout) == (1.5, 6)


# -- real processes ---------------------------------------------------------------------------


async def _serve_exits(tmp_path: Path, secret: bytes | None, env: dict[str, str]) -> str:
    """``interlock serve`` over a worker with ``SECRET`` and a frontend with ``secret``,
    expected to fail its start; its stderr."""
    worker_secret = tmp_path / "worker-secret"
    worker_secret.write_bytes(SECRET)
    worker = await start_worker(
        tmp_path, 1, "--zero-time", "--tokenizer", "builtin", "--log-level", "warning",
        "--secret-file", str(worker_secret),
    )  # fmt: skip
    argv = ["serve", "--port", "0", "--remote-worker", f"1=127.0.0.1:{worker.port}"]
    if secret is not None:
        frontend_secret = tmp_path / "frontend-secret"
        frontend_secret.write_bytes(secret)
        argv += ["--worker-secret-file", str(frontend_secret)]
    try:
        with trio.fail_after(30):
            done = await trio.run_process(
                [*_command(), *argv],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
    finally:
        await stop(worker)
    assert done.returncode == 1 and b"listening on" not in done.stdout, done.stderr
    assert SECRET.decode() not in worker.log_text()
    return str(done.stderr.decode())


def _environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    return env | extra


async def test_serve_without_the_workers_secret_exits_with_the_fix(tmp_path: Path) -> None:
    err = await _serve_exits(tmp_path, None, _environ())
    assert "interlock serve: cannot use a remote worker: the worker at 127.0.0.1:" in err
    assert "requires a secret; give --worker-secret-file PATH (or INTERLOCK_WORKER_SECRET)" in err


async def test_serve_with_a_wrong_secret_exits_saying_so(tmp_path: Path) -> None:
    err = await _serve_exits(tmp_path, OTHER, _environ())
    assert "refused this frontend: authentication failed" in err


async def test_serve_with_the_secret_in_its_environment_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    flags = ["--zero-time", "--tokenizer", "builtin", "--log-level", "warning"]
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())  # the frontend's, inherited by serve
    async with (
        serving_over(
            tmp_path, [*flags, "--secret-file", str(secret_file)], "--router-mode", "round_robin"
        ) as (serve, _),
        httpx.AsyncClient(base_url=serve.url, timeout=30) as client,
    ):
        with trio.fail_after(30):
            for _ in range(2):  # one on each worker
                reply = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3})
                assert reply.status_code == 200, reply.text
            assert (await client.get("/health")).json()["workers"] == [1, 2]


def test_a_worker_with_an_unreadable_secret_file_exits_2() -> None:
    done = subprocess.run(
        [*WORKER, "--id", "1", "--secret-file", "/nonexistent/secret"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_environ(),
    )
    assert done.returncode == 2
    assert "interlock worker: --secret-file '/nonexistent/secret': cannot read" in done.stderr


def test_a_worker_bound_beyond_loopback_without_a_secret_warns() -> None:
    with socket.socket() as taken:
        # The port is taken, so the worker stops right after its warning, never listening.
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*WORKER, "--id", "1", "--host", "0.0.0.0", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_environ(),
        )
    assert done.returncode == 1, done.stderr
    assert (
        "listening on 0.0.0.0 without a secret: any process that reaches this port can run "
        "generation and read the prompts; give --secret-file PATH (or INTERLOCK_WORKER_SECRET)"
    ) in done.stderr
