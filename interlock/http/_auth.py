"""API keys, and the privileges only trusted callers may use.

`ApiKeys` is the set of bearer tokens a server accepts, ordinary and trusted. The app
(`interlock.http._app`) authenticates every request outside `OPEN_PATHS` with
`ApiKeys.authenticate` before anything else runs, answering 401 without a right key, and records
in the request's ASGI scope whether the caller is trusted; `check_privileges` and
`check_route_api` read that mark where a request asks for a privilege and answer 403 when an
ordinary key asks. With no keys at all every caller is trusted: the loopback development
default. docs/operations.md ("API keys and trusted callers") is the reference.

Keys are kept as SHA-256 digests and a presented key is compared with every one of them with
`hmac.compare_digest`, so neither the time taken nor an early exit tells a caller how much of a
key it guessed, or which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from .._errors import ConfigError
from ._errors import HttpError
from ._nvext import (
    HEADER_DP_RANK,
    HEADER_LOCAL_UPDATES,
    HEADER_OBJECTIVE,
    HEADER_PREFILL,
    HEADER_WORKER,
    WORKER_ID_FIELDS,
    NvExt,
    objective_priority,
)

#: Paths served without a key: load balancers' health checks and Prometheus scrapes.
OPEN_PATHS: Final = frozenset({"/health", "/live", "/metrics"})
#: The ASGI scope key where the app records whether the request's caller is trusted.
TRUSTED: Final = "interlock.trusted"
#: Headers of 401 answers (RFC 6750: the scheme the server expects).
UNAUTHORIZED_HEADERS: Final = [
    (b"content-type", b"application/json"),
    (b"www-authenticate", b"Bearer"),
]

_PIN_HEADERS: Final = (HEADER_WORKER, HEADER_PREFILL, HEADER_DP_RANK)
_KEY_HINT: Final = (
    "send it as the header 'Authorization: Bearer KEY' (the openai client's api_key, or "
    "OPENAI_API_KEY)"
)


def check_key(key: str, where: str) -> str:
    """``key`` if a client can send it as a bearer token: not empty, visible ASCII, no
    whitespace.

    Raises:
        ConfigError: naming ``where`` (never quoting the key: it is a secret).
    """
    if not key:
        raise ConfigError(f"{where}: an API key must not be empty")
    if not all("!" <= char <= "~" for char in key):
        raise ConfigError(
            f"{where}: an API key must be visible ASCII without spaces (a client sends it in "
            'the Authorization header); generate one with `python -c "import secrets; '
            'print(secrets.token_urlsafe(32))"`'
        )
    return key


def read_key_file(path: str) -> list[str]:
    """The keys in the file at ``path``: one a line; blank lines and lines starting with
    ``#`` are ignored, and so is the whitespace around a key.

    Raises:
        ConfigError: the file cannot be read, holds no key, or holds a line that is not a key
            (the message names the file and line, not the key).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"API key file {path!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"API key file {path!r} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path!r}: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keys.append(check_key(stripped, f"API key file {path!r} line {number}"))
    if not keys:
        raise ConfigError(
            f"API key file {path!r} holds no key: put one key a line in it ('#' starts a "
            "comment line)"
        )
    return keys


def split_keys(text: str, where: str) -> list[str]:
    """The comma-separated keys of an environment variable (``KEY`` or ``OLD,NEW``).

    Raises:
        ConfigError: an item is not a key (the message names ``where``).
    """
    return [check_key(item.strip(), where) for item in text.split(",")]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The API keys a server accepts: ``keys`` may call it; ``trusted`` keys may also use the
    privileges (pinning workers, ``x-enable-local-updates``, query-only answers, the route-only
    API). Holds only the keys' SHA-256 digests.

    ``ApiKeys()`` (no keys) turns authentication off: every caller is trusted.

    Raises:
        ConfigError: a key is empty or not visible ASCII.
    """

    __slots__ = ("_keys", "_trusted")

    def __init__(self, keys: Iterable[str] = (), trusted: Iterable[str] = ()) -> None:
        self._keys = tuple(_digest(check_key(k, "ApiKeys(keys=...)")) for k in keys)
        self._trusted = tuple(_digest(check_key(k, "ApiKeys(trusted=...)")) for k in trusted)

    @property
    def enabled(self) -> bool:
        """Whether requests need a key (any key, ordinary or trusted, is configured)."""
        return bool(self._keys or self._trusted)

    @property
    def counts(self) -> tuple[int, int]:
        """How many ordinary and trusted keys there are."""
        return len(self._keys), len(self._trusted)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys, {len(self._trusted)} trusted)"

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether the request with ``headers`` (ASGI's, lower-case names) comes from a
        trusted caller. Always True when no keys are configured.

        Raises:
            HttpError: 401 (``invalid_api_key``) when keys are configured and the request has
                no ``Authorization: Bearer`` header or a key that is not one of them.
        """
        if not self.enabled:
            return True
        token = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    raise _unauthorized(
                        "the Authorization header is not a bearer token; this server needs an "
                        f"API key: {_KEY_HINT}"
                    )
                token = rest.strip()
                break
        if not token:
            raise _unauthorized(
                f"this server needs an API key and the request has none: {_KEY_HINT}"
            )
        digest = hashlib.sha256(token).digest()
        # Every digest is compared, whatever matched before: the time taken says nothing.
        known = False
        for key in self._keys:
            known |= hmac.compare_digest(key, digest)
        trusted = False
        for key in self._trusted:
            trusted |= hmac.compare_digest(key, digest)
        if not (known or trusted):
            raise _unauthorized(
                "the API key is not one this server accepts; send one of the keys it was "
                "started with (--api-key, --api-key-file or INTERLOCK_API_KEY)"
            )
        return trusted


def _unauthorized(message: str) -> HttpError:
    return HttpError(401, message, code="invalid_api_key")


def is_trusted(scope: Any) -> bool:
    """Whether the app marked the request's caller trusted (False when it did not mark it)."""
    return scope.get(TRUSTED, False) is True


def caller_flow(scope: Any) -> str | None:
    """The admission flow of an untrusted caller's requests: its API key's identity (a digest,
    never the key), whatever ``x-gateway-inference-fairness-id`` it sends, so that a caller
    cannot take a fresh flow per request (going ahead of every waiting flow) nor name another
    tenant's flow. None for a trusted caller (and on a server without keys): its header, if
    any, names the flow."""
    if is_trusted(scope):
        return None
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = value.partition(b" ")[2].strip()
            return "api-key:" + hashlib.sha256(b"interlock flow\0" + token).hexdigest()[:16]
    return None


def _forbidden(what: str, param: str, fix: str = "drop it, or send a trusted key") -> HttpError:
    return HttpError(
        403,
        f"{what} is reserved for trusted callers, and this request's API key is not one of the "
        f"server's trusted keys (--trusted-api-key); {fix}",
        param=param,
        code="permission_denied",
    )


def check_privileges(
    scope: Any,
    nvext: NvExt,
    *,
    executes: bool,
    routing: str,
    objectives: Mapping[str, int] | None = None,
) -> None:
    """Refuse an untrusted caller's privileged request: a worker it names (``nvext``'s
    worker ids or ``dp_rank``, or the GAIE headers), ``x-enable-local-updates``, the
    query-only annotation, or a positive queue priority (``nvext.agent_hints.priority``, or
    an ``x-gateway-inference-objective`` whose priority in ``objectives`` is above 0).
    ``nvext`` is the body's, before the headers apply, so the error names what the client
    sent. What a server's routing makes every request's shape is no privilege
    there: worker ids under ``direct_to_known``, anything on a server that only answers queries
    (``executes`` False).

    Raises:
        HttpError: 403 (``permission_denied``) naming the field or header.
    """
    if not executes or is_trusted(scope):
        return
    headers = scope["headers"]
    if routing != "direct_to_known":
        for field in (*WORKER_ID_FIELDS, "dp_rank"):
            if getattr(nvext, field) is not None:
                raise _forbidden(f"nvext.{field} (pinning a request to a worker)", f"nvext.{field}")
        for name, _ in headers:
            if name in _PIN_HEADERS:
                header = name.decode()
                raise _forbidden(f"the header {header} (pinning a request to a worker)", header)
    for name, value in headers:
        if name == HEADER_LOCAL_UPDATES:
            header = name.decode()
            raise _forbidden(f"the header {header} (booking no load with the router)", header)
        if name == HEADER_OBJECTIVE:
            objective = value.decode("latin-1").strip()
            priority = objective_priority(objectives or {}, objective)
            if priority > 0:
                header = name.decode()
                raise _forbidden(
                    f"the header {header}: {objective} (priority {priority}: going ahead of "
                    "other requests in the queue)",
                    header,
                    "drop it (or name an objective of priority 0 or less), or send a trusted key",
                )
    if nvext.query_only:
        raise _forbidden(
            "the query_instance_id annotation (a query-only answer)", "nvext.annotations"
        )
    if nvext.priority is not None and nvext.priority > 0:
        # Jumping the admission queue; a negative (sheddable) priority only gives way.
        raise _forbidden(
            f"nvext.agent_hints.priority={nvext.priority} (going ahead of other requests in "
            "the queue)",
            "nvext.agent_hints.priority",
            "drop it (or send 0 or less), or send a trusted key",
        )


def check_route_api(scope: Any, *, executes: bool) -> None:
    """Refuse an untrusted caller the route-only API on a server that also runs requests (on
    one that only routes, the route-only API is what it serves).

    Raises:
        HttpError: 403 (``permission_denied``).
    """
    if executes and not is_trusted(scope):
        raise _forbidden(
            f"the route-only API ({scope['path']})",
            "authorization",
            "send a trusted key, or ask a router (interlock route)",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a ``--host`` value) is a loopback address or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(command: str, host: str, keys: ApiKeys) -> str | None:
    """The warning to print when ``command`` listens on a non-loopback ``host`` without keys;
    None when there is nothing to warn about."""
    if keys.enabled or is_loopback(host):
        return None
    return (
        f"interlock {command}: WARNING: listening on {host}, which is not a loopback address, "
        "with no API keys: anyone who can reach this port can generate, pin requests to "
        "workers and hide their load from the router. Give keys with --api-key KEY, "
        "--api-key-file PATH or INTERLOCK_API_KEY (and --trusted-api-key for the gateway); see "
        "docs/operations.md#api-keys-and-trusted-callers"
    )


def describe(keys: ApiKeys, sources: Sequence[str], open_paths: Iterable[str]) -> str:
    """One banner line's text: how many keys, from where, and which paths need none."""
    if not keys.enabled:
        return "none: every caller may use every endpoint and privilege"
    ordinary, trusted = keys.counts
    where = f" ({', '.join(sources)})" if sources else ""
    return (
        f"{ordinary} key{'s' * (ordinary != 1)}, {trusted} trusted{where}; "
        f"{', '.join(sorted(open_paths))} need none"
    )
