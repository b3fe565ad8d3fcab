"""Events a worker publishes besides its streams: membership changes (KV events join later)."""

from __future__ import annotations

import attrs


@attrs.frozen
class WorkerJoined:
    """The worker is ready to take requests (again)."""

    worker_id: int


@attrs.frozen
class WorkerLeft:
    """The worker withdrew from discovery (it is draining, or it went down)."""

    worker_id: int


@attrs.frozen
class WorkerChanged:
    """What the worker may be sent changed (the LoRA adapters it serves): whoever watches
    membership reads it again, as if it had left and joined."""

    worker_id: int
