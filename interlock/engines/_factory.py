"""The one engine factory: `engine_from_record` builds the `Engine` a `WorkerRecord` names.

Kinds are registered by name, each with a builder ``(record, context) -> Engine``. A builder
is usually given as a ``"module:attribute"`` string and imported on the first record of its
kind, so that discovery, the wire layer and the pipeline, which build engines only through
this factory, never import a kind (and a kind's dependencies load only when it is used).

Adding a kind is one line here, in `_BUILTIN_KINDS` (a builder in `interlock.engines._kinds`,
or in the kind's own package), or one call to `register_engine_kind` from the application.
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from .._errors import ConfigError
from ..processing import Tokenizer, tokenizer_fingerprint
from ._record import WorkerRecord

if TYPE_CHECKING:
    from ._protocol import Engine


def _fingerprint(context: EngineContext) -> str | None:
    return None if context.tokenizer is None else tokenizer_fingerprint(context.tokenizer)


def _vocab_size(context: EngineContext) -> int | None:
    return None if context.tokenizer is None else context.tokenizer.vocab_size


def _read_only(resources: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(resources))


@attrs.frozen(kw_only=True)
class EngineContext:
    """What the frontend tells every engine it builds, whatever the kind.

    ``block_size`` is the frontend's tokens per KV block, and ``tokenizer`` its tokenizer
    (None: not checked); an engine checks its worker against both before it serves
    (`WorkerMismatch`, `TokenizerMismatch`). ``tokenizer_fingerprint`` and ``vocab_size``
    are derived from ``tokenizer`` once. ``connect_timeout`` bounds an engine's first
    connection (`WorkerUnreachable` after it); ``max_backoff`` caps the pause between
    reconnection attempts. ``resources`` holds what the frontend shares between engines,
    by name, opaque to the factory; known names: ``"kv_events"``, the frontend's KV-event
    feed (the ZMQ socket third-party engines publish to).
    """

    block_size: int = 16
    tokenizer: Tokenizer | None = None
    connect_timeout: float = 5.0
    max_backoff: float = 1.0
    #: Seconds an HTTP engine waits for an answer's headers before the stream counts as
    #: broken (the pipeline's ``engine_idle_timeout``; None: as long as it takes).
    idle_timeout: float | None = None
    resources: Mapping[str, Any] = attrs.field(factory=dict, converter=_read_only)
    #: The shared secret of ``interlock worker --secret-file`` workers (``"remote"`` kind;
    #: None: no authentication). Kept out of the repr.
    worker_secret: bytes | None = attrs.field(default=None, repr=False)
    #: The worker protocol's heartbeat (``"remote"`` kind): a ping every
    #: ``heartbeat_interval`` seconds (None: none), and a connection silent for
    #: ``heartbeat_timeout`` seconds is dead (docs/wire-protocol.md#heartbeat).
    heartbeat_interval: float | None = 2.0
    heartbeat_timeout: float = 10.0
    #: TLS toward ``interlock worker --tls-cert-file`` workers (``"remote"`` kind; an
    #: `ssl.SSLContext`, from `interlock.engines.remote.client_context`; None: plain TCP).
    worker_tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)
    #: The frontend's router uses the workers' KV events (``router_mode='kv'``, or a policy of
    #: the application's own); False: ``"remote"`` engines skip their frames undecoded.
    decode_kv_events: bool = True
    tokenizer_fingerprint: str | None = attrs.field(
        init=False, default=attrs.Factory(_fingerprint, takes_self=True)
    )
    vocab_size: int | None = attrs.field(
        init=False, default=attrs.Factory(_vocab_size, takes_self=True)
    )


#: Builds the engine for a record of its kind. Raises `BadRecord` when the record lacks what
#: the kind needs, `ConfigError` or `ValueError` for other bad values.
EngineBuilder = Callable[[WorkerRecord, EngineContext], "Engine"]

#: The kinds interlock ships, by name: where their builders are. One line per kind.
_BUILTIN_KINDS: dict[str, str] = {
    "remote": "interlock.engines._kinds:build_remote",
    "mock": "interlock.engines._kinds:build_mock",
    "openai": "interlock.engines._kinds:build_openai",
}

_kinds: dict[str, str | EngineBuilder] = dict(_BUILTIN_KINDS)


class UnknownEngineKind(ConfigError):
    """A record names an engine kind that no one registered, or whose builder cannot be
    imported (the message says which, and what is registered)."""


def register_engine_kind(kind: str, builder: str | EngineBuilder, *, replace: bool = False) -> None:
    """Let records of ``kind`` build engines with ``builder``: a callable ``(record, context)
    -> Engine``, or a ``"module:attribute"`` string naming one, imported on first use.

    Raises:
        ValueError: ``kind`` is empty, or already registered and ``replace`` is False (pass
            ``replace=True`` to change a kind's builder on purpose).
    """
    if not kind:
        raise ValueError("an engine kind needs a name")
    if kind in _kinds and not replace:
        raise ValueError(
            f"the engine kind {kind!r} is already registered ({_kinds[kind]!r}); pass "
            "replace=True to replace its builder"
        )
    _kinds[kind] = builder


def engine_kinds() -> tuple[str, ...]:
    """The registered kinds, sorted (imports none of them)."""
    return tuple(sorted(_kinds))


def engine_from_record(record: WorkerRecord, context: EngineContext) -> Engine:
    """The engine that reaches the worker ``record`` describes, built by its kind's builder
    (imported now, the first time a record names the kind). The engine is not started: the
    caller runs it (`Pipeline.add_worker`), which connects and checks the worker.

    Raises:
        UnknownEngineKind: no such kind, or its builder does not import.
        BadRecord: the record lacks what its kind needs (e.g. a ``url``).
        ValueError: the builder refused a value (a `ConfigError` is one).
    """
    builder = _kinds.get(record.kind)
    if builder is None:
        raise UnknownEngineKind(
            f"worker {record.worker_id}'s record names the engine kind {record.kind!r}, which "
            f"is not registered (known: {', '.join(engine_kinds())}); register it with "
            "interlock.engines.register_engine_kind, or fix the record's kind"
        )
    if isinstance(builder, str):
        builder = _kinds[record.kind] = _import_builder(record.kind, builder)
    return builder(record, context)


def _import_builder(kind: str, target: str) -> EngineBuilder:
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise UnknownEngineKind(
            f"the engine kind {kind!r} cannot be used: importing its builder {target!r} "
            f"failed: {exc} (install what it needs)"
        ) from exc
    except AttributeError:
        raise UnknownEngineKind(
            f"the engine kind {kind!r} cannot be used: {module_name!r} has no {attribute!r} "
            "(register the kind with the module:attribute of its builder)"
        ) from None
    if not callable(found):
        raise UnknownEngineKind(f"the engine kind {kind!r}: {target!r} is not callable")
    builder: EngineBuilder = found
    return builder
