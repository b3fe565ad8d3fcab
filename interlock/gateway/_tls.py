"""TLS on the endpoint picker's gRPC ports (``interlock route --ext-proc-tls ...``).

GAIE's picker serves TLS by default (llm-d's ``--secure-serving``: a self-signed certificate
unless ``--cert-path`` names one), and the gateways built on it expect that: Istio's and
kgateway's Envoy talk to the picker over TLS without verifying its certificate. interlock's
default stays cleartext h2c (the issue's contract); `load_tls` serves a PEM certificate and key
of your own, `self_signed_tls` makes a throwaway one at start, as llm-d does.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Final

import attrs

from .._config import EXT_PROC_TLS_SELF_SIGNED
from .._errors import ConfigError

__all__ = ["SERVABLE_KEYS", "ExtProcTLS", "load_tls", "self_signed_tls"]

CERT_FLAG: Final = "--ext-proc-tls-cert"
KEY_FLAG: Final = "--ext-proc-tls-key"
#: The certificate keys the picker serves, as the error says them: those with which both
#: gateway TLS clients (BoringSSL's: Envoy's and grpcio's) complete a handshake against the
#: picker's OpenSSL server context. OpenSSL would serve the others, but Envoy's upstream TLS
#: (TLS 1.2 at most, offering the curves X25519 and P-256 by default) finds no cipher for an
#: ECDSA key on another curve (P-384 included), nor for DSA, Ed25519, Ed448 or RSA-PSS keys,
#: and grpcio's client (TLS 1.3) no signature algorithm for Ed25519, Ed448, P-521 or RSA-PSS
#: keys: every handshake would fail, and Envoy, failing open, would send requests past the
#: picker. OpenSSL itself refuses RSA keys under 2048 bits (security level 2).
#: tests/test_gateway_tls.py tries each key with both clients.
SERVABLE_KEYS: Final = "RSA of 2048 bits or more, or ECDSA on P-256"
_MIN_RSA_BITS: Final = 2048
_CURVES: Final = frozenset({"secp256r1"})
#: The one protocol the server offers by ALPN: gRPC runs on HTTP/2, which gRPC's TLS clients
#: (grpcio's, Envoy's) ask for by ALPN.
ALPN: Final = "h2"
#: TLS 1.2's ciphers HTTP/2 allows (RFC 9113 9.2.2: ephemeral key exchange and AEAD only;
#: OpenSSL's default list also has CBC ones, which an HTTP/2 client may refuse). TLS 1.3's
#: ciphers all qualify and are not set by this string. ``@SECLEVEL=2`` pins the security level
#: `SERVABLE_KEYS` and the errors assume (RSA keys of 2048 bits or more, no SHA-1 signatures):
#: a cipher string without it keeps the context's level, which is 2 only when Python was built
#: with its own default cipher string (``--with-ssl-default-suites=openssl`` keeps OpenSSL's).
_H2_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"
#: How long a self-signed certificate is valid (llm-d's: ten years; the process restarts long
#: before, making a new one).
_SELF_SIGNED_DAYS: Final = 3650


@attrs.frozen(repr=False)
class ExtProcTLS:
    """A PEM certificate chain and its private key for the picker's gRPC ports, and where they
    came from (``source``, for the banner)."""

    certificate_chain: bytes
    private_key: bytes
    source: str
    #: `server_context`'s context once made (not part of the value: equal chains and keys
    #: make equal contexts).
    _context: ssl.SSLContext | None = attrs.field(default=None, init=False, eq=False)

    def server_context(self) -> ssl.SSLContext:
        """The server side's TLS context for the picker's port: TLS 1.2 or later, ALPN
        offering ``h2`` alone, this certificate chain and key, no client certificate asked
        for (gateways show none). Made at the first call and the same one after (`load_tls`
        makes it, so a bad file fails at start).

        Raises:
            ConfigError: the chain and key are not PEM, the key is encrypted or not the
                certificate's, it is not a key of `SERVABLE_KEYS`, OpenSSL refuses the chain
                (a CA's key too short), or no temporary file can hand them to OpenSSL.
        """
        return self._load(f"{self!r}'s certificate_chain", f"{self!r}'s private_key")

    def _load(self, cert_name: str, key_name: str) -> ssl.SSLContext:
        """`server_context`, whose errors say the chain is ``cert_name`` and the key
        ``key_name`` (`load_tls`: the flags and files)."""
        if self._context is None:
            context = _server_context(self.certificate_chain, self.private_key, cert_name, key_name)
            # A cache, not a change of value: the frozen class allows it this way only.
            object.__setattr__(self, "_context", context)
            return context
        return self._context

    def __repr__(self) -> str:
        return f"ExtProcTLS({self.source})"


def load_tls(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    cert_flag: str = CERT_FLAG,
    key_flag: str = KEY_FLAG,
) -> ExtProcTLS:
    """The certificate chain at ``cert_path`` and the unencrypted private key at ``key_path``
    (PEM), with its `ExtProcTLS.server_context` made now, so a bad file fails at start, not at
    each gateway's handshake. Reads the files.

    Raises:
        ConfigError: a file is missing or unreadable, is not PEM of its kind, the key is
            encrypted, the two do not match, or the key is not of `SERVABLE_KEYS` (the message
            names the flag and the file).
    """
    cert, key = os.fspath(cert_path), os.fspath(key_path)
    tls = ExtProcTLS(_read(cert, cert_flag), _read(key, key_flag), f"certificate {cert}")
    tls._load(f"{cert_flag} {cert!r}", f"{key_flag} {key!r}")
    return tls


def _server_context(chain: bytes, key: bytes, cert_name: str, key_name: str) -> ssl.SSLContext:
    """`ExtProcTLS.server_context` for ``chain`` and ``key``, named ``cert_name`` and
    ``key_name`` in its `ConfigError`."""
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(
            f"{cert_name} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line); "
            "give the server's certificate chain in PEM"
        )
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(
            f"{key_name} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line); "
            "give the certificate's private key in PEM"
        )
    if b"ENCRYPTED" in key:
        raise ConfigError(
            f"{key_name} is encrypted: the picker takes an unencrypted PEM key "
            "(e.g. openssl pkey -in KEY -out KEY.plain); keep the file readable by it only"
        )
    # Before OpenSSL loads the key: it refuses some (a short RSA key) with a reason of its own.
    _check_servable(chain, cert_name)
    try:
        return _h2_context(chain, key)
    except ssl.SSLError as exc:  # before OSError, its base class
        raise _refused(exc, cert_name, key_name) from None
    except OSError as exc:
        raise ConfigError(
            f"{cert_name} / {key_name}: cannot hand them to OpenSSL, neither through memory "
            f"(memfd_create) nor through a private temporary directory ({exc}); set TMPDIR to "
            "a directory this user can write"
        ) from None


#: OpenSSL's reasons for refusing a well-formed chain at security level 2 (`_H2_TLS12_CIPHERS`),
#: and what each says of it.
_TOO_WEAK: Final = {
    "CA_KEY_TOO_SMALL": "a CA certificate in it has a key too short (RSA or DSA under 2048 bits, "
    "ECDSA under 224)",
    "CA_MD_TOO_WEAK": "a certificate in it is signed with a digest too weak (SHA-1 or MD5)",
    "EE_KEY_TOO_SMALL": "the server's certificate has a key too short",
}


def _refused(exc: ssl.SSLError, cert_name: str, key_name: str) -> ConfigError:
    """The `ConfigError` saying why OpenSSL refused to load ``cert_name`` and ``key_name``."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return ConfigError(
            f"{key_name} is not the private key of {cert_name} (the key and the certificate's "
            "public key do not match); give the key the certificate was made for"
        )
    if exc.reason in _TOO_WEAK:
        return ConfigError(
            f"OpenSSL refuses {cert_name} at security level 2: {_TOO_WEAK[exc.reason]} "
            f"({exc.reason}); give a chain whose certificates have RSA keys of 2048 bits or "
            "more or ECDSA keys and are signed with SHA-256 or stronger, or leave a weak root CA "
            "out of the chain (a gateway that verifies the certificate holds the root itself)"
        )
    if exc.reason is None:
        # Python's ssl gives no reason when OpenSSL cannot decode a file ("[SSL] PEM lib").
        return ConfigError(
            f"{cert_name} / {key_name}: not a PEM certificate chain and its private key that "
            f"OpenSSL can read ({exc}); give the server's certificate chain and its key in PEM, "
            "as made"
        )
    return ConfigError(
        f"OpenSSL refuses {cert_name} / {key_name}: {exc.reason} ({exc}); give a certificate "
        f"chain and key OpenSSL serves at security level 2, with a key of {SERVABLE_KEYS}"
    )


def _h2_context(chain: bytes, key: bytes) -> ssl.SSLContext:
    """The server context of `ExtProcTLS.server_context`, its key unchecked.

    Raises:
        ssl.SSLError: OpenSSL cannot load ``chain`` and ``key`` as a pair.
        OSError: `_load_pair` can hand them to OpenSSL no way.
    """
    # Server side: no client certificate is asked for (verify_mode stays CERT_NONE).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/2 forbids TLS compression and renegotiation (RFC 9113 9.2.1).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(_H2_TLS12_CIPHERS)
    context.set_alpn_protocols([ALPN])
    _load_pair(context, chain, key)
    return context


def _load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """Load ``chain`` and ``key`` into ``context``. Python's `ssl` loads a certificate and key
    from files only: on Linux, files in memory (``memfd_create``, read through
    ``/proc/self/fd``), so the key never touches a disk. Where that fails (no ``memfd_create``,
    the kernel or a seccomp filter refusing it with ENOSYS or EPERM, no ``/proc``), files only
    this user can read in a private temporary directory, removed at once.

    Raises:
        ssl.SSLError: OpenSSL read them and refused them.
        OSError: the private temporary directory cannot be made or written.
    """
    if hasattr(os, "memfd_create"):
        try:
            with _in_memory(chain, key) as (chain_path, key_path):
                context.load_cert_chain(chain_path, key_path, password=_no_password)
            return
        except ssl.SSLError:
            raise  # OpenSSL read them: from a directory it would refuse them the same way
        except OSError:
            pass  # memory refused: the directory below
    with _in_private_directory(chain, key) as (chain_path, key_path):
        context.load_cert_chain(chain_path, key_path, password=_no_password)


@contextlib.contextmanager
def _in_memory(*contents: bytes) -> Iterator[list[str]]:
    """Paths of files in memory holding ``contents`` while the block runs (Linux).

    Raises:
        OSError: ``memfd_create`` or writing refused.
    """
    descriptors: list[int] = []
    try:
        for data in contents:
            descriptors.append(os.memfd_create("interlock-tls", os.MFD_CLOEXEC))
            with os.fdopen(os.dup(descriptors[-1]), "wb") as file:
                file.write(data)
        yield [f"{_PROC_FDS}/{descriptor}" for descriptor in descriptors]
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


@contextlib.contextmanager
def _in_private_directory(*contents: bytes) -> Iterator[list[str]]:
    """Paths of files only this user can read holding ``contents`` while the block runs, in a
    temporary directory removed when it ends.

    Raises:
        OSError: the directory cannot be made or written.
    """
    with tempfile.TemporaryDirectory(prefix="interlock-tls-") as directory:  # mode 0o700
        paths = []
        for index, data in enumerate(contents):
            path = os.path.join(directory, str(index))
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                file.write(data)
            paths.append(path)
        yield paths


#: Where Linux shows a process's open files as paths (a memfd opens from its start there).
_PROC_FDS: Final = "/proc/self/fd"


def _check_servable(chain: bytes, cert_name: str) -> None:
    """Raise `ConfigError` unless the chain's first certificate (the server's, whose key
    signs the handshake) has a key of `SERVABLE_KEYS`."""
    from cryptography import x509
    from cryptography.exceptions import InternalError, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import PublicKeyAlgorithmOID

    # What the cryptography package raises on bytes it cannot read as a certificate or its
    # key, here so that each kind is named once: ValueError (not PEM, bad DER, a point off
    # its curve), x509.InvalidVersion (a version field other than v1-v3: not a ValueError,
    # and OpenSSL loads such a certificate), InternalError (OpenSSL failing beneath it).
    unreadable = (ValueError, x509.InvalidVersion, InternalError)
    try:
        certificate = x509.load_pem_x509_certificate(chain)
    except (*unreadable, UnsupportedAlgorithm) as exc:  # checked before OpenSSL reads it
        raise ConfigError(
            f"{cert_name}: cannot read its first certificate (the server's) "
            f"({type(exc).__name__}: {exc}); give the server's certificate chain in PEM, as made"
        ) from None
    try:
        with warnings.catch_warnings():
            # DSA's deprecation warning: the error below says what to use instead.
            warnings.simplefilter("ignore")
            public_key: object = certificate.public_key()
    except UnsupportedAlgorithm:
        public_key = None
    except unreadable as exc:  # a key of a known type, but not a valid one
        raise ConfigError(
            f"{cert_name}: its certificate's public key is not valid ({exc}); give the server's "
            "certificate chain as made"
        ) from None
    if isinstance(public_key, rsa.RSAPublicKey):
        if certificate.public_key_algorithm_oid != PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5:
            kind = "an RSA-PSS key"
        elif public_key.key_size < _MIN_RSA_BITS:
            kind = f"a {public_key.key_size}-bit RSA key"
        else:
            return
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in _CURVES:
            return
        kind = f"an ECDSA key on {public_key.curve.name}"
    elif public_key is None:
        kind = "a key of a type the cryptography package does not know"
    else:
        kind = f"a key of type {type(public_key).__name__.removesuffix('PublicKey')}"
    raise ConfigError(
        f"{cert_name} holds {kind}, with which gateways' TLS clients (Envoy's and grpcio's, "
        f"BoringSSL) cannot complete a handshake; give a certificate with a key of these: "
        f"{SERVABLE_KEYS} (e.g. openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
        "-nodes ...)"
    )


def self_signed_tls(hosts: Sequence[str] = ()) -> ExtProcTLS:
    """A new ECDSA P-256 key and a self-signed certificate for it (valid ten years from an hour
    ago), naming ``localhost``, ``127.0.0.1``, ``::1``, this machine's host name and each of
    ``hosts`` (a name or an address; wildcard addresses are skipped). Gateways that skip
    verification (GAIE's) accept it; a gateway that verifies needs `load_tls`. Takes a few
    milliseconds of CPU.

    Raises:
        ConfigError: the ``cryptography`` package is not installed.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError(
            f"--ext-proc-tls {EXT_PROC_TLS_SELF_SIGNED} makes its certificate with the "
            "cryptography package, which is not installed: pip install cryptography, or give a "
            f"certificate of your own with {CERT_FLAG} and {KEY_FLAG}"
        ) from None
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts):
        host = host.strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
            continue
        if not address.is_unspecified:
            names.append(x509.IPAddress(address))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "interlock endpoint picker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ExtProcTLS(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "self-signed certificate made at start",
    )


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ConfigError("the private key is encrypted: the picker takes an unencrypted PEM key")
