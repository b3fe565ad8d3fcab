"""TLS on the endpoint picker's gRPC ports (``interlock route --ext-proc-tls ...``).

GAIE's picker serves TLS by default (llm-d's ``--secure-serving``: a self-signed certificate
unless ``--cert-path`` names one), and the gateways built on it expect that: Istio's and
kgateway's Envoy talk to the picker over TLS without verifying its certificate. interlock's
default stays cleartext h2c (the issue's contract); `load_tls` serves a PEM certificate and key
of your own, `self_signed_tls` makes a throwaway one at start, as llm-d does.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import warnings
from collections.abc import Sequence
from typing import Final

import attrs
import grpc

from .._config import EXT_PROC_TLS_SELF_SIGNED
from .._errors import ConfigError

__all__ = ["SERVABLE_KEYS", "ExtProcTLS", "load_tls", "self_signed_tls"]

CERT_FLAG: Final = "--ext-proc-tls-cert"
KEY_FLAG: Final = "--ext-proc-tls-key"
#: The certificate keys the picker serves, as the error says them. grpcio's TLS (BoringSSL)
#: refuses DSA, Ed448, RSA-PSS and EC curves other than P-256/P-384/P-521 when the port is
#: bound; it binds Ed25519 and P-521 keys, but neither grpcio's clients nor Envoy (BoringSSL)
#: offer their signature algorithms by default, so every handshake would fail (Envoy then
#: fails open, sending requests past the picker). tests/test_gateway_tls.py tries each.
SERVABLE_KEYS: Final = "RSA of 2048 bits or more, or ECDSA on P-256 or P-384"
_MIN_RSA_BITS: Final = 2048
_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
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

    def credentials(self) -> grpc.ServerCredentials:
        """grpcio's server credentials (no client certificate asked for: gateways show none)."""
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])

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
    (PEM), checked to be a pair now, so a bad file fails at start, not at each gateway's
    handshake. Reads the files.

    Raises:
        ConfigError: a file is missing or unreadable, is not PEM of its kind, the key is
            encrypted, or the two do not match (the message names the flag and the file).
    """
    cert, key = os.fspath(cert_path), os.fspath(key_path)
    chain = _read(cert, cert_flag)
    private_key = _read(key, key_flag)
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(
            f"{cert_flag} {cert!r} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' "
            "line); give the server's certificate chain in PEM"
        )
    if b"PRIVATE KEY-----" not in private_key:
        raise ConfigError(
            f"{key_flag} {key!r} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' "
            "line); give the certificate's private key in PEM"
        )
    if b"ENCRYPTED" in private_key:
        raise ConfigError(
            f"{key_flag} {key!r} is encrypted: the picker takes an unencrypted PEM key "
            "(e.g. openssl pkey -in KEY -out KEY.plain); keep the file readable by it only"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"{key_flag} {key!r} is not the private key of {cert_flag} {cert!r} (the key "
                "and the certificate's public key do not match); give the key the certificate "
                "was made for"
            ) from None
        raise ConfigError(
            f"{cert_flag} {cert!r} / {key_flag} {key!r}: not a PEM certificate chain and its "
            f"private key ({exc})"
        ) from None
    _check_servable(chain, cert, cert_flag)
    return ExtProcTLS(chain, private_key, f"certificate {cert}")


def _check_servable(chain: bytes, cert: str, cert_flag: str) -> None:
    """Raise `ConfigError` unless the chain's first certificate (the server's, whose key
    signs the handshake) has a key of `SERVABLE_KEYS`."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import PublicKeyAlgorithmOID

    try:
        certificate = x509.load_pem_x509_certificate(chain)
    except ValueError as exc:  # OpenSSL took it: unlikely, but say so rather than crash
        raise ConfigError(f"{cert_flag} {cert!r}: cannot read its certificate ({exc})") from None
    try:
        with warnings.catch_warnings():
            # DSA's deprecation warning: the error below says what to use instead.
            warnings.simplefilter("ignore")
            public_key: object = certificate.public_key()
    except UnsupportedAlgorithm:
        public_key = None
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
        f"{cert_flag} {cert!r} holds {kind}, which the picker's TLS (grpcio's BoringSSL, and "
        f"Envoy's) cannot serve; give a certificate with a key of these: {SERVABLE_KEYS} "
        "(e.g. openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes ...)"
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
