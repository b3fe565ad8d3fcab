"""TLS for the worker protocol: the contexts ``interlock worker`` and the frontends wrap
their TCP streams with (docs/wire-protocol.md#tls)."""

from __future__ import annotations

import os
import ssl

import trio

from ..._errors import ConfigError
from ._auth import WorkerAuthError

PathArg = str | os.PathLike[str]

#: What a frontend's TLS failure message points at.
FRONTEND_FLAGS = (
    "--worker-tls, --worker-ca-file, --worker-cert-file/--worker-key-file "
    "(RemoteEngine(tls=client_context(...)) in Python)"
)

#: OpenSSL's reasons for a peer whose bytes are not TLS (a frontend without --worker-tls,
#: a worker without --tls-cert-file).
NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


class WorkerTLSError(WorkerAuthError):
    """TLS between a frontend and a worker failed: the worker's certificate is not trusted
    or does not name its host, one side does not speak TLS, or the worker requires a client
    certificate the frontend does not show. The message says which, and which flags fix it."""


def server_context(
    cert_file: PathArg, key_file: PathArg, client_ca_file: PathArg | None = None
) -> ssl.SSLContext:
    """The worker's TLS context: its certificate chain and key and, with ``client_ca_file``,
    only clients with a certificate that CA signed (mutual TLS). TLS 1.2 at least. Reads
    the files.

    Raises:
        ConfigError: a file cannot be read or is not a PEM certificate/key (the message
            names the flag: ``--tls-cert-file``, ``--tls-key-file``, ``--tls-client-ca-file``).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file, "--tls-cert-file", "--tls-key-file")
    if client_ca_file is not None:
        _load_ca(context, client_ca_file, "--tls-client-ca-file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: PathArg | None = None,
    cert_file: PathArg | None = None,
    key_file: PathArg | None = None,
) -> ssl.SSLContext:
    """A frontend's TLS context: it verifies the workers' certificates against ``ca_file``
    (None: the system's CAs) and their host names (an IP address matches an IP SAN), and
    with ``cert_file``/``key_file`` shows its own certificate (mutual TLS). Reads the files.

    Raises:
        ConfigError: only one of ``cert_file``/``key_file``, or a file cannot be read or is
            not PEM (the message names the flag: ``--worker-ca-file``, ``--worker-cert-file``,
            ``--worker-key-file``).
    """
    check_pair(cert_file, key_file, "--worker-cert-file", "--worker-key-file")
    if ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        # Verifies certificates and host names, like the default context, but trusts only
        # ``ca_file``.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_ca(context, ca_file, "--worker-ca-file")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file, "--worker-cert-file", "--worker-key-file")
    return context


def check_pair(cert: object, key: object, cert_flag: str, key_flag: str) -> None:
    """Raise `ConfigError` unless both or neither of a certificate and its key are given."""
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise ConfigError(f"{given} needs {missing} too (a certificate and its private key)")


def _load_chain(
    context: ssl.SSLContext, cert: PathArg, key: PathArg, cert_flag: str, key_flag: str
) -> None:
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except FileNotFoundError as exc:
        flag = cert_flag if exc.filename in (None, os.fspath(cert)) else key_flag
        raise ConfigError(f"{flag}: cannot read {exc.filename or cert!s}: {exc.strerror}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{cert_flag} {os.fspath(cert)!r} / {key_flag} {os.fspath(key)!r}: not a PEM "
            f"certificate and its matching private key ({exc})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: PathArg, flag: str) -> None:
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
    except FileNotFoundError as exc:
        raise ConfigError(f"{flag}: cannot read {os.fspath(ca)!r}: {exc.strerror}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{flag} {os.fspath(ca)!r}: not PEM CA certificates ({exc})") from None


def ssl_failure(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` behind ``exc`` (trio wraps it in `trio.BrokenResourceError`), or
    None when ``exc`` is not a TLS failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def wrap(
    stream: trio.abc.Stream, context: ssl.SSLContext, *, server_hostname: str | None = None
) -> trio.SSLStream[trio.abc.Stream]:
    """``stream`` inside TLS (the handshake happens on first use or ``do_handshake``)."""
    return trio.SSLStream(
        stream,
        context,
        server_side=server_hostname is None,
        server_hostname=server_hostname,
        https_compatible=True,
    )
