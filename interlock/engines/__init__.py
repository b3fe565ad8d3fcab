"""Workers: the `Engine` protocol and its implementations (see `interlock.engines.mock`)."""

from ._protocol import ROLES, ActiveSequence, Engine, EventListener, Role, WorkerSnapshot

__all__ = ["ROLES", "ActiveSequence", "Engine", "EventListener", "Role", "WorkerSnapshot"]
