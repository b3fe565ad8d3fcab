"""The worker protocol's shared secret: where it comes from, and the proofs of the handshake.

Challenge-response, both ways (docs/wire-protocol.md, "Authentication"): the worker sends a
fresh random nonce (`Challenge`), the frontend answers with its own nonce and an HMAC-SHA256
under the secret over the protocol version and both nonces (`Auth`), and the worker's
`Welcome` carries its own HMAC over the same values under another label. The secret never
crosses the wire; a recorded `Auth` is worthless on a later connection (the worker's nonce is
new); a peer without the secret can produce neither proof.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from ..._errors import ConfigError
from ...wire._frames import ProtocolError

#: The environment variable holding the secret itself (``--secret-file`` /
#: ``--worker-secret-file`` win over it).
SECRET_ENV = "INTERLOCK_WORKER_SECRET"
#: The shortest secret accepted, in bytes: a guessable secret would be no protection.
MIN_SECRET_BYTES = 16
#: Bytes of each nonce.
NONCE_BYTES = 32

_LABEL = b"interlock worker protocol auth\x00"
_HOW_TO_MAKE = "make one with `python -c 'import secrets; print(secrets.token_hex(32))'`"


class WorkerAuthError(ProtocolError):
    """The handshake's authentication failed: the worker requires a secret the frontend does
    not have, the two secrets differ, or the worker could not prove it knows the frontend's.
    The message says which, and what to give whom."""


def check_secret(secret: bytes | str, what: str = "the worker secret") -> bytes:
    """``secret`` as bytes (text as UTF-8).

    Raises:
        ConfigError: shorter than `MIN_SECRET_BYTES` bytes (the message says how to make one).
    """
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what} has {len(data)} bytes; it needs at least {MIN_SECRET_BYTES} (a short "
            f"secret can be guessed): {_HOW_TO_MAKE}"
        )
    return data


def load_secret(
    path: str | os.PathLike[str] | None,
    *,
    flag: str,
    environ: Mapping[str, str] | None = None,
) -> bytes | None:
    """The shared secret: the contents of the file at ``path`` (the command's ``flag``),
    else the `SECRET_ENV` variable, else None (no authentication). Surrounding whitespace
    (the newline an editor adds) is not part of it. Reads the file.

    Raises:
        ConfigError: the file cannot be read, or the secret is empty or too short (the
            message names ``flag`` or the variable).
    """
    env = os.environ if environ is None else environ
    if path is not None:
        try:
            text = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{flag} {str(path)!r}: cannot read the secret: {exc}") from None
        return check_secret(text, f"{flag} {str(path)!r}")
    value = env.get(SECRET_ENV)
    if value is None:
        return None
    return check_secret(value.strip(), SECRET_ENV)


def new_nonce() -> bytes:
    """A fresh random nonce (`NONCE_BYTES` bytes from the OS's generator)."""
    return secrets.token_bytes(NONCE_BYTES)


def frontend_proof(
    secret: bytes, version: int, worker_nonce: bytes, frontend_nonce: bytes
) -> bytes:
    """What the frontend sends in `Auth`."""
    return _proof(b"frontend", secret, version, worker_nonce, frontend_nonce)


def worker_proof(secret: bytes, version: int, worker_nonce: bytes, frontend_nonce: bytes) -> bytes:
    """What the worker sends in its `Welcome`."""
    return _proof(b"worker", secret, version, worker_nonce, frontend_nonce)


def proofs_match(expected: bytes, received: bytes | None) -> bool:
    """Whether ``received`` is ``expected``, compared in constant time."""
    return received is not None and hmac.compare_digest(expected, received)


def _proof(side: bytes, secret: bytes, version: int, worker: bytes, frontend: bytes) -> bytes:
    # Each side's proof has its own label, so that one cannot be reflected as the other; the
    # nonces have a fixed length, so their concatenation is unambiguous.
    message = _LABEL + side + b"\x00" + version.to_bytes(4, "big") + worker + frontend
    return hmac.new(secret, message, hashlib.sha256).digest()
