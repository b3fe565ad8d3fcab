"""etcd with its own authentication and TLS: only a process with etcd credentials (and the
write permission on the prefix) can register a worker; frontends read with their own user;
expired tokens are renewed; an ``https://`` etcd is checked against a CA and may demand a
client certificate. Refusals say what to fix and never show the password.

Each test starts its own real ``etcd`` (users and roles created through its gateway, with a
cheap bcrypt cost), real ``interlock worker`` processes and an in-process or real frontend.
Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from helpers import frontend_parser
from test_etcd_discovery import (
    ETCD,
    ONE_MEMBER_RAFT,
    PREFIX,
    TIMEOUT,
    _free_port,
    answer,
    start_worker,
    wait_for,
)
from test_http_cli import _command
from test_register import _engine, _stop
from test_remote_workers import WORKER, WorkerProcess, stop

from interlock import Components, ConfigError, PipelineConfig, build_pipeline
from interlock.cli import build_parser
from interlock.discovery import (
    PASSWORD_ENV,
    EtcdClient,
    EtcdError,
    EtcdOptions,
    WorkerWatcher,
    watch_workers,
    worker_key,
)
from interlock.discovery._etcd import prefix_range_end
from interlock.discovery._etcd_options import etcd_options

PASSWORDS = {"root": "root-secret", "worker": "worker-secret", "frontend": "frontend-secret"}


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


@attrs.define
class SecureEtcd:
    """A real etcd with authentication (users root, worker: readwrite on the prefix,
    frontend: read only) or TLS (a CA, a server certificate, client-cert-auth), on free
    ports; `restart` keeps its data."""

    tmp_path: Path
    tls: bool = False
    auth: bool = True
    token_ttl: int = 300
    client_port: int = attrs.field(factory=_free_port)
    #: Not the client's: two free ports asked for one after the other can be the same one.
    peer_port: int = attrs.field(
        default=attrs.Factory(lambda self: _free_port(other_than=self.client_port), takes_self=True)
    )
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def log(self) -> Path:
        return self.tmp_path / "etcd.log"

    def tls_files(self) -> dict[str, str]:
        return {k: str(self.tmp_path / f"{k}.pem") for k in ("ca", "client", "client-key")}

    def http(self) -> httpx.Client:
        verify: Any = True
        if self.tls:
            files = self.tls_files()
            verify = ssl.create_default_context(cafile=files["ca"])
            verify.load_cert_chain(files["client"], files["client-key"])
        return httpx.Client(base_url=self.url, verify=verify, timeout=TIMEOUT)

    def start(self) -> None:
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name=test",
            f"--data-dir={self.tmp_path / 'etcd-data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            *ONE_MEMBER_RAFT,
            "--bcrypt-cost=4",
            f"--auth-token-ttl={self.token_ttl}",
            # zap logs each expired simple token ("deleted a simple token"): what a test
            # waits for instead of a duration.
            "--logger=zap",
        ]
        if self.tls:
            d = self.tmp_path
            argv += [
                f"--cert-file={d / 'server.pem'}",
                f"--key-file={d / 'server-key.pem'}",
                f"--trusted-ca-file={d / 'ca.pem'}",
                "--client-cert-auth",
            ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + TIMEOUT
        with self.http() as http:
            while True:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    if http.post("/v3/maintenance/status", json={}).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "etcd did not answer within the timeout"
                time.sleep(0.01)

    def enable_auth(self) -> None:
        """Users root, worker (readwrite on the prefix) and frontend (read on it); then
        authentication on (root must exist first)."""
        key, end = _b64(f"{PREFIX}/"), _b64(prefix_range_end(f"{PREFIX}/"))
        calls: list[tuple[str, dict[str, Any]]] = []
        for user, password in PASSWORDS.items():
            calls += [
                ("/v3/auth/user/add", {"name": user, "password": password}),
                ("/v3/auth/role/add", {"name": user}),
                ("/v3/auth/user/grant", {"user": user, "role": user}),
            ]
        for role, perm in (("worker", "READWRITE"), ("frontend", "READ")):
            grant = {"key": key, "range_end": end, "permType": perm}
            calls.append(("/v3/auth/role/grant", {"name": role, "perm": grant}))
        calls.append(("/v3/auth/enable", {}))
        with self.http() as http:
            for path, body in calls:
                response = http.post(path, json=body)
                assert response.status_code == 200, (path, response.text)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def expired_tokens(self, user: str) -> int:
        """How many of ``user``'s tokens etcd deleted (their TTL ran out unused)."""
        needle = f'"msg":"deleted a simple token","user-name":"{user}"'
        return self.log.read_text(errors="replace").count(needle)


def make_certificates(directory: Path) -> None:
    """A throwaway CA and, signed by it, a server certificate for 127.0.0.1 and a client
    certificate, as PEM files ``ca.pem``, ``server.pem``/``server-key.pem``,
    ``client.pem``/``client-key.pem`` (openssl's command line)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *curve, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=interlock test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name in ("server", "client"):
        (directory / f"{name}.ext").write_text(
            # etcd's gateway dials etcd itself with the server certificate: it is a
            # client certificate too.
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        openssl(
            "req", *curve, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
            "-subj", f"/CN={name}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "1",
            "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        )  # fmt: skip


def _need_etcd() -> None:
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[SecureEtcd]:
    _need_etcd()
    server = SecureEtcd(tmp_path)
    try:
        server.start()
        server.enable_auth()
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[SecureEtcd]:
    _need_etcd()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    make_certificates(tmp_path)
    server = SecureEtcd(tmp_path, tls=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def password_file(tmp_path: Path, user: str, password: str | None = None) -> str:
    path = tmp_path / f"{user}.password"
    path.write_text((password or PASSWORDS[user]) + "\n")
    return str(path)


async def run_worker(etcd: SecureEtcd, worker_id: int, *flags: str) -> tuple[int, str]:
    """An ``interlock worker --etcd`` that is expected to fail: its exit status and stderr."""
    argv = [*WORKER, "--id", str(worker_id), "--zero-time", "--etcd", etcd.url]
    argv += ["--etcd-prefix", PREFIX, *flags]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.stdout == b""
    return result.returncode, result.stderr.decode()


def run_serve(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``interlock serve`` in this process, expected to stop at once: status and stderr."""
    args = frontend_parser().parse_args(["serve", "--port", "0", *argv])
    status = args.run(args)
    return status, capsys.readouterr().err


# -- authentication -------------------------------------------------------------------------------


async def test_a_worker_and_a_frontend_with_credentials_serve_and_a_reader_cannot_register(
    auth_etcd: SecureEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_flags = ("--etcd-user", "worker", "--etcd-password-file")
    workers = [
        await start_worker(tmp_path, 1, auth_etcd, *worker_flags, password_file(tmp_path, "worker"))
    ]
    serve: trio.Process | None = None
    try:
        # The frontend's password comes from the environment (the child inherits it).
        monkeypatch.setenv(PASSWORD_ENV, PASSWORDS["frontend"])
        argv = ["serve", "--port", "0", "--etcd", auth_etcd.url, "--etcd-prefix", PREFIX]
        argv += ["--etcd-user", "frontend"]
        with (tmp_path / "serve.log").open("wb") as stderr:
            serve = await trio.lowlevel.open_process(
                _serve_command(argv),
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        assert serve.stdout is not None
        text = b""
        with trio.fail_after(TIMEOUT):
            while b"configuration:\n" not in text:
                chunk = await serve.stdout.receive_some(65536)
                assert chunk, (tmp_path / "serve.log").read_text()
                text += chunk
        lines = text.decode().splitlines()
        assert any(f"at {auth_etcd.url} as etcd user 'frontend'" in x for x in lines), lines
        url = lines[0].split("listening on ")[1].split(" ")[0]
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            assert (await http.get("/health")).json()["workers"] == [1]
            reply = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "mock",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3,
                },
            )
            assert reply.status_code == 200, reply.text
        # A process with the frontend's read-only user cannot put a (rogue) worker there.
        status, err = await run_worker(auth_etcd, 2, "--etcd-user", "frontend")
        assert status == 1, err
        assert "cannot register in etcd" in err and "etcd user 'frontend'" in err, err
        assert "permission denied" in err and "readwrite permission" in err, err
        assert PASSWORDS["frontend"] not in err
        async with EtcdClient(auth_etcd.url, user="root", password=PASSWORDS["root"]) as root:
            items, _ = await root.get_prefix(f"{PREFIX}/workers/")
        assert [item.key for item in items] == [worker_key(PREFIX, 1)]
    finally:
        with trio.CancelScope(shield=True):
            if serve is not None:
                serve.kill()
                await serve.wait()
                if serve.stdout is not None:
                    await serve.stdout.aclose()
            for worker in workers:
                await stop(worker)


async def test_register_with_a_read_only_user_exits_saying_etcd_refused_it(
    auth_etcd: SecureEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A missing permission is no outage: retrying would only log the refusal forever.
    engine, url = await _engine(tmp_path, 1)
    try:
        monkeypatch.setenv(PASSWORD_ENV, PASSWORDS["frontend"])
        argv = [*_command(), "register", "--etcd", auth_etcd.url, "--etcd-prefix", PREFIX]
        argv += ["--etcd-user", "frontend", "--engine", f"1={url}"]
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert "interlock register: etcd refused the registration" in err, err
        assert "etcd user 'frontend'" in err and "permission denied" in err, err
        assert PASSWORDS["frontend"] not in err
        assert result.stdout == b""
    finally:
        await _stop(engine)


def _serve_command(argv: list[str]) -> list[str]:
    return [*_command(), *argv]


def test_without_credentials_or_with_a_wrong_password_etcd_refuses_clearly(
    auth_etcd: SecureEtcd,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ("--etcd", auth_etcd.url, "--etcd-prefix", PREFIX)
    status, err = run_serve(capsys, *flags)
    assert status == 1, err
    assert "authentication enabled and this process gave no user" in err, err
    assert "--etcd-user NAME" in err and PASSWORD_ENV in err, err

    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    status, err = run_serve(capsys, *flags, "--etcd-user", "frontend")
    assert status == 1, err
    assert "authenticate as etcd user 'frontend' failed" in err, err
    assert "refused the user name or password" in err and "not-the-password" not in err, err

    wrong = password_file(tmp_path, "worker", "wrong-password")
    monkeypatch.delenv(PASSWORD_ENV)
    status, err = trio.run(
        run_worker, auth_etcd, 3, "--etcd-user", "worker", "--etcd-password-file", wrong
    )
    assert status == 1, err
    assert "cannot register in etcd" in err and "etcd user 'worker'" in err, err
    assert "wrong-password" not in err


async def test_an_expired_token_is_renewed_and_the_frontend_keeps_following(
    tmp_path: Path,
) -> None:
    _need_etcd()
    etcd = SecureEtcd(tmp_path, token_ttl=1)
    workers: list[WorkerProcess] = []
    credentials = ("--etcd-user", "worker", "--etcd-password-file")
    try:
        etcd.start()
        etcd.enable_auth()
        secret = password_file(tmp_path, "worker")
        async with (
            build_pipeline(PipelineConfig(), Components()) as pipeline,
            EtcdClient(etcd.url, user="frontend", password=PASSWORDS["frontend"]) as client,
            trio.open_nursery() as nursery,
        ):
            watcher: WorkerWatcher = await nursery.start(
                lambda task_status: watch_workers(
                    client, pipeline, prefix=PREFIX, task_status=task_status
                )
            )
            watcher.backoff, watcher.max_backoff = 0.05, 0.2
            assert client.authentications == 1
            workers.append(await start_worker(tmp_path, 1, etcd, *credentials, secret))
            await wait_for(lambda: 1 in pipeline.workers, "worker 1 to join")
            # The frontend only watches: its token, unused, expires; the watch goes on.
            await wait_for(lambda: etcd.expired_tokens("frontend") >= 1, "the token to expire")
            workers.append(await start_worker(tmp_path, 2, etcd, *credentials, secret))
            await wait_for(lambda: 2 in pipeline.workers, "worker 2 to join")
            assert await answer(pipeline, 20) in (1, 2)
            # A watch opened with an expired token is refused at its creation: it is opened
            # again with a new token, from the same revision, and misses nothing.
            async with EtcdClient(
                etcd.url, user="frontend", password=PASSWORDS["frontend"]
            ) as late:
                _, revision = await late.get_prefix(f"{PREFIX}/")
                await wait_for(lambda: etcd.expired_tokens("frontend") >= 2, "its token to expire")
                async with EtcdClient(etcd.url, user="root", password=PASSWORDS["root"]) as root:
                    await root.put(f"{PREFIX}/marker", "x")
                events = late.watch_prefix(f"{PREFIX}/", start_revision=revision + 1)
                async with aclosing(events):
                    event = await events.__anext__()
                assert event.key == f"{PREFIX}/marker" and late.authentications == 2
            # etcd restarts (its tokens die with it): the frontend lists again with a new
            # token, and worker 2 leaves at once (its stop revokes its lease, with a new
            # token of its own: the old one expired meanwhile).
            await wait_for(lambda: etcd.expired_tokens("worker") >= 2, "the workers' tokens")
            etcd.restart()
            await wait_for(lambda: client.authentications >= 2, "the frontend to authenticate")
            await stop(workers[1])
            await wait_for(lambda: sorted(pipeline.workers) == [1], "worker 2 to leave")
            assert "revoked the lease" in workers[1].log.read_text()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for worker in workers:
                await stop(worker)
        etcd.stop()


# -- TLS ------------------------------------------------------------------------------------------


async def test_an_https_etcd_with_client_certificates(tls_etcd: SecureEtcd, tmp_path: Path) -> None:
    files = tls_etcd.tls_files()
    tls = ["--etcd-ca-file", files["ca"]]
    tls += ["--etcd-cert-file", files["client"], "--etcd-key-file", files["client-key"]]
    worker = await start_worker(tmp_path, 1, tls_etcd, *tls)
    try:
        options = EtcdOptions(
            url=tls_etcd.url,
            prefix=PREFIX,
            ca_file=files["ca"],
            cert_file=files["client"],
            key_file=files["client-key"],
        )
        with trio.fail_after(TIMEOUT):
            async with (
                build_pipeline(PipelineConfig(), Components()) as pipeline,
                options.client() as client,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(
                    lambda task_status: watch_workers(
                        client, pipeline, prefix=PREFIX, task_status=task_status
                    )
                )
                assert sorted(pipeline.workers) == [1]
                assert await answer(pipeline, 10) == 1
                nursery.cancel_scope.cancel()
        # Without the client certificate, or without the CA: refused, saying what to give.
        no_cert = EtcdOptions(url=tls_etcd.url, prefix=PREFIX, ca_file=files["ca"])
        async with no_cert.client() as client:
            with pytest.raises(EtcdError, match="--etcd-cert-file and --etcd-key-file"):
                await client.get_prefix(PREFIX)
        no_ca = attrs.evolve(options, ca_file=None)
        async with no_ca.client() as client:
            with pytest.raises(EtcdError, match="--etcd-ca-file PATH with the CA"):
                await client.get_prefix(PREFIX)
        status, err = await run_worker(tls_etcd, 2, "--etcd-ca-file", files["ca"])
        assert status == 1 and "--etcd-cert-file and --etcd-key-file" in err, err
    finally:
        await stop(worker)


# -- the flags ------------------------------------------------------------------------------------


def _options(*argv: str, environ: dict[str, str] | None = None) -> EtcdOptions | None:
    args = frontend_parser().parse_args(["serve", *argv])
    return etcd_options(args, environ=environ or {})


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--etcd", "http://alice:s3cret@etcd:2379"], {}, "a user name or password in the URL"),
        (["--etcd", "http://e:2379", "--etcd-user", "a"], {}, "needs its password"),
        (["--etcd", "http://e:2379"], {PASSWORD_ENV: "pw"}, "--etcd-user is not"),
        (["--etcd-user", "a"], {}, "--etcd-user needs --etcd URL"),
        (["--etcd", "http://e:2379", "--etcd-user", "a", "--etcd-password-file", "/nonexistent"],
         {}, "--etcd-password-file '/nonexistent': cannot read it"),
        (["--etcd", "http://e:2379", "--etcd-ca-file", "/x"], {}, "needs|https:// URL"),
        (["--etcd", "https://e:2379", "--etcd-ca-file", "/nonexistent"], {},
         "--etcd-ca-file '/nonexistent': cannot read it"),
        (["--etcd", "https://e:2379", "--etcd-cert-file", "/x"], {}, "go together"),
        (["--etcd", "https://e:2379", "--etcd-cert-file", "/nonexistent", "--etcd-key-file",
          "/x"], {}, "--etcd-cert-file '/nonexistent': cannot read it"),
    ],
)  # fmt: skip
def test_bad_etcd_flags_are_refused_naming_the_flag(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _options(*argv, environ=environ)
    assert "s3cret" not in str(caught.value)


def test_the_password_comes_from_a_file_or_the_environment_and_is_never_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = password_file(tmp_path, "frontend")
    from_file = _options(
        "--etcd", "http://e:2379", "--etcd-user", "u", "--etcd-password-file", path
    )
    assert from_file is not None and from_file.password == PASSWORDS["frontend"]
    from_env = _options(
        "--etcd", "http://e:2379", "--etcd-user", "u", environ={PASSWORD_ENV: "p w"}
    )
    assert from_env is not None and from_env.password == "p w" and "p w" not in repr(from_env)
    assert _options() is None
    # Every command that takes --etcd takes the same flags.
    for command in (["worker", "--id", "1"], ["register", "--engine", "1=http://v:8000"],
                    ["route"], ["serve"]):  # fmt: skip
        args = build_parser().parse_args(
            [*command, "--etcd", "http://e:2379", "--etcd-user", "u", "--etcd-password-file", path]
        )
        options = etcd_options(args)
        assert options is not None and options.user == "u", command
    # A password in the URL stops the command (status 2) without printing it.
    status, err = run_serve(capsys, "--etcd", "https://u:hunter2@e:2379")
    assert status == 2 and "--etcd-user" in err and "hunter2" not in err, err


def test_bad_tls_files_are_refused_naming_the_flag(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    make_certificates(tmp_path)
    d = tmp_path
    with pytest.raises(ConfigError, match=r"--etcd-ca-file .*not a PEM CA"):
        _options("--etcd", "https://e:2379", "--etcd-ca-file", str(d / "client.ext"))
    with pytest.raises(ConfigError, match=r"--etcd-cert-file .* and --etcd-key-file"):
        _options(
            "--etcd", "https://e:2379", "--etcd-cert-file", str(d / "client.pem"),
            "--etcd-key-file", str(d / "server-key.pem"),
        )  # fmt: skip
    good = _options(
        "--etcd", "https://e:2379", "--etcd-ca-file", str(d / "ca.pem"),
        "--etcd-cert-file", str(d / "client.pem"), "--etcd-key-file", str(d / "client-key.pem"),
    )  # fmt: skip
    assert good is not None and good.describe() == "https://e:2379 with a client certificate"
