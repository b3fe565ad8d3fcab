"""Workers: the `Engine` protocol, its kinds (`interlock.engines.mock`, `.remote`, `.openai`),
and the one factory that builds an engine from a discovered `WorkerRecord`
(`engine_from_record`, with the frontend's `EngineContext`; `register_engine_kind` adds a
kind)."""

from ._factory import (
    EngineBuilder,
    EngineContext,
    UnknownEngineKind,
    engine_from_record,
    engine_kinds,
    register_engine_kind,
)
from ._protocol import (
    ROLES,
    ActiveSequence,
    Engine,
    EventListener,
    Role,
    TokenizerMismatch,
    WorkerMismatch,
    WorkerSnapshot,
    WorkerUnreachable,
)
from ._record import DEFAULT_KIND, BadRecord, WorkerRecord

__all__ = [
    "DEFAULT_KIND",
    "ROLES",
    "ActiveSequence",
    "BadRecord",
    "Engine",
    "EngineBuilder",
    "EngineContext",
    "EventListener",
    "Role",
    "TokenizerMismatch",
    "UnknownEngineKind",
    "WorkerMismatch",
    "WorkerRecord",
    "WorkerSnapshot",
    "WorkerUnreachable",
    "engine_from_record",
    "engine_kinds",
    "register_engine_kind",
]
