"""Worker TLS: ``interlock worker --tls-cert-file/--tls-key-file`` speaks only TLS, and
``interlock serve --worker-tls`` verifies the worker's certificate (``--worker-ca-file``)
and its host name; the heartbeat and the shared-secret handshake run inside TLS. With
``--tls-client-ca-file`` the worker serves only frontends showing a certificate that CA
signed (``--worker-cert-file/--worker-key-file``). Every mismatch (no TLS on one side, a
certificate the frontend does not trust, no client certificate) stops ``interlock serve``
with a message naming the flags.

A throwaway CA and certificates are made with the ``openssl`` command line; the end-to-end
tests run real ``interlock worker`` and ``interlock serve`` processes.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from helpers import frontend_parser
from test_etcd_security import make_certificates
from test_http_cli import _command
from test_http_remote_workers import CHAT, serving_over
from test_remote_workers import WORKER, start_worker, stop

from interlock import ConfigError
from interlock.engines import WorkerRecord, engine_from_record
from interlock.engines.mock import MockEngine, MockTiming
from interlock.engines.remote import (
    RemoteEngine,
    WorkerTLSError,
    client_context,
    serve_worker,
    server_context,
)
from interlock.engines.remote._auth import SECRET_ENV
from interlock.engines.remote._connection import set_keepalive
from interlock.http._cli import resolve

SECRET = b"0123456789abcdef-the-shared-secret"
WORKER_FLAGS = ["--zero-time", "--tokenizer", "builtin", "--log-level", "warning"]

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is not installed"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``ca``, ``server``/``server-key`` (IP:127.0.0.1, DNS:localhost), ``client``/
    ``client-key`` signed by ``ca``, and ``other-ca``, a CA that signed none of them."""
    directory = tmp_path_factory.mktemp("certs")
    make_certificates(directory)
    other = directory / "other"
    other.mkdir()
    make_certificates(other)
    files = {name: str(directory / f"{name}.pem") for name in ("ca", "server", "client")}
    files |= {f"{name}-key": str(directory / f"{name}-key.pem") for name in ("server", "client")}
    return files | {"other-ca": str(other / "ca.pem")}


def tls_worker(certs: dict[str, str], *, client_ca: bool = False) -> list[str]:
    flags = ["--tls-cert-file", certs["server"], "--tls-key-file", certs["server-key"]]
    return flags + (["--tls-client-ca-file", certs["ca"]] if client_ca else [])


def tls_frontend(certs: dict[str, str], ca: str = "ca", *, client_cert: bool = False) -> list[str]:
    flags = ["--worker-tls", "--worker-ca-file", certs[ca]]
    if client_cert:
        flags += ["--worker-cert-file", certs["client"], "--worker-key-file", certs["client-key"]]
    return flags


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != SECRET_ENV}


# -- real processes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls-and-secret"])
async def test_serve_answers_over_tls_workers(
    tmp_path: Path, certs: dict[str, str], mutual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS alone; then mutual TLS (the workers require the frontend's client certificate)
    with the shared secret inside it."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    worker_flags = [*WORKER_FLAGS, *tls_worker(certs, client_ca=mutual)]
    serve_flags = [*tls_frontend(certs, client_cert=mutual), "--router-mode", "round_robin"]
    if mutual:
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        worker_flags += ["--secret-file", str(secret)]
        serve_flags += ["--worker-secret-file", str(secret)]
    async with serving_over(tmp_path, worker_flags, *serve_flags) as (serve, workers):

        def with_the_openai_client() -> list[Any]:
            with openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=30) as c:
                return [
                    c.chat.completions.create(max_tokens=3, **CHAT)  # one on each worker
                    for _ in range(2)
                ]

        with trio.fail_after(60):
            replies = await trio.to_thread.run_sync(with_the_openai_client)
            async with httpx.AsyncClient(base_url=serve.url, timeout=30) as client:
                health = (await client.get("/health")).json()
    assert all(r.choices[0].message.content for r in replies)
    assert health["workers"] == [1, 2]
    for worker in workers.values():
        assert "refusing frontend" not in worker.log.read_text()


async def _serve_fails(tmp_path: Path, worker_flags: list[str], serve_flags: list[str]) -> str:
    """``interlock serve`` with ``serve_flags`` over one worker with ``worker_flags``,
    expected to exit 1 before listening; its stderr (with the worker's log after it)."""
    worker = await start_worker(tmp_path, 1, *WORKER_FLAGS, *worker_flags)
    argv = ["serve", "--port", "0", "--remote-worker", f"1=127.0.0.1:{worker.port}"]
    try:
        with trio.fail_after(30):
            done = await trio.run_process(
                [*_command(), *argv, *serve_flags],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_environ(),
            )
    finally:
        await stop(worker)
    assert done.returncode == 1 and b"listening on" not in done.stdout, done.stderr
    return done.stderr.decode() + worker.log.read_text()


async def test_serve_without_worker_tls_over_a_tls_worker_exits_with_the_fix(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    err = await _serve_fails(tmp_path, tls_worker(certs), [])
    assert (
        "interlock serve: cannot use a remote worker: worker at 127.0.0.1:" in err.splitlines()[0]
    )
    assert "this worker speaks only TLS (it runs with --tls-cert-file): give the frontend " in err
    assert "--worker-tls" in err.splitlines()[0]
    assert "the frontend does not speak TLS: it needs --worker-tls" in err  # the worker's log


async def test_serve_with_worker_tls_over_a_plaintext_worker_exits_with_the_fix(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    err = await _serve_fails(tmp_path, [], tls_frontend(certs))
    assert "interlock serve: cannot use a remote worker: TLS with worker 1 at 127.0.0.1:" in err
    assert (
        "it does not answer in TLS: start the worker with --tls-cert-file and "
        "--tls-key-file, or drop --worker-tls"
    ) in err


async def test_a_worker_certificate_from_another_ca_is_refused(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    err = await _serve_fails(tmp_path, tls_worker(certs), tls_frontend(certs, "other-ca"))
    assert "TLS with worker 1 at 127.0.0.1:" in err and "(CERTIFICATE_VERIFY_FAILED)" in err
    assert "its certificate is not one this frontend trusts" in err
    assert "give --worker-ca-file with the CA that signed it" in err


async def test_mutual_tls_refuses_a_frontend_without_a_client_certificate(
    tmp_path: Path, certs: dict[str, str]
) -> None:
    err = await _serve_fails(tmp_path, tls_worker(certs, client_ca=True), tls_frontend(certs))
    assert "TLS with worker 1 at 127.0.0.1:" in err
    assert (
        "the worker requires a client certificate (--tls-client-ca-file): give "
        "--worker-cert-file and --worker-key-file"
    ) in err


def test_a_worker_with_half_its_tls_flags_exits_2_naming_the_flag(certs: dict[str, str]) -> None:
    for flags, message in [
        (["--tls-cert-file", certs["server"]], "--tls-cert-file needs --tls-key-file too"),
        (["--tls-key-file", certs["server-key"]], "--tls-key-file needs --tls-cert-file too"),
        (["--tls-client-ca-file", certs["ca"]], "--tls-client-ca-file needs --tls-cert-file"),
        (
            ["--tls-cert-file", "/nonexistent.pem", "--tls-key-file", certs["server-key"]],
            "--tls-cert-file: cannot read /nonexistent.pem",
        ),
    ]:
        done = subprocess.run(
            [*WORKER, "--id", "1", *flags], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and f"interlock worker: {message}" in done.stderr, flags


# -- the plumbing -----------------------------------------------------------------------------


def test_serve_gives_its_tls_to_every_remote_engine_and_to_etcds(certs: dict[str, str]) -> None:
    argv = ["serve", "--remote-worker", "1=h:7001", *tls_frontend(certs, client_cert=True)]
    setup = resolve(frontend_parser().parse_args(argv))
    assert isinstance(setup.worker_tls, ssl.SSLContext)
    assert setup.worker_tls.check_hostname and setup.worker_tls.verify_mode == ssl.CERT_REQUIRED
    (engine,), _ = setup.engines()
    assert isinstance(engine, RemoteEngine) and engine._tls is setup.worker_tls
    context = setup.engine_context()
    assert context.worker_tls is setup.worker_tls
    record = WorkerRecord(worker_id=3, host="10.0.0.3", port=7003, role="agg", block_size=16)
    found = engine_from_record(record, context)
    assert isinstance(found, RemoteEngine) and found._tls is setup.worker_tls
    assert resolve(frontend_parser().parse_args(["serve"])).worker_tls is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--worker-ca-file", "ca.pem"], "--worker-ca-file needs --worker-tls"),
        (["--worker-tls", "--worker-cert-file", "c.pem"], "--worker-cert-file needs --worker-key"),
        (["--worker-tls", "--worker-ca-file", "/nonexistent.pem"], "--worker-ca-file: cannot"),
    ],
)
def test_bad_frontend_tls_flags_are_refused_naming_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(frontend_parser().parse_args(["serve", *flags]))


async def test_a_silent_tls_client_is_dropped_after_the_handshake_timeout_and_others_served(
    certs: dict[str, str],
) -> None:
    tls = server_context(certs["server"], certs["server-key"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve_worker(
                MockEngine(1, timing=MockTiming.zero()),
                handshake_timeout=0.5,
                tls=tls,
                task_status=task_status,
            )
        )
        with trio.fail_after(30):
            silent = await trio.open_tcp_stream(address.host, address.port)
            engine = RemoteEngine(
                "127.0.0.1", address.port, instance_id=1, tls=client_context(certs["ca"])
            )
            await nursery.start(engine.run)
            assert engine.connected and engine.registered
            # The worker gives up on the silent connection; the engine's stays.
            assert await silent.receive_some(1024) == b""
            await silent.aclose()
            assert engine.connected and engine.connections == 1
        nursery.cancel_scope.cancel()


async def test_keepalive_is_set_on_the_socket_under_tls(certs: dict[str, str]) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        secured = trio.SSLStream(stream, client_context(certs["ca"]), server_hostname="127.0.0.1")
        set_keepalive(secured)
        assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        await stream.aclose()


async def test_a_certificate_that_does_not_name_the_host_is_refused(
    certs: dict[str, str],
) -> None:
    tls = server_context(certs["server"], certs["server-key"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve_worker(
                MockEngine(1, timing=MockTiming.zero()), tls=tls, task_status=task_status
            )
        )

        async def to_the_worker(host: str, port: int) -> trio.abc.Stream:
            return await trio.open_tcp_stream(address.host, address.port)

        # The certificate names 127.0.0.1 and localhost, not the host the engine dials.
        engine = RemoteEngine(
            "worker-7.example",
            address.port,
            instance_id=1,
            tls=client_context(certs["ca"]),
            open_connection=to_the_worker,
        )
        with trio.fail_after(30), pytest.raises(WorkerTLSError) as caught:
            await engine.run()
        assert "(CERTIFICATE_VERIFY_FAILED)" in str(caught.value)
        assert "Hostname mismatch" in str(caught.value)
        assert "make sure the certificate names 'worker-7.example'" in str(caught.value)
        nursery.cancel_scope.cancel()
