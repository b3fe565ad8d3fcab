"""Worker discovery through etcd: a small async client over etcd's JSON gateway, the worker's
registration (a key under a lease it keeps alive) and the frontend's watcher (adds and removes
engines as the keys come and go).

A client may authenticate (etcd's user/password authentication: it sends the token etcd
grants on every call and authenticates again when etcd refuses an expired one) and speak TLS
to an ``https://`` etcd (an `ssl.SSLContext` with its CA and a client certificate), so that a
process that can reach etcd but has no credentials cannot register a rogue worker
(docs/deploying.md#securing-etcd).

Layout: each worker puts ``{prefix}/workers/{worker_id}`` = `WorkerRecord` as JSON
(``{"worker_id": 1, "host": "10.0.0.5", "port": 7001, "role": "agg", "block_size": 16}``; a
worker reached by another engine kind adds its ``kind``, and a ``url`` in place of ``host``
and ``port`` where the kind needs one), attached to a lease with a TTL. A worker that stops
cleanly revokes its lease (the key goes at once); a killed one stops renewing it and the key
goes when the TTL runs out.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import ssl
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import attrs
import trio

from .._errors import ConfigError
from ..engines import (
    BadRecord,
    Engine,
    EngineContext,
    WorkerMismatch,
    WorkerRecord,
    WorkerUnreachable,
    engine_from_record,
)
from ..wire import ProtocolError

if TYPE_CHECKING:
    import httpx

    from .._config import PipelineConfig
    from ..processing import Tokenizer

# WorkerRecord and BadRecord belong to interlock.engines (beside the factory that builds
# from them); the worker's registration imports them from here too.
__all__ = [
    "DEFAULT_PREFIX",
    "PASSWORD_ENV",
    "BadRecord",
    "EtcdClient",
    "EtcdError",
    "KeyValue",
    "WatchEvent",
    "WorkerPool",
    "WorkerRecord",
    "WorkerWatcher",
    "check_etcd_url",
    "prefix_range_end",
    "register_worker",
    "serve_registration",
    "watch_workers",
    "worker_key",
    "workers_prefix",
]

_logger = logging.getLogger("interlock.discovery.etcd")

#: The default key prefix (``--etcd-prefix``).
DEFAULT_PREFIX = "interlock"


#: How long, by default, workers a new store (etcd lost its data) has no record of stay for
#: them to register again (``--etcd-new-store-grace``): the workers' default ``--etcd-ttl``,
#: within which a live worker's lease renewal finds its lease gone and registers again.
DEFAULT_NEW_STORE_GRACE = 10.0

#: The environment variable holding the ``--etcd-user``'s password (or ``--etcd-password-file``).
PASSWORD_ENV = "INTERLOCK_ETCD_PASSWORD"

#: What to check when etcd gave no answer at all.
_REACH_HINT = "is etcd running there, and is the URL its client URL, e.g. http://127.0.0.1:2379?"
_NO_USER_HINT = (
    "etcd has authentication enabled: give --etcd-user NAME, and its password in "
    f"{PASSWORD_ENV} or in a file given with --etcd-password-file PATH "
    "(docs/deploying.md#securing-etcd)"
)
_PASSWORD_HINT = (
    f"check --etcd-user, and the password in {PASSWORD_ENV} or --etcd-password-file; etcd "
    "logs the refusal too"
)
_PERMISSION_HINT = (
    "a worker or `interlock register` needs a role with readwrite permission on its "
    "--etcd-prefix, a frontend read permission (docs/deploying.md#securing-etcd)"
)
_VERIFY_HINT = (
    "etcd's TLS certificate is not signed by a CA this process trusts: give --etcd-ca-file "
    "PATH with the CA that signed it (docs/deploying.md#securing-etcd)"
)
_CLIENT_CERT_HINT = (
    "etcd wants a TLS client certificate it trusts (it runs with --client-cert-auth): give "
    "--etcd-cert-file and --etcd-key-file with a certificate signed by etcd's "
    "--trusted-ca-file (docs/deploying.md#securing-etcd)"
)


class EtcdError(Exception):
    """An etcd request failed: etcd unreachable, an error answer (a refused user or
    password, a missing permission, a TLS handshake that failed), or an answer that is not
    what the gateway sends. ``url`` and ``operation`` say which; the message ends with what
    to check (``hint``: by default, whether etcd runs at that URL). ``refused`` is true when
    etcd answered and said no to this process's credentials (no user, a wrong password, a
    missing permission): trying again changes nothing until someone changes etcd's users."""

    def __init__(
        self, url: str, operation: str, why: str, *, hint: str | None = None, refused: bool = False
    ) -> None:
        super().__init__(f"etcd at {url}: {operation} failed: {why} ({hint or _REACH_HINT})")
        self.url = url
        self.operation = operation
        self.refused = refused


def check_etcd_url(url: str, what: str = "etcd URL") -> None:
    """Check that ``url`` is an etcd client URL: ``http://`` or ``https://``, without a user
    name or password in it (a password there shows in ``ps`` and in logs). ``what`` names
    it in the message (a flag: ``--etcd``). Pure.

    Raises:
        ConfigError: it is not such a URL (the message says what to give instead).
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{what} {url!r} is not a URL: give etcd's client URL, e.g. http://127.0.0.1:2379"
        )
    parts = urlsplit(url)
    if "@" in parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        raise ConfigError(
            f"{what} {parts.scheme}://...@{host}: a user name or password in the URL is not "
            "supported (it would show in `ps` and in logs); give --etcd-user NAME, and the "
            f"password in {PASSWORD_ENV} or in a file given with --etcd-password-file PATH"
        )


def _answer_text(answer: object) -> tuple[int | None, str]:
    """The gRPC code and message of an error answer (a unary call's ``{"error", "message",
    "code"}``, a watch stream's ``{"error": {...}}``, or a cancelled watch's
    ``cancel_reason``); ``(None, "")`` for anything else."""
    if not isinstance(answer, dict):
        return None, ""
    error = answer.get("error")
    if isinstance(error, dict):
        answer = error
    result = answer.get("result")
    if isinstance(result, dict) and result.get("canceled"):
        return None, str(result.get("cancel_reason") or "")
    code = answer.get("code", answer.get("grpc_code"))
    message = answer.get("message") or answer.get("error") or ""
    return (code if isinstance(code, int) else None), str(message)


def _token_refused(answer: object) -> bool:
    """Whether etcd refused the auth token (expired, unknown after a restart, or issued
    before the auth store changed) or got none while authentication is on: authenticating
    again may help."""
    code, text = _answer_text(answer)
    return code == 16 or any(
        reason in text
        for reason in (
            "Unauthenticated",
            "invalid auth token",
            "revision of auth store is old",
            "user name is empty",
        )
    )


@attrs.frozen
class KeyValue:
    """One key and its value, as `EtcdClient.get_prefix` returns them."""

    key: str
    value: bytes
    mod_revision: int = 0


@attrs.frozen
class Listing:
    """What `EtcdClient.list_prefix` returns: the keys under a prefix, and etcd's revision
    and raft term from the header of the same answer (watch from ``revision`` + 1 with
    ``raft_term`` to miss nothing and to notice another store).

    A store that restarted without its data starts its term again: its revision may have
    caught up with the old one's, and its cluster and member ids stay the same, so a term
    below the listed one is what tells.
    """

    items: list[KeyValue]
    revision: int
    #: 0 when etcd's header does not say (an etcd that sends no term).
    raft_term: int = 0


@attrs.frozen
class WatchEvent:
    """One change under a watched prefix: ``kind`` is ``"put"`` (``value`` is the new value)
    or ``"delete"`` (``value`` is empty)."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    # Validated: without it, characters outside the alphabet are dropped and a garbled key
    # decodes to another key instead of failing.
    return base64.b64decode(text or "", validate=True)


def prefix_range_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range request cover every key starting with ``prefix``
    (the prefix with its last byte incremented; pure)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


class EtcdClient:
    """etcd's v3 API through its JSON gRPC gateway (etcd 3.4+), over one `httpx.AsyncClient`.

    ``url`` is an etcd client URL (``http://127.0.0.1:2379``, or ``https://`` for an etcd
    that serves TLS: checked against ``ssl_context``, by default the system's CAs). With
    ``user`` (and its ``password``) it authenticates at its first call and sends the token on
    every call; when etcd refuses the token (it expired, or etcd restarted), it
    authenticates once more and repeats the call. Every call waits for etcd's answer, at
    most ``timeout`` seconds per request, and raises `EtcdError` (naming the URL and the
    operation, and what to check) when it cannot get one. Use it as an async context
    manager, or call `aclose`.

    Raises:
        ConfigError: ``url`` is not an etcd client URL (`check_etcd_url`), ``user`` without
            ``password`` (or the reverse), or ``ssl_context`` with an ``http://`` URL.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        user: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        check_etcd_url(url)
        if (user is None) != (password is None):
            raise ConfigError("an etcd user needs its password, and a password its user")
        tls = url.startswith("https://")
        if ssl_context is not None and not tls:
            raise ConfigError(f"etcd URL {url!r}: TLS settings need an https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        #: The etcd user this client authenticates as (None: no authentication).
        self.user = user
        self._password = password
        #: How many times this client authenticated: once at its first call, then once per
        #: token etcd refused (expired, or lost when etcd restarted).
        self.authentications = 0
        self._token: str | None = None
        self._authenticated = False
        self._auth_lock = trio.Lock()
        # httpx's default trusts certifi's bundle; the system's CAs are what an operator
        # manages (and what --etcd-ca-file replaces).
        verify: ssl.SSLContext | bool = (
            (ssl_context if ssl_context is not None else ssl.create_default_context())
            if tls
            else True
        )
        # httpx is imported where a client is made, not with this module: every interlock
        # process imports discovery, and a worker without --etcd never needs httpx (0.15 s of
        # CPU at each start).
        import httpx

        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, verify=verify)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _auth_token(self, *, refused: str | None = None, renew: bool = False) -> str | None:
        """The token to send: None without a user (or while etcd has authentication off).
        Authenticates at the first call, and with ``renew`` when the token is still the
        ``refused`` one (a concurrent call may have renewed it already).

        Raises:
            EtcdError: etcd refused the user or password, or did not answer.
        """
        if self.user is None:
            return None
        async with self._auth_lock:
            if not self._authenticated or (renew and self._token == refused):
                self._token = await self._authenticate()
                self._authenticated = True
            return self._token

    async def _authenticate(self) -> str | None:
        assert self.user is not None
        operation = f"authenticate as etcd user {self.user!r}"
        body = {"name": self.user, "password": self._password}
        response, answer = await self._post(operation, "/v3/auth/authenticate", body, None)
        token = answer.get("token") if isinstance(answer, dict) else None
        if response.status_code == 200 and isinstance(token, str) and token:
            self.authentications += 1
            _logger.debug("authenticated to etcd at %s as %r", self.url, self.user)
            return token
        _, text = _answer_text(answer)
        if "authentication is not enabled" in text:
            _logger.warning(
                "etcd at %s has authentication disabled: --etcd-user %r is not used, and any "
                "process that reaches etcd can register a worker (docs/deploying.md"
                "#securing-etcd)",
                self.url,
                self.user,
            )
            return None
        if "authentication failed" in text:
            raise EtcdError(
                self.url,
                operation,
                f"etcd refused the user name or password ({text})",
                hint=_PASSWORD_HINT,
                refused=True,
            )
        raise self._refusal(operation, response, answer)

    def _headers(self, token: str | None) -> dict[str, str]:
        # etcd's gateway takes the raw token, without a "Bearer" scheme.
        return {} if token is None else {"Authorization": token}

    async def _post(
        self, operation: str, path: str, body: Mapping[str, Any], token: str | None
    ) -> tuple[httpx.Response, Any]:
        import httpx

        try:
            response = await self._http.post(path, json=body, headers=self._headers(token))
        except httpx.HTTPError as exc:
            raise self._unreachable(operation, exc) from exc
        try:
            answer = response.json()
        except ValueError:
            answer = None
        return response, answer

    async def _call(self, operation: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        token = await self._auth_token()
        response, answer = await self._post(operation, path, body, token)
        if self.user is not None and response.status_code != 200 and _token_refused(answer):
            token = await self._auth_token(refused=token, renew=True)
            response, answer = await self._post(operation, path, body, token)
        if response.status_code != 200 or not isinstance(answer, dict):
            raise self._refusal(operation, response, answer)
        return answer

    def _refusal(self, operation: str, response: httpx.Response, answer: object) -> EtcdError:
        """The error for an answer etcd gave instead of a result."""
        _, text = _answer_text(answer)
        why = f"HTTP {response.status_code}: {response.text[:200]!r}"
        return self._explained(operation, text, why)

    def _explained(
        self, operation: str, text: str, why: str, *, hint: str | None = None
    ) -> EtcdError:
        """The error for etcd's refusal ``text``, with what to do about it when it is about
        authentication or permissions; ``why`` otherwise (and ``hint``, by default whether
        etcd runs at the URL)."""
        if "user name is empty" in text:
            return EtcdError(
                self.url,
                operation,
                "etcd has authentication enabled and this process gave no user",
                hint=_NO_USER_HINT,
                refused=True,
            )
        if "permission denied" in text:
            return EtcdError(
                self.url,
                operation,
                f"etcd user {self.user!r} has no permission for it (etcd said {text!r})",
                hint=_PERMISSION_HINT,
                refused=True,
            )
        if self.user is not None and _token_refused({"message": text}):
            return EtcdError(
                self.url,
                operation,
                f"etcd refused user {self.user!r}'s auth token, a fresh one too ({text})",
                hint=_PASSWORD_HINT,
                refused=True,
            )
        return EtcdError(self.url, operation, why, hint=hint)

    def _unreachable(self, operation: str, exc: httpx.HTTPError) -> EtcdError:
        """The error for a request that got no answer (``exc``), with what to check when
        the TLS handshake failed."""
        import httpx

        why = f"{type(exc).__name__}: {exc}"
        cause = _root_cause(exc)
        if cause is not exc and str(cause) not in why:
            # Under trio, httpx's message is often empty; the TLS reason is further down.
            why += f" ({type(cause).__name__}: {cause})"
        hint = None
        if "CERTIFICATE_VERIFY_FAILED" in why:
            hint = _VERIFY_HINT
        elif "BAD_CERTIFICATE" in why or "CERTIFICATE_REQUIRED" in why:
            hint = _CLIENT_CERT_HINT
        elif self.url.startswith("https://") and isinstance(
            exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError
        ):
            # Under trio the TLS alert that says why is lost: only the broken stream shows.
            hint = f"etcd closed the TLS connection; if {_CLIENT_CERT_HINT}"
        elif "WRONG_VERSION_NUMBER" in why:
            hint = "etcd does not serve TLS at that address: give an http:// URL"
        elif self.url.startswith("http://") and isinstance(exc, httpx.RemoteProtocolError):
            hint = f"{_REACH_HINT} An etcd that serves TLS needs an https:// URL"
        return EtcdError(self.url, operation, why, hint=hint)

    def _unexpected(self, operation: str, why: str) -> EtcdError:
        """The error for an answer that is not what etcd's gateway sends (``why`` names the
        part): something else may answer at the URL."""
        return EtcdError(self.url, operation, f"unexpected answer: {why}")

    def _revision_and_term(self, operation: str, answer: Mapping[str, Any]) -> tuple[int, int]:
        """The revision and raft term in ``answer``'s header (0 for one it leaves out).

        Raises:
            EtcdError: the header is not an object, or either is not a number.
        """
        header = self._object(operation, "header", answer.get("header", {}))
        revision, term = (
            self._number(operation, f"header {field}", header.get(field, 0))
            for field in ("revision", "raft_term")
        )
        return revision, term

    def _object(self, operation: str, what: str, value: object) -> dict[str, Any]:
        """``value``, the part of an answer named ``what``, checked to be a JSON object.

        Raises:
            EtcdError: it is not (raised, not left to the caller's ``.get``: the watcher
                retries an EtcdError, and anything else ends it).
        """
        if not isinstance(value, dict):
            raise self._unexpected(operation, f"{what} {value!r} is not an object")
        return value

    def _array(self, operation: str, what: str, answer: Mapping[str, Any]) -> list[Any]:
        """``answer``'s list ``what`` (empty when left out: etcd omits empty fields).

        Raises:
            EtcdError: it is not a list.
        """
        value = answer.get(what, [])
        if not isinstance(value, list):
            raise self._unexpected(operation, f"{what} {value!r} is not a list")
        return value

    def _number(self, operation: str, what: str, value: Any) -> int:
        """``value``, the part of an answer named ``what``, as a whole number (the gateway
        sends 64-bit numbers as strings).

        Raises:
            EtcdError: it is not a number (raised, not left to ``int``: the watcher retries
                an EtcdError, and anything else ends it).
        """
        try:
            return int(value)
        except (TypeError, ValueError):
            raise self._unexpected(operation, f"{what} {value!r} is not a number") from None

    def _key_value(self, operation: str, kv: object) -> KeyValue:
        """One ``kv`` of a listing or a watch event (base64 key and value, a numeric
        ``mod_revision``).

        Raises:
            EtcdError: it is not an object, has no key, or a field is not what etcd sends.
        """
        fields = self._object(operation, "kv", kv)
        try:
            key, value = _unb64(fields["key"]), _unb64(fields.get("value"))
        except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise self._unexpected(operation, f"kv {fields!r}: {exc!r}") from exc
        revision = self._number(operation, "kv mod_revision", fields.get("mod_revision", 0))
        return KeyValue(key.decode(errors="replace"), value, revision)

    # -- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> tuple[int, int]:
        """Grant a lease of ``ttl`` seconds; returns ``(lease id, granted TTL)`` (etcd may
        raise a TTL below its minimum).

        Raises:
            EtcdError: no answer, or an error answer.
        """
        answer = await self._call("lease grant", "/v3/lease/grant", {"TTL": ttl})
        try:
            return int(answer["ID"]), int(answer.get("TTL", ttl))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unexpected("lease grant", repr(answer)) from exc

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` once; returns its TTL again, or 0 when the lease no longer exists
        (expired or revoked: its keys are gone).

        Raises:
            EtcdError: no answer, or an error answer.
        """
        answer = await self._call("lease keepalive", "/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", {})
        try:
            return int(result.get("TTL", 0)) if isinstance(result, dict) else 0
        except (TypeError, ValueError) as exc:
            raise self._unexpected("lease keepalive", repr(answer)) from exc

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease``: its keys are deleted at once. An unknown lease is no error.

        Raises:
            EtcdError: no answer.
        """
        try:
            await self._call("lease revoke", "/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # -- keys ---------------------------------------------------------------------------------

    async def put(self, key: str, value: str | bytes, *, lease: int | None = None) -> int:
        """Set ``key`` to ``value`` (attached to ``lease`` when given); returns the revision.

        Raises:
            EtcdError: no answer, or an error answer (e.g. an unknown lease).
        """
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        operation = f"put {key!r}"
        answer = await self._call(operation, "/v3/kv/put", body)
        return self._revision_and_term(operation, answer)[0]

    async def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1).

        Raises:
            EtcdError: no answer, an error answer, or a count that is not a number.
        """
        operation = f"delete {key!r}"
        answer = await self._call(operation, "/v3/kv/deleterange", {"key": _b64(key)})
        return self._number(operation, "deleted", answer.get("deleted", 0))

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key starting with ``prefix``, and the store's revision at that moment (watch
        from the next one to miss nothing): `list_prefix` without the raft term.

        Raises:
            EtcdError: no answer, or an error answer.
        """
        listing = await self.list_prefix(prefix)
        return listing.items, listing.revision

    async def list_prefix(self, prefix: str) -> Listing:
        """Every key starting with ``prefix``, with etcd's revision and raft term from this
        one answer's header (`Listing`).

        Raises:
            EtcdError: no answer, an error answer, or an answer whose keys or header are
                not what etcd sends (the message names the part).
        """
        body = {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
        operation = f"range {prefix!r}"
        answer = await self._call(operation, "/v3/kv/range", body)
        items = [self._key_value(operation, kv) for kv in self._array(operation, "kvs", answer)]
        revision, term = self._revision_and_term(operation, answer)
        return Listing(items, revision, term)

    async def watch_prefix(
        self, prefix: str, *, start_revision: int | None = None, raft_term: int = 0
    ) -> AsyncGenerator[WatchEvent, None]:
        """Yield every change to keys starting with ``prefix``, from ``start_revision`` (the
        `list_prefix` revision + 1) on, until the caller stops iterating. Close it with
        ``contextlib.aclosing``. Waits for changes without a time limit. ``raft_term`` is
        that listing's: a watch on an etcd whose term went back since (another store)
        refuses to start, as below.

        Raises:
            EtcdError: etcd cannot be reached, the stream broke (etcd stopped), etcd
                cancelled the watch (e.g. ``start_revision`` was compacted away), or etcd is
                behind ``start_revision`` - 1 (it lost its data: etcd would wait for that
                revision without a word, however many changes come below it), or etcd is
                at a raft term below ``raft_term`` (another store), or a message or event
                is not what etcd sends (the message names the part; none of that message's
                events is yielded): list again and watch from the new revision.
        """
        create: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(prefix_range_end(prefix)),
        }
        if start_revision is not None:
            create["start_revision"] = str(start_revision)
        operation = f"watch {prefix!r}"
        import httpx

        timeout = httpx.Timeout(self.timeout, read=None)
        token = await self._auth_token()
        renewed = False
        while True:
            renew = False
            try:
                async with self._http.stream(
                    "POST",
                    "/v3/watch",
                    json={"create_request": create},
                    timeout=timeout,
                    headers=self._headers(token),
                ) as response:
                    if response.status_code != 200:
                        raise EtcdError(self.url, operation, f"HTTP {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        message = self._watch_message(operation, line)
                        if self.user is not None and not renewed and _token_refused(message):
                            # Refused at its creation (the token expired while the caller
                            # was idle): nothing was yielded, so a new watch from the same
                            # revision misses nothing.
                            renew = True
                            break
                        if start_revision is not None:
                            self._check_reached(operation, message, start_revision, raft_term)
                        for event in self._watch_events(operation, message):
                            yield event
            except httpx.HTTPError as exc:
                raise self._unreachable(operation, exc) from exc
            if not renew:
                raise EtcdError(self.url, operation, "the stream ended (etcd closed it)")
            renewed = True
            token = await self._auth_token(refused=token, renew=True)

    def _watch_message(self, operation: str, line: str) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise EtcdError(self.url, operation, f"not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise EtcdError(self.url, operation, f"not a JSON object: {line[:200]!r}")
        return message

    def _check_reached(
        self, operation: str, message: dict[str, Any], start: int, raft_term: int = 0
    ) -> None:
        """Raise when the watch's creation answer shows etcd's revision below ``start`` - 1,
        the revision the caller listed at. Within one store revisions only grow, so etcd
        is another store now (restarted without its data, or restored from a backup; its
        cluster and member ids stay the same when its flags do, so they cannot tell), or
        the member answering lags behind the one that answered the listing. Raise too when
        its raft term is below ``raft_term``, the listing's: a store that restarted empty and
        caught up past the listed revision shows no revision behind, but its term starts
        again (from 2: a term that was 2 at the listing cannot tell)."""
        result = message.get("result")
        if not isinstance(result, dict) or not result.get("created"):
            return
        revision, term = self._revision_and_term(operation, result)
        if 0 < term < raft_term:
            raise EtcdError(
                self.url,
                operation,
                f"etcd's raft term went back from {raft_term} at the listing to {term}",
                hint="etcd lost its data (restarted without its data directory) and may have "
                "caught up with the listed revision since: list again, and watch from the "
                "listing's revision",
            )
        if revision < start - 1:
            raise EtcdError(
                self.url,
                operation,
                f"etcd is at revision {revision}, behind the watch's start revision {start}",
                hint="etcd lost its data (restarted without its data directory, or restored "
                "from a backup), or the member answering lags behind the one that answered "
                "the listing: list again, and watch from the listing's revision",
            )

    def _watch_events(self, operation: str, message: dict[str, Any]) -> list[WatchEvent]:
        if "error" in message:
            _, text = _answer_text(message)
            raise self._explained(operation, text, f"etcd said {message['error']!r}")
        result = self._object(operation, "result", message.get("result", {}))
        if result.get("canceled"):
            reason = result.get("cancel_reason")
            why = reason or f"compacted to revision {result.get('compact_revision')}"
            # A compaction is etcd working as configured: the cure is a new listing.
            hint = None if reason else "list again, and watch from the listing's revision"
            raise self._explained(operation, why, f"etcd cancelled the watch: {why}", hint=hint)
        # Every event is read before any is returned: a malformed one fails the whole message,
        # so none of it is applied, and the listing that follows the EtcdError has them all.
        events = []
        for raw in self._array(operation, "events", result):
            raw = self._object(operation, "event", raw)
            kind: Literal["put", "delete"] = "delete" if raw.get("type") == "DELETE" else "put"
            kv = self._key_value(operation, raw.get("kv"))
            events.append(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
        return events

    def __repr__(self) -> str:
        user = f" as {self.user!r}" if self.user is not None else ""
        return f"<EtcdClient {self.url}{user}>"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from (itself when none)."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


# -- records -----------------------------------------------------------------------------------


def workers_prefix(prefix: str) -> str:
    """Where the worker records live: ``{prefix}/workers/``."""
    return f"{prefix.rstrip('/')}/workers/"


def worker_key(prefix: str, worker_id: int) -> str:
    """A worker's key: ``{prefix}/workers/{worker_id}``."""
    return f"{workers_prefix(prefix)}{worker_id}"


# -- the worker's side ----------------------------------------------------------------------


async def register_worker(
    client: EtcdClient, record: WorkerRecord, *, prefix: str = DEFAULT_PREFIX, ttl: int = 10
) -> tuple[int, int]:
    """Grant a lease of ``ttl`` seconds and put the worker's record under it; returns
    ``(lease id, granted TTL)``. Keep the lease alive (`serve_registration` does).

    Raises:
        EtcdError: etcd cannot be reached or refused a request.
    """
    lease, granted = await client.grant_lease(ttl)
    await client.put(worker_key(prefix, record.worker_id), record.to_json(), lease=lease)
    return lease, granted


async def serve_registration(
    client: EtcdClient,
    record: WorkerRecord,
    *,
    prefix: str = DEFAULT_PREFIX,
    ttl: int = 10,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register ``record`` (`register_worker`), call ``task_status.started(lease id)``, then
    renew the lease every third of its TTL until cancelled. A lost lease (etcd restarted
    without it, or a pause longer than the TTL) is registered again; while etcd cannot be
    reached, it retries (the record disappears once the TTL runs out, and comes back when
    etcd answers again). Cancelled, it revokes the lease (at most ``client.timeout``
    seconds): the record disappears at once.

    Raises:
        EtcdError: the first registration failed (nothing is retried before it succeeds).
    """
    key = worker_key(prefix, record.worker_id)
    lease, granted = await register_worker(client, record, prefix=prefix, ttl=ttl)
    _logger.info("registered %s in etcd at %s (lease %x, TTL %ds)", key, client.url, lease, granted)
    task_status.started(lease)
    try:
        while True:
            await trio.sleep(max(granted, 1) / 3)
            try:
                remaining = await client.keepalive(lease)
                if remaining > 0:
                    continue
                _logger.warning("lease of %s was lost; registering again", key)
                lease, granted = await register_worker(client, record, prefix=prefix, ttl=ttl)
                _logger.info("registered %s again (lease %x)", key, lease)
            except EtcdError as exc:
                _logger.warning("cannot renew %s: %s; retrying", key, exc)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(client.timeout):
            try:
                await client.revoke(lease)
                _logger.info("revoked the lease of %s", key)
            except EtcdError as exc:
                _logger.warning(
                    "cannot revoke the lease of %s (it expires by itself): %s", key, exc
                )


# -- the frontend's side ----------------------------------------------------------------------


class WorkerPool(Protocol):
    """What a `WorkerWatcher` needs from the pipeline it keeps in step (a `Pipeline` is one):
    its block size and tokenizer (checked against each worker's), and adding, removing and
    finding workers."""

    @property
    def config(self) -> PipelineConfig: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    async def add_worker(self, engine: Engine) -> None: ...

    async def remove_worker(self, worker_id: int, *, stop: bool = False) -> None: ...

    def engine(self, worker_id: int) -> Engine | None: ...


@attrs.define(eq=False)
class _Member:
    record: WorkerRecord
    #: None until built, and when its record does not build one (skipped).
    engine: Engine | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: The first attempt to add it is over (joined, or failed once): what a listing waits for.
    settled: trio.Event = attrs.field(factory=trio.Event)
    #: Its task is over (joined, skipped, or cancelled): what a replacement waits for.
    done: trio.Event = attrs.field(factory=trio.Event)
    failed: bool = False


class WorkerWatcher:
    """Keeps a pipeline's discovered workers in step with the records under
    ``{prefix}/workers/`` in etcd. Run it with `run` (or `watch_workers`).

    A new record becomes the engine its kind builds (`engine_from_record`, with ``context``:
    by default the pipeline's block size and tokenizer, so that the engine checks the
    worker's; pass one to share resources such as a KV-event feed; its timeouts are replaced
    by the watcher's), added with `Pipeline.add_worker` (each in its own task: a slow
    handshake holds up no other worker).
    A deleted record removes its worker at once (no new request goes there) and stops its
    engine (`Pipeline.remove_worker` with ``stop=True``) once no stream is open on it: a
    worker that drains (``interlock worker`` on SIGTERM deletes its record first) finishes
    its streams, for at most ``drain_timeout`` seconds; then streams still open break and
    migrate where migration is on. A
    record with another address (the worker restarted elsewhere) replaces the engine. A
    record that does not parse or whose engine cannot be built (an unknown kind, a field its
    kind needs missing), a worker whose handshake does not match (id, role, block size or
    tokenizer), or whose id another worker of the pipeline has, is logged and skipped until
    its record changes. One that cannot be reached within ``connect_timeout`` is tried
    again, with back-off up to ``max_backoff``, for as long as its record stands (a worker
    behind a network that is down for a while joins once it is back). When the watch breaks
    (etcd restarted, or cancelled the watch), the watcher lists again, trying until a
    listing succeeds (backing off from ``backoff`` to ``max_backoff`` seconds), and only
    then watches again, from that listing's revision; workers whose records vanished
    meanwhile are removed. A listing whose revision is below the last one seen, or a watch
    on an etcd behind its listing's revision, or an answer whose raft term is below the last
    one seen, means etcd lost its data: the watcher follows it as a new store. Workers it
    has no record of stay as they are (engine and streams) for ``new_store_grace`` seconds,
    time for their lease renewals to register them again; those that do not leave then.
    The pipeline keeps its workers while etcd is away.

    Raises:
        ConfigError: ``new_store_grace`` is negative (or not a number).
    """

    def __init__(
        self,
        client: EtcdClient,
        pipeline: WorkerPool,
        *,
        prefix: str = DEFAULT_PREFIX,
        context: EngineContext | None = None,
        connect_timeout: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        drain_timeout: float = 300.0,
        new_store_grace: float = DEFAULT_NEW_STORE_GRACE,
    ) -> None:
        if (
            not isinstance(new_store_grace, int | float)
            or isinstance(new_store_grace, bool)
            or not new_store_grace >= 0
        ):
            raise ConfigError(
                f"new_store_grace={new_store_grace!r}: give the seconds (0 or more) workers "
                "stay after etcd lost their records, e.g. the workers' --etcd-ttl"
            )
        self.client = client
        self.pipeline = pipeline
        self.prefix = workers_prefix(prefix)
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        if context is None:
            context = EngineContext(
                block_size=pipeline.config.kv_block_size, tokenizer=pipeline.tokenizer
            )
        #: What every engine is built with, but for its timeouts: those are the watcher's
        #: at the time (`_engine_context`).
        self.context = context
        self._members: dict[int, _Member] = {}
        self._nursery: trio.Nursery | None = None
        self.drain_timeout = drain_timeout
        #: Removed workers whose engines still carry streams: cancel the scope to stop the
        #: engine now; the event is set once it is stopped.
        self._draining: dict[int, tuple[trio.CancelScope, trio.Event]] = {}
        #: Completed listings (1 after the first; +1 per re-list after a broken watch).
        self.listings = 0
        #: etcd's revision at the last listing, or of the last change watched since.
        self._revision = 0
        #: How long workers the old store had stay, as they are, once etcd turns out to be
        #: a new store (it lost its data): long enough for a live worker's lease renewal to
        #: find its lease gone and register again (the default is the default --etcd-ttl).
        self.new_store_grace = new_store_grace
        #: Workers kept after etcd lost their records, by id: when the grace ends.
        self._held: dict[int, float] = {}
        #: etcd's raft term at the last listing (`Listing.raft_term`).
        self._raft_term = 0

    def _engine_context(self) -> EngineContext:
        # An engine waits for its worker as long as the watcher does, and reconnects at
        # most a second apart (sooner when the watcher backs off less).
        return attrs.evolve(
            self.context,
            connect_timeout=self.connect_timeout,
            max_backoff=min(self.max_backoff, 1.0),
        )

    @property
    def records(self) -> dict[int, WorkerRecord]:
        """The records the watcher acts on now, by worker id (joined, joining or skipped)."""
        return {worker_id: m.record for worker_id, m in self._members.items()}

    @property
    def skipped(self) -> set[int]:
        """The workers whose record is known but that are not in the pipeline: skipped
        (an engine that cannot be built, handshake mismatch, id taken) until their record
        changes, or unreachable so far
        (tried again with back-off)."""
        return {worker_id for worker_id, m in self._members.items() if m.failed}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List the workers, add them (waiting for each handshake, at most
        ``connect_timeout``), call ``task_status.started()``, then follow the changes until
        cancelled. Stopping it leaves the workers it added in the pipeline.

        Raises:
            EtcdError: the first listing failed (later failures are retried).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._list()
            task_status.started()
            delay = self.backoff
            while True:
                watched_at = trio.current_time()
                try:
                    await self._follow()
                    delay = self.backoff  # the grace ended (or the watch did): list soon
                except EtcdError as exc:
                    if trio.current_time() - watched_at >= self.max_backoff:
                        delay = self.backoff  # the watch held: back-off starts afresh
                    _logger.warning(
                        "lost the etcd watch: %s; listing the workers again in %.1fs (the "
                        "pipeline keeps its workers meanwhile)",
                        exc,
                        delay,
                    )
                delay = await self._list_again(delay)

    async def _list_again(self, delay: float) -> float:
        """List after ``delay`` seconds, and again with back-off until a listing succeeds;
        returns the delay for the next time. Never watch in between: the revision known
        from before may be one etcd has not reached (it lost its data), and a watch from
        there would wait without a word while workers register below it."""
        failures = 0
        while True:
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
            try:
                await self._list()
            except EtcdError as exc:
                failures += 1
                # Once per outage: later failures say nothing new.
                log = _logger.warning if failures == 1 else _logger.debug
                log(
                    "cannot list the workers: %s; trying again with back-off up to %.1fs, "
                    "watching again only once a listing succeeds (the pipeline keeps its "
                    "workers meanwhile)",
                    exc,
                    self.max_backoff,
                )
                continue
            _logger.info(
                "listed the workers again%s: %d record(s) at etcd revision %d; watching from there",
                f" after {failures} failed attempt(s)" if failures else "",
                len(self._members),
                self._revision,
            )
            return delay

    async def _list(self) -> None:
        listing = await self.client.list_prefix(self.prefix)
        items, revision, term = listing.items, listing.revision, listing.raft_term
        new_store = revision < self._revision or term < self._raft_term
        if new_store:
            why = (
                f"etcd's revision went back from {self._revision} to {revision}"
                if revision < self._revision
                else f"etcd's raft term went back from {self._raft_term} to {term}"
            )
            _logger.warning(
                "%s: etcd lost its data (restarted without its data directory, or restored "
                "from a backup); following it as a new store: workers it has no record of "
                "stay as they are for %.1fs (new_store_grace) to register again, and leave "
                "if they do not",
                why,
                self.new_store_grace,
            )
        self._raft_term = term
        self._revision = revision
        present: dict[int, WorkerRecord] = {}
        for item in items:
            record = self._parse(item.key, item.value)
            if record is not None:
                present[record.worker_id] = record
        now = trio.current_time()
        for worker_id in list(self._members):
            if worker_id in present:
                continue
            if new_store:
                # A live worker's renewal finds its lease gone and puts its record back;
                # until then it serves as before (dropping it would drain its streams).
                self._held[worker_id] = now + self.new_store_grace
            elif self._held.get(worker_id, -math.inf) <= now:
                why = (
                    "it did not register again after etcd lost its data"
                    if worker_id in self._held
                    else "its record is gone"
                )
                await self._leave(worker_id, why)
        for record in present.values():
            await self._join(record)
        for member in list(self._members.values()):
            await member.settled.wait()
        self.listings += 1

    async def _follow(self) -> None:
        events = self.client.watch_prefix(
            self.prefix, start_revision=self._revision + 1, raft_term=self._raft_term
        )
        async with aclosing(events):
            while True:
                # A listing after the grace drops the held workers that did not register
                # again (the watcher's own task: one owner of the members). The grace ends
                # only the wait for an event, never an event's handling halfway (a removal
                # cut after its member left would leave its engine running, unowned).
                event = None
                with trio.move_on_at(min(self._held.values(), default=math.inf)):
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        return
                if event is None:
                    return  # the grace ended
                self._revision = max(self._revision, event.revision)
                if event.kind == "delete":
                    worker_id = self._id_of(event.key)
                    if worker_id is not None:
                        await self._leave(worker_id, "its record was deleted")
                    continue
                record = self._parse(event.key, event.value)
                if record is not None:
                    await self._join(record)

    def _id_of(self, key: str) -> int | None:
        tail = key[len(self.prefix) :]
        return int(tail) if tail.isascii() and tail.isdigit() else None

    def _parse(self, key: str, value: bytes) -> WorkerRecord | None:
        try:
            record = WorkerRecord.from_json(value)
        except BadRecord as exc:
            _logger.error("skipping etcd key %r: the worker record is invalid: %s", key, exc)
            return None
        if self._id_of(key) != record.worker_id:
            _logger.error(
                "skipping etcd key %r: it holds the record of worker %d (the key must be %r)",
                key,
                record.worker_id,
                worker_key("", record.worker_id).lstrip("/"),
            )
            return None
        return record

    async def _join(self, record: WorkerRecord) -> None:
        self._held.pop(record.worker_id, None)
        draining = self._draining.get(record.worker_id)
        if draining is not None:
            # The old engine under this id stops before a new one takes the id.
            scope, stopped = draining
            scope.cancel()
            await stopped.wait()
        member = self._members.get(record.worker_id)
        if member is not None:
            if member.record == record and not (member.failed and member.done.is_set()):
                return
            await self._leave(record.worker_id, f"it registered again as {record}")
        member = _Member(record)
        self._members[record.worker_id] = member
        assert self._nursery is not None
        self._nursery.start_soon(self._add, member)

    async def _add(self, member: _Member) -> None:
        record = member.record
        delay = self.backoff
        try:
            with member.scope:
                while True:
                    member.engine = engine_from_record(record, self._engine_context())
                    try:
                        await self.pipeline.add_worker(member.engine)
                        break
                    except WorkerUnreachable as exc:
                        # Its record stands, so it is meant to be up: keep trying (cancelled
                        # when the record goes or changes).
                        member.failed = True
                        member.settled.set()
                        _logger.warning(
                            "worker %d registered in etcd is unreachable: %s; trying again "
                            "in %.1fs",
                            record.worker_id,
                            exc,
                            delay,
                        )
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.max_backoff)
                member.failed = False
                _logger.info(
                    "worker %d at %s (%s, %s) joined from etcd",
                    record.worker_id,
                    record.address,
                    record.kind,
                    record.role,
                )
        except (WorkerMismatch, ProtocolError, ConfigError, ValueError) as exc:
            member.failed = True
            _logger.error("skipping worker %d registered in etcd: %s", record.worker_id, exc)
        finally:
            member.settled.set()
            member.done.set()

    async def _leave(self, worker_id: int, why: str) -> None:
        self._held.pop(worker_id, None)
        member = self._members.pop(worker_id, None)
        if member is None:
            return
        member.scope.cancel()
        await member.done.wait()
        engine = member.engine
        if engine is not None and self.pipeline.engine(worker_id) is engine:
            # A `RemoteEngine` says how many streams are open on it; other kinds stop at once.
            open_streams: int = getattr(engine, "open_streams", 0)
            if open_streams and getattr(engine, "connected", False):
                # Draining: no new request goes there, and its streams finish where they run.
                await self.pipeline.remove_worker(worker_id)
                _logger.info(
                    "worker %d left: %s; %d stream(s) still open on it",
                    worker_id,
                    why,
                    open_streams,
                )
                scope = trio.CancelScope()
                self._draining[worker_id] = (scope, trio.Event())
                assert self._nursery is not None
                self._nursery.start_soon(self._stop_when_idle, worker_id, engine, scope)
                return
            await self.pipeline.remove_worker(worker_id, stop=True)
            _logger.info("worker %d left: %s", worker_id, why)

    async def _stop_when_idle(self, worker_id: int, engine: Any, scope: trio.CancelScope) -> None:
        """Stop ``engine`` (removed already) once no stream is open on it, its connection is
        lost, ``drain_timeout`` passes, or ``scope`` is cancelled (its id is taken again)."""
        with scope, trio.move_on_after(self.drain_timeout):
            # RemoteEngine has no event for this; a removed worker is polled, briefly.
            while engine.open_streams and engine.connected:  # noqa: ASYNC110
                await trio.sleep(0.05)
        try:
            # Its id is not taken again yet (`_join` waits for this): the pipeline's engine
            # scope under the id is still this engine's.
            await self.pipeline.remove_worker(worker_id, stop=True)
        finally:
            self._draining.pop(worker_id)[1].set()
        _logger.info("worker %d's engine stopped after its streams ended", worker_id)


async def watch_workers(
    client: EtcdClient,
    pipeline: WorkerPool,
    *,
    prefix: str = DEFAULT_PREFIX,
    context: EngineContext | None = None,
    connect_timeout: float = 5.0,
    new_store_grace: float = DEFAULT_NEW_STORE_GRACE,
    task_status: trio.TaskStatus[WorkerWatcher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a `WorkerWatcher` over ``pipeline`` until cancelled; ``task_status.started`` gets
    the watcher once the workers registered at the start have joined (or been skipped).
    ``context`` is what engines are built with (default: the pipeline's block size and
    tokenizer).

    Raises:
        EtcdError: the first listing failed.
    """
    watcher = WorkerWatcher(
        client,
        pipeline,
        prefix=prefix,
        context=context,
        connect_timeout=connect_timeout,
        new_store_grace=new_store_grace,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        task_status.started(watcher)
