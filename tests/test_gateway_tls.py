"""The endpoint picker's gRPC port over TLS (docs/gateway.md#tls-on-the-ext_proc-port):
``interlock route --ext-proc-tls self-signed`` or ``--ext-proc-tls-cert``/``--ext-proc-tls-key``.

grpcio's TLS client picks through it and checks its health; an h2c client and a client that does
not trust the certificate are refused; the health port stays h2c (as GAIE's picker serves it).
The server's TLS context selects h2 by ALPN and leaves no key on disk. Which certificate keys
are served is tried for real: loopback TLS servers with each kind of key, and grpcio's client
and a real Envoy completing a handshake or not; a key a gateway could not use is refused at
start. The flags (and ``--config``'s ``[gateway]`` table) are checked at start with errors
naming the flag. A real Envoy, configured with docs/gateway/envoy-ext-proc-tls.yaml's cluster,
sends requests through a real ``interlock route --ext-proc-tls self-signed`` to the endpoint it
picked. Real sockets and threads; every wait has a deadline; nothing asserts on time.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import grpc
import httpx
import pytest
import trio
import yaml
from _envoy import (
    ROOT,
    TIMEOUT,
    free_port,
    gateway_config,
    open_envoy,
    open_processes,
    require_envoy,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from helpers import frontend_parser
from hypothesis import given
from hypothesis import strategies as st
from test_gateway_ext_proc import (
    Picking,
    chat_body,
    picking,
    request_body,
    request_headers,
    set_headers,
)
from test_gateway_server import Bookings

from interlock import ConfigError
from interlock.gateway import _tls, serve_ext_proc
from interlock.gateway._tls import ExtProcTLS, load_tls, self_signed_tls
from interlock.http._cli import _serve_ext_proc, banner, resolve

#: The picker's TLS cluster the page shows and the Envoy test runs.
TLS_CLUSTER = ROOT / "docs" / "gateway" / "envoy-ext-proc-tls.yaml"
SERVING = HealthCheckResponse.SERVING


@attrs.frozen
class Certificate:
    """A self-signed certificate and its key, as files (what ``--ext-proc-tls-cert`` and
    ``--ext-proc-tls-key`` take) and as the TLS they load into."""

    cert: Path
    key: Path
    tls: ExtProcTLS


def write_certificate(directory: Path, name: str = "picker") -> Certificate:
    made = self_signed_tls()
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(made.certificate_chain)
    key.write_bytes(made.private_key)
    return Certificate(cert, key, load_tls(cert, key))


# -- grpcio's clients ----------------------------------------------------------------------------


def tls_channel(address: str, trusted: bytes) -> grpc.Channel:
    """A TLS channel that trusts ``trusted`` (PEM) and expects the name ``localhost``."""
    credentials = grpc.ssl_channel_credentials(root_certificates=trusted)
    return grpc.secure_channel(
        address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),)
    )


def pick(channel: grpc.Channel, body: bytes) -> list[ProcessingResponse]:
    """One ext_proc stream on ``channel``: a chat request's headers and whole body, then the
    half-close; every answer (raises `grpc.RpcError` when the stream fails)."""
    messages: list[ProcessingRequest] = [request_headers(), request_body(body, True)]
    return list(ExternalProcessorStub(channel).Process(iter(messages), timeout=TIMEOUT))


def health(channel: grpc.Channel, service: str = "readiness") -> Any:
    return HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=TIMEOUT)


@attrs.define
class Served:
    picking: Picking
    ext_proc: str
    health: str


@asynccontextmanager
async def serving_tls(tls: ExtProcTLS) -> AsyncIterator[Served]:
    """A picker over in-process mock workers served with ``tls`` on free ports (health port
    too) until the block ends."""
    async with picking() as p, trio.open_nursery() as nursery:
        p.picker.booked = Bookings()
        ext_proc, health_address = await nursery.start(
            lambda task_status: serve_ext_proc(
                p.picker, "127.0.0.1", 0, health_port=0, tls=tls, task_status=task_status
            )
        )
        yield Served(p, ext_proc, health_address)
        nursery.cancel_scope.cancel()


async def test_a_tls_client_is_picked_and_checks_health_over_tls(tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path)
    body = chat_body()
    async with serving_tls(certificate.tls) as s:

        def client() -> tuple[list[ProcessingResponse], Any, Any]:
            with tls_channel(s.ext_proc, certificate.tls.certificate_chain) as channel:
                answers = pick(channel, body)
                checked = health(channel), health(channel, "liveness")
            return answers, *checked

        answers, ready, live = await trio.to_thread.run_sync(client)
        destination = set_headers(answers[0], "request_headers")["x-gateway-destination-endpoint"]
        assert destination.split(",")[0] in {
            s.picking.endpoint(w.instance_id) for w in s.picking.workers
        }
        back = answers[1].request_body.response.body_mutation.streamed_response
        assert back.body == body and back.end_of_stream
        assert ready.status == live.status == SERVING
        # The stream is over: its booking is freed (by its task, as it takes the stream's end).
        booked = s.picking.picker.booked
        assert isinstance(booked, Bookings)
        await booked.until_free()
        assert await s.picking.pipeline.load() == {}

        # The health port stays h2c, as GAIE's picker's: Kubernetes' gRPC probes speak no TLS.
        def probe() -> Any:
            with grpc.insecure_channel(s.health) as channel:
                return health(channel)

        assert (await trio.to_thread.run_sync(probe)).status == SERVING


async def test_an_h2c_client_and_a_client_not_trusting_the_certificate_are_refused(
    tmp_path: Path,
) -> None:
    certificate = write_certificate(tmp_path)
    stranger = write_certificate(tmp_path, "stranger")
    async with serving_tls(certificate.tls) as s:

        def refused(channel: grpc.Channel) -> grpc.StatusCode:
            with channel, pytest.raises(grpc.RpcError) as failed:
                pick(channel, chat_body())
            code: grpc.StatusCode = failed.value.code()
            return code

        h2c = await trio.to_thread.run_sync(refused, grpc.insecure_channel(s.ext_proc))
        assert h2c == grpc.StatusCode.UNAVAILABLE
        untrusted = tls_channel(s.ext_proc, stranger.tls.certificate_chain)
        assert await trio.to_thread.run_sync(refused, untrusted) == grpc.StatusCode.UNAVAILABLE
        assert not s.picking.picker.booked


# -- the server context ----------------------------------------------------------------------------


def client_context(trusted: bytes, alpn: list[str]) -> ssl.SSLContext:
    """A TLS client's context that trusts ``trusted`` (PEM) and offers ``alpn``."""
    context = ssl.create_default_context(cadata=trusted.decode())
    context.set_alpn_protocols(alpn)
    return context


async def echo_over_tls(tls: ExtProcTLS, client: ssl.SSLContext) -> tuple[str | None, bytes]:
    """One loopback connection, ``trio.SSLStream`` on both sides (the server's with
    ``tls.server_context()``): the ALPN protocol the server selected and what it echoed."""
    selected: list[str | None] = []

    async def echo(stream: trio.SocketStream) -> None:
        secured = trio.SSLStream(stream, tls.server_context(), server_side=True)
        await secured.do_handshake()
        selected.append(secured.selected_alpn_protocol())
        await secured.send_all(await secured.receive_some())
        await secured.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with trio.SSLStream(stream, client, server_hostname="localhost") as secured:
                await secured.send_all(b"ping")
                echoed = await secured.receive_some()
        nursery.cancel_scope.cancel()
    return selected[0], echoed


async def test_the_server_context_selects_h2_and_asks_no_client_certificate(
    tmp_path: Path,
) -> None:
    tls = write_certificate(tmp_path).tls
    context = tls.server_context()
    assert context is tls.server_context()  # made once (by load_tls), served to every connection
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    offered = client_context(tls.certificate_chain, ["http/1.1", "h2"])
    assert await echo_over_tls(tls, offered) == ("h2", b"ping")
    # A client that cannot speak HTTP/2 completes the handshake with no protocol selected:
    # the gRPC server then closes it.
    http1 = client_context(tls.certificate_chain, ["http/1.1"])
    assert await echo_over_tls(tls, http1) == (None, b"ping")


#: Whether this machine loads a key from memory (Linux's memfd_create and /proc).
IN_MEMORY = hasattr(os, "memfd_create") and os.path.isdir(_tls._PROC_FDS)


@pytest.mark.parametrize(
    "memory",
    [
        pytest.param(True, id="memfd", marks=pytest.mark.skipif(not IN_MEMORY, reason="no memfd")),
        pytest.param(False, id="private-directory"),
    ],
)
async def test_the_server_context_leaves_no_key_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory: bool
) -> None:
    # Python's ssl loads a key from a file only: on Linux one in memory; elsewhere (as when
    # /proc is not mounted) a private temporary directory's, removed at once.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    if not memory:
        monkeypatch.setattr(_tls, "_PROC_FDS", str(tmp_path / "no-proc"))
    made = self_signed_tls()
    tls = ExtProcTLS(made.certificate_chain, made.private_key, "a certificate in memory")
    offered = client_context(tls.certificate_chain, ["h2"])
    assert await echo_over_tls(tls, offered) == ("h2", b"ping")
    assert list(temporary.iterdir()) == []


def _with_a_broken_public_key(chain: bytes) -> bytes:
    """``chain``'s certificate with its ECDSA public key's point format byte changed."""
    certificate = x509.load_pem_x509_certificate(chain)
    point = certificate.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert der.count(point) == 1
    broken = x509.load_der_x509_certificate(der.replace(point, b"\x05" + point[1:]))
    return broken.public_bytes(serialization.Encoding.PEM)


def test_the_server_contexts_errors_name_the_extproctls(tmp_path: Path) -> None:
    ours, other = write_certificate(tmp_path), write_certificate(tmp_path, "other")
    chain, key = ours.tls.certificate_chain, ours.tls.private_key
    broken = _with_a_broken_public_key(chain)
    for tls, message in (
        (ExtProcTLS(key, key, "x"), "ExtProcTLS(x)'s certificate_chain is not a PEM certificate"),
        (ExtProcTLS(chain, chain, "x"), "ExtProcTLS(x)'s private_key is not a PEM private key"),
        (
            ExtProcTLS(chain, other.tls.private_key, "x"),
            "ExtProcTLS(x)'s private_key is not the private key of ExtProcTLS(x)'s "
            "certificate_chain",
        ),
        (
            ExtProcTLS(broken, key, "x"),
            "ExtProcTLS(x)'s certificate_chain: its certificate's public key is not valid",
        ),
    ):
        with pytest.raises(ConfigError) as failed:
            tls.server_context()
        assert message in str(failed.value), str(failed.value)


@functools.cache
def _made() -> ExtProcTLS:
    """One self-signed certificate and key, made once for the tests that corrupt them."""
    return self_signed_tls()


@given(
    st.sampled_from(["certificate_chain", "private_key"]),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), min_size=1, max_size=4),
    st.integers(0, 10_000) | st.none(),
)
def test_a_corrupted_certificate_or_key_is_a_config_error_or_still_served(
    part: str, edits: list[tuple[int, bytes]], cut: int | None
) -> None:
    # Bytes anywhere in the PEM replaced, and maybe cut short: whatever OpenSSL or the
    # cryptography package makes of them, the answer is a context or a ConfigError.
    made = _made()
    corrupted = bytearray(getattr(made, part))
    for at, replacement in edits:
        at %= len(corrupted)
        corrupted[at : at + len(replacement)] = replacement
    if cut is not None:
        del corrupted[cut % len(corrupted) :]
    tls = attrs.evolve(made, **{part: bytes(corrupted)})
    try:
        context = tls.server_context()
    except ConfigError as exc:
        assert f"ExtProcTLS({made.source})'s" in str(exc), str(exc)
    else:
        assert isinstance(context, ssl.SSLContext)


# -- which certificate keys gateways' TLS clients complete a handshake with ------------------------


#: The keys both Envoy and grpcio's client complete a handshake with (tried below).
SERVED_KEYS = ("rsa-2048", "rsa-3072", "p-256")
#: Keys OpenSSL loads but a gateway completes no handshake with: Envoy (TLS 1.2, curves X25519
#: and P-256) finds no cipher for any of them; grpcio's client (TLS 1.3) serves P-384 too, but
#: finds no cipher for DSA, P-224 or secp256k1 and no signature algorithm for Ed25519, Ed448,
#: P-521 or RSA-PSS.
UNSERVABLE_KEYS = ("p-384", "p-521", "p-224", "secp256k1", "ed25519", "ed448", "dsa", "rsa-pss")
#: OpenSSL refuses to load this key at all (security level 2).
SHORT_KEYS = ("rsa-1024",)


class KeyPairs:
    """Certificates and keys of each kind `_pair` makes, made once for the module (DSA's and
    RSA's take a while)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: dict[str, tuple[Path, Path]] = {}

    def __getitem__(self, label: str) -> tuple[Path, Path]:
        if label not in self.made:
            self.made[label] = _pair(self.directory, label)
        return self.made[label]

    def unchecked(self, labels: tuple[str, ...]) -> dict[str, ssl.SSLContext]:
        """Server contexts as `ExtProcTLS.server_context` makes them, but without refusing
        the key, for each of ``labels`` this machine can make."""
        contexts = {}
        for label in labels:
            if label == "rsa-pss" and shutil.which("openssl") is None:
                continue
            cert, key = self[label]
            contexts[label] = _tls._h2_context(cert.read_bytes(), key.read_bytes())
        return contexts


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> KeyPairs:
    return KeyPairs(tmp_path_factory.mktemp("keys"))


def _pair(directory: Path, label: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` with a key of the kind ``label`` names,
    and its unencrypted key, as files."""
    cert, key = directory / f"{label}.pem", directory / f"{label}-key.pem"
    if label == "rsa-pss":
        # The cryptography package makes no RSA-PSS keys; OpenSSL's command does.
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("no openssl command to make an RSA-PSS key")
        for argv in (
            ["genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048"],
            ["req", "-x509", "-new", "-key", str(key), "-days", "1", "-subj", "/CN=localhost"],
        ):
            out = key if argv[0] == "genpkey" else cert
            subprocess.run([openssl, *argv, "-out", str(out)], check=True, capture_output=True)
        return cert, key
    with warnings.catch_warnings():  # DSA's deprecation: the point here
        warnings.simplefilter("ignore")
        made = _private_key(label)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    digest = None if label.startswith("ed") else hashes.SHA256()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(made.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(made, digest)
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        made.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def _private_key(label: str) -> Any:
    return {
        "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
        "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
        "rsa-3072": lambda: rsa.generate_private_key(65537, 3072),
        "p-256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p-384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p-521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "p-224": lambda: ec.generate_private_key(ec.SECP224R1()),
        "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
        "dsa": lambda: dsa.generate_private_key(2048),
    }[label]()


def _health_over_tls(address: str, trusted: bytes) -> Any:
    """grpcio's TLS client's health check at ``address`` (its status, or the failed call's
    code)."""
    try:
        with tls_channel(address, trusted) as channel:
            return health(channel).status
    except grpc.RpcError as exc:
        return exc.code()


@attrs.define
class Handshakes:
    """Loopback TLS servers, one for each label's context, and how the first handshake each
    one saw ended: ``"h2"`` (completed, HTTP/2 selected) or OpenSSL's reason it failed."""

    ports: dict[str, int]
    outcomes: dict[str, str] = attrs.Factory(dict)
    _all_seen: trio.Event = attrs.Factory(trio.Event)

    async def wait(self) -> dict[str, str]:
        with trio.fail_after(TIMEOUT):
            await self._all_seen.wait()
        return self.outcomes

    def seen(self, label: str, outcome: str) -> None:
        self.outcomes.setdefault(label, outcome)
        if len(self.outcomes) == len(self.ports):
            self._all_seen.set()


@asynccontextmanager
async def handshakes(contexts: dict[str, ssl.SSLContext]) -> AsyncIterator[Handshakes]:
    async with trio.open_nursery() as nursery:
        ports: dict[str, int] = {}
        seen: Handshakes = Handshakes(ports)
        for label in contexts:

            async def handshake(stream: trio.SocketStream, label: str = label) -> None:
                secured = trio.SSLStream(stream, contexts[label], server_side=True)
                try:
                    await secured.do_handshake()
                except trio.BrokenResourceError as exc:
                    failure = exc.__cause__
                    seen.seen(label, getattr(failure, "reason", None) or repr(failure))
                else:
                    seen.seen(label, secured.selected_alpn_protocol() or "no ALPN")
                await trio.aclose_forcefully(stream)

            serve = partial(trio.serve_tcp, handshake, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            ports[label] = listener.socket.getsockname()[1]
        yield seen
        nursery.cancel_scope.cancel()


async def test_grpcios_client_completes_a_handshake_with_the_servable_keys_and_p384(
    pairs: KeyPairs,
) -> None:
    contexts = pairs.unchecked(SERVED_KEYS + UNSERVABLE_KEYS)
    async with handshakes(contexts) as seen:
        channels = [
            tls_channel(f"127.0.0.1:{port}", pairs[label][0].read_bytes())
            for label, port in seen.ports.items()
        ]
        try:
            for channel in channels:  # connects in the background, never waits
                channel.subscribe(lambda _: None, try_to_connect=True)
            outcomes = await seen.wait()
        finally:
            for channel in channels:
                channel.close()
    served = {label for label, outcome in outcomes.items() if outcome == "h2"}
    assert served == {*SERVED_KEYS, "p-384"}, outcomes


async def test_envoy_completes_a_handshake_with_the_servable_keys_only(
    pairs: KeyPairs, tmp_path: Path
) -> None:
    require_envoy()
    contexts = pairs.unchecked(SERVED_KEYS + UNSERVABLE_KEYS)
    async with handshakes(contexts) as seen:
        # docs' TLS cluster, once for each key: Envoy health-checks each at start.
        config = gateway_config(ext_proc="127.0.0.1:1", ext_proc_health_port=None, pool=[])
        for label, port in seen.ports.items():
            cluster = tls_cluster(f"127.0.0.1:{port}")
            cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"key_{label}"
            config["static_resources"]["clusters"].append(cluster)
        async with open_envoy(config, tmp_path):
            outcomes = await seen.wait()
    served = {label for label, outcome in outcomes.items() if outcome == "h2"}
    assert served == set(SERVED_KEYS), outcomes


@pytest.mark.parametrize("label", SERVED_KEYS)
async def test_a_certificate_with_a_servable_key_is_served(pairs: KeyPairs, label: str) -> None:
    cert, key = pairs[label]
    tls = route(
        "--ext-proc-port", "0", "--ext-proc-tls-cert", str(cert), "--ext-proc-tls-key", str(key)
    ).ext_proc_tls
    async with serving_tls(tls) as s:
        status = await trio.to_thread.run_sync(_health_over_tls, s.ext_proc, cert.read_bytes())
        assert status == SERVING


@pytest.mark.parametrize("label", UNSERVABLE_KEYS + SHORT_KEYS)
def test_a_key_no_gateway_completes_a_handshake_with_is_refused_at_start(
    pairs: KeyPairs, label: str
) -> None:
    cert, key = pairs[label]
    with pytest.raises(ConfigError) as refused:
        route(
            "--ext-proc-port", "0",
            "--ext-proc-tls-cert", str(cert), "--ext-proc-tls-key", str(key),
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith(f"--ext-proc-tls-cert {str(cert)!r} holds "), message
    assert "RSA of 2048 bits or more, or ECDSA on P-256 (e.g. openssl req" in message
    # The same for a certificate given in Python.
    given = ExtProcTLS(cert.read_bytes(), key.read_bytes(), f"certificate {cert}")
    with pytest.raises(ConfigError, match=re.escape(f"{given!r}'s certificate_chain holds ")):
        given.server_context()


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def test_serving_a_key_no_gateway_completes_a_handshake_with_is_refused(
    pairs: KeyPairs,
) -> None:
    cert, key = pairs["p-384"]
    given = ExtProcTLS(cert.read_bytes(), key.read_bytes(), f"certificate {cert}")
    with pytest.raises((ConfigError, BaseExceptionGroup)) as failed:
        async with serving_tls(given):
            pass  # pragma: no cover
    (error,) = _leaves(failed.value)
    assert isinstance(error, ConfigError), repr(error)
    assert "holds an ECDSA key on secp384r1" in str(error)
    # And through interlock route's serving of a setup built in Python.
    setup = attrs.evolve(route("--ext-proc-port", "0"), ext_proc_tls=given)
    async with picking() as p, trio.open_nursery() as nursery:
        app = SimpleNamespace(state=SimpleNamespace(frontend=p.picker.frontend))
        with pytest.raises(ConfigError, match="holds an ECDSA key on secp384r1"):
            await _serve_ext_proc(nursery, setup, app)


# -- the flags, and the [gateway] table ------------------------------------------------------------


def route(*flags: str) -> Any:
    argv = ["route", "--engine", "1=http://10.0.0.1:8000", *flags]
    return resolve(frontend_parser().parse_args(argv))


def test_without_a_tls_flag_the_port_serves_h2c() -> None:
    assert route("--ext-proc-port", "0").ext_proc_tls is None
    assert route("--ext-proc-port", "0", "--ext-proc-tls", "off").ext_proc_tls is None


def test_self_signed_makes_a_certificate_naming_the_host_and_loopback() -> None:
    from cryptography import x509

    setup = route("--host", "10.1.2.3", "--ext-proc-port", "0", "--ext-proc-tls", "self-signed")
    tls = setup.ext_proc_tls
    assert tls is not None and "self-signed" in tls.source
    text = banner(setup, "http://10.1.2.3:8000", ext_proc=("10.1.2.3:9002", "10.1.2.3:9003"))
    assert "10.1.2.3:9002 (TLS, self-signed certificate made at start;" in text
    assert "gRPC health on 10.1.2.3:9003 (h2c)" in text
    names = (
        x509.load_pem_x509_certificate(tls.certificate_chain)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    addresses = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    assert {"10.1.2.3", "127.0.0.1", "::1"} <= addresses
    assert "localhost" in names.get_values_for_type(x509.DNSName)


def test_a_certificate_and_its_key_are_loaded(tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path)
    tls = route(
        "--ext-proc-port", "0",
        "--ext-proc-tls-cert", str(certificate.cert),
        "--ext-proc-tls-key", str(certificate.key),
    ).ext_proc_tls  # fmt: skip
    assert tls.certificate_chain == certificate.cert.read_bytes()
    assert tls.private_key == certificate.key.read_bytes()


def _encrypted_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    return path


def test_bad_tls_flags_are_config_errors_naming_the_flag(tmp_path: Path) -> None:
    ours = write_certificate(tmp_path)
    other = write_certificate(tmp_path, "other")
    encrypted = _encrypted_key(tmp_path / "encrypted-key.pem")
    cert, key = str(ours.cert), str(ours.key)
    cases: list[tuple[list[str], str]] = [
        (["--ext-proc-tls", "self-signed"], "--ext-proc-tls needs --ext-proc-port"),
        (["--ext-proc-tls-cert", cert, "--ext-proc-tls-key", key], "needs --ext-proc-port"),
        (["--ext-proc-port", "0", "--ext-proc-tls-cert", cert], "needs --ext-proc-tls-key"),
        (["--ext-proc-port", "0", "--ext-proc-tls-key", key], "needs --ext-proc-tls-cert"),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls", "self-signed",
             "--ext-proc-tls-cert", cert, "--ext-proc-tls-key", key],
            "drop --ext-proc-tls",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", str(tmp_path / "missing.pem"),
             "--ext-proc-tls-key", key],
            "--ext-proc-tls-cert: cannot read",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", cert,
             "--ext-proc-tls-key", str(tmp_path)],
            "--ext-proc-tls-key: cannot read",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", key, "--ext-proc-tls-key", key],
            "is not a PEM certificate",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", cert, "--ext-proc-tls-key", cert],
            "is not a PEM private key",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", cert,
             "--ext-proc-tls-key", str(other.key)],
            "is not the private key of --ext-proc-tls-cert",
        ),
        (
            ["--ext-proc-port", "0", "--ext-proc-tls-cert", cert,
             "--ext-proc-tls-key", str(encrypted)],
            "--ext-proc-tls-key",
        ),
    ]  # fmt: skip
    for flags, message in cases:
        with pytest.raises(ConfigError) as failed:
            route(*flags)
        assert message in str(failed.value), (flags, str(failed.value))
    with pytest.raises(ConfigError, match="is encrypted"):
        route(
            "--ext-proc-port",
            "0",
            "--ext-proc-tls-cert",
            cert,
            "--ext-proc-tls-key",
            str(encrypted),
        )


def test_the_gateway_table_sets_the_picker_and_a_flag_wins(tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path)
    config = tmp_path / "route.toml"
    config.write_text(
        'router_mode = "kv"\n\n[gateway]\next_proc_port = 9002\next_proc_health_port = 9003\n'
        f'ext_proc_fallbacks = 1\next_proc_tls_cert = "{certificate.cert}"\n'
        f'ext_proc_tls_key = "{certificate.key}"\n'
    )
    setup = route("--config", str(config))
    assert (setup.ext_proc_port, setup.ext_proc_health_port, setup.ext_proc_fallbacks) == (
        9002,
        9003,
        1,
    )
    assert setup.ext_proc_tls.certificate_chain == certificate.cert.read_bytes()
    assert setup.config.router_mode == "kv"  # the knobs of the same file still apply
    flagged = route("--config", str(config), "--ext-proc-port", "9102", "--ext-proc-fallbacks", "0")
    assert (flagged.ext_proc_port, flagged.ext_proc_fallbacks) == (9102, 0)

    config.write_text('[gateway]\next_proc_port = 9002\next_proc_tls = "self-signed"\n')
    assert "self-signed" in route("--config", str(config)).ext_proc_tls.source
    for text, message in (
        ("[gateway]\next_proc_prot = 9002\n", "did you mean 'ext_proc_port'"),
        ('[gateway]\next_proc_port = "9002"\n', "must be a whole number"),
        ("[gateway]\next_proc_port = 70000\n", "must be a port 0-65535"),
        ("[gateway]\next_proc_port = 1\next_proc_fallbacks = -1\n", "must be 0 or more"),
        ('[gateway]\next_proc_port = 1\next_proc_tls = "on"\n', "must be 'off' or 'self-signed'"),
        ('[gateway]\next_proc_tls = "self-signed"\n', "needs --ext-proc-port"),
    ):
        config.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            route("--config", str(config))


def test_a_tls_flag_replaces_the_tables_tls_keys(tmp_path: Path) -> None:
    ours = write_certificate(tmp_path)
    other = write_certificate(tmp_path, "other")
    config = tmp_path / "route.toml"
    config.write_text(
        f'[gateway]\next_proc_port = 9002\next_proc_tls_cert = "{ours.cert}"\n'
        f'ext_proc_tls_key = "{ours.key}"\n'
    )
    # The command line turns TLS off, or to a certificate made at start, for one run.
    assert route("--config", str(config), "--ext-proc-tls", "off").ext_proc_tls is None
    made = route("--config", str(config), "--ext-proc-tls", "self-signed").ext_proc_tls
    assert "self-signed" in made.source
    # Another certificate on the command line: its files, none of the table's.
    flagged = route(
        "--config", str(config),
        "--ext-proc-tls-cert", str(other.cert), "--ext-proc-tls-key", str(other.key),
    ).ext_proc_tls  # fmt: skip
    assert flagged.certificate_chain == other.cert.read_bytes()
    config.write_text('[gateway]\next_proc_port = 9002\next_proc_tls = "self-signed"\n')
    flagged = route(
        "--config", str(config),
        "--ext-proc-tls-cert", str(ours.cert), "--ext-proc-tls-key", str(ours.key),
    ).ext_proc_tls  # fmt: skip
    assert flagged.certificate_chain == ours.cert.read_bytes()


def test_a_flag_replaces_a_bad_key_of_the_gateway_table(tmp_path: Path) -> None:
    # A flag wins over its key, and any TLS flag replaces the table's TLS keys as a whole
    # (`_apply_gateway_table`): a key the command line replaces is not used, so its value
    # does not refuse the run.
    config = tmp_path / "route.toml"
    config.write_text('[gateway]\next_proc_port = 9002\next_proc_tls = "on"\n')
    assert route("--config", str(config), "--ext-proc-tls", "off").ext_proc_tls is None
    config.write_text("[gateway]\next_proc_port = 70000\n")
    assert route("--config", str(config), "--ext-proc-port", "9102").ext_proc_port == 9102


def test_the_tables_tls_errors_name_its_keys_not_flags(tmp_path: Path) -> None:
    ours = write_certificate(tmp_path)
    config = tmp_path / "route.toml"
    table = f"[gateway] {{}} of {config}"
    cert, key = f'ext_proc_tls_cert = "{ours.cert}"\n', f'ext_proc_tls_key = "{ours.key}"\n'
    port = "ext_proc_port = 9002\n"
    missing = f'ext_proc_tls_cert = "{tmp_path / "missing.pem"}"\n'
    for text, message in (
        (port + cert, f"{table.format('ext_proc_tls_cert')} needs "
         f"{table.format('ext_proc_tls_key')} too"),
        (port + 'ext_proc_tls = "self-signed"\n' + cert + key,
         f"{table.format('ext_proc_tls')} self-signed with {table.format('ext_proc_tls_cert')}"),
        (port + missing + key, f"{table.format('ext_proc_tls_cert')}: cannot read"),
        (port + cert.replace("ext_proc_tls_cert", "ext_proc_tls_key") + key.replace(
            "ext_proc_tls_key", "ext_proc_tls_cert"),
         f"{table.format('ext_proc_tls_cert')} {str(ours.key)!r} is not a PEM certificate"),
        (cert + key, f"{table.format('ext_proc_tls_cert')} needs --ext-proc-port"),
    ):  # fmt: skip
        config.write_text("[gateway]\n" + text)
        with pytest.raises(ConfigError) as failed:
            route("--config", str(config))
        assert message in str(failed.value), (text, str(failed.value))
        assert "--ext-proc-tls" not in str(failed.value), str(failed.value)


# -- a real Envoy talking TLS to a real picker ----------------------------------------------------


def test_the_page_shows_the_tls_cluster_the_tests_run() -> None:
    page = (ROOT / "docs" / "gateway.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", page, re.M | re.S)
    assert TLS_CLUSTER.read_text() in blocks, (
        "docs/gateway.md must show docs/gateway/envoy-ext-proc-tls.yaml verbatim in a ```yaml "
        "block (copy the file into the page again)"
    )


def tls_cluster(address: str) -> dict[str, Any]:
    """docs/gateway/envoy-ext-proc-tls.yaml's cluster, its endpoint at ``address``."""
    cluster: dict[str, Any] = yaml.safe_load(TLS_CLUSTER.read_text())
    host, _, port = address.rpartition(":")
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"] = {"socket_address": {"address": host, "port_value": int(port)}}
    return cluster


def tls_gateway_config(*, ext_proc: str, pool: list[str]) -> dict[str, Any]:
    """docs/gateway/envoy.yaml with the picker's cluster replaced by the TLS one of
    docs/gateway/envoy-ext-proc-tls.yaml, at this run's addresses."""
    config = gateway_config(ext_proc=ext_proc, ext_proc_health_port=None, pool=pool)
    clusters = config["static_resources"]["clusters"]
    index = next(i for i, c in enumerate(clusters) if c["name"] == "interlock_epp")
    clusters[index] = tls_cluster(ext_proc)
    return config


async def test_envoy_sends_requests_where_a_tls_picker_picked(tmp_path: Path) -> None:
    require_envoy()
    async with open_processes(tmp_path) as processes:
        kv_bind = f"tcp://127.0.0.1:{free_port()}"
        workers = [
            await processes.worker(
                i, "--served-model-name", "mock", "--kv-events-endpoint", kv_bind
            )
            for i in (1, 2)
        ]
        endpoints = [f"127.0.0.1:{w['openai_port']}" for w in workers]
        ext_proc_port = free_port()
        argv = [
            "route", "--host", "127.0.0.1", "--port", "0", "--model-name", "mock",
            "--ext-proc-port", str(ext_proc_port), "--ext-proc-tls", "self-signed",
            "--kv-events-bind", kv_bind, "--router-mode", "kv",
        ]  # fmt: skip
        for info in workers:
            argv += ["--engine", f"{info['worker_id']}={info['openai_url']}"]
        await processes.start(argv, "route")
        config = tls_gateway_config(ext_proc=f"127.0.0.1:{ext_proc_port}", pool=endpoints)
        async with (
            open_envoy(config, tmp_path) as envoy,
            httpx.AsyncClient(base_url=envoy.url, timeout=TIMEOUT) as client,
        ):
            for target in (1, 0, 1):

                async def started() -> list[int]:
                    counts = []
                    for worker in workers:
                        url = f"{worker['openai_url']}/mock/state"
                        counts.append((await client.get(url)).json()["requests_started"])
                    return counts

                before = await started()
                answer = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "mock",
                        "messages": [{"role": "user", "content": "over TLS"}],
                        "max_tokens": 4,
                    },
                    headers={"test-epp-endpoint-selection": endpoints[target]},
                )
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-conformance-test-served-endpoint"] == endpoints[target]
                after = await started()
                assert after[target] == before[target] + 1
                assert after[1 - target] == before[1 - target]
            stats = await envoy.stats()
        # Picked by the picker (not failed open), over TLS.
        assert stats["http.gateway.ext_proc.streams_failed"] == 0
        assert stats["http.gateway.ext_proc.failure_mode_allowed"] == 0
        assert stats["cluster.interlock_epp.ssl.handshake"] >= 1
