"""The messages actors exchange. Plain frozen data; behaviour stays in the actor that owns it."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from .._errors import InterlockError
from ..engines import Engine
from ..wire import PreprocessedRequest, RoutingDecision
from ._adapters import Members


# -- Discovery ---------------------------------------------------------------------------------
@attrs.frozen
class GetWorkers:
    """Ask Discovery for the routable workers now; the reply is ``Mapping[int, Engine]``."""


@attrs.frozen
class WorkersChanged:
    """Discovery tells its subscribers the full membership after every change."""

    workers: Mapping[int, Engine]


# -- DisaggOrchestrator ------------------------------------------------------------------------
@attrs.frozen
class Route:
    """Ask the orchestrator to route ``request``: it decides the split and forwards a `Select`
    to the Router, whose `Selection` answers the asker directly."""

    request: PreprocessedRequest
    request_id: str
    exclude: frozenset[int] = frozenset()
    track: bool = True
    #: Apply the per-worker in-flight limits: a request starting, or a gateway's booking
    #: pick (not a migration, a fallback or a plain query), may only go to a worker with room.
    admit: bool = False
    #: See `Select.candidates`.
    candidates: frozenset[int] | None = None
    #: See `Select.reserved`.
    reserved: frozenset[int] = frozenset()
    #: See `Select.queued`.
    queued: bool = False
    #: See `Select.members`.
    members: Members | None = None


@attrs.frozen
class SplitPlan:
    disaggregated: bool
    reason: str


@attrs.frozen
class PrefillLegFailed:
    """Tell the orchestrator a prefill leg failed; it replies `FALL_BACK` or raises
    `PrefillFailed`."""

    request_id: str
    worker_id: int
    error: str


FALL_BACK = "fall_back"


# -- Router ------------------------------------------------------------------------------------
@attrs.frozen
class Select:
    """Ask the Router for workers; the reply is a `Selection`.

    ``track``: record the request's load against the chosen workers (a later `Free` releases
    it); a request already tracked has its old entries replaced. ``exclude``: workers that must
    not be chosen (they broke this request's stream before).
    """

    request: PreprocessedRequest
    request_id: str
    disaggregated: bool
    exclude: frozenset[int] = frozenset()
    track: bool = True
    enforce_disagg: bool = False
    split_reason: str = ""
    #: See `Route.admit`: every candidate at its limit raises `WorkersFull`.
    admit: bool = False
    #: The only workers either leg may choose (None: every registered one), as a gateway's
    #: subset hint restricts them; none of them left for a leg is as if none were registered.
    candidates: frozenset[int] | None = None
    #: With ``admit``: workers held for requests that wait ahead of this one in the admission
    #: queue, counted as full for it. Unlike ``exclude`` they stay candidates (they are in
    #: `WorkersFull.blocked_on`, and a request that names one is not refused over it).
    reserved: frozenset[int] = frozenset()
    #: With ``admit``: the request asks from the admission queue, which wants to know whether
    #: any worker has room left once it is booked (`Selection.room_left`).
    queued: bool = False
    #: With ``reserved``: the workers there were when it was worked out, each with the LoRA
    #: adapters it served then (`served_by`; None: not known). Any other worker joined since,
    #: and one whose adapters changed since, counts as reserved too: a waiter ahead, whose
    #: pool it may be in now, has not been asked about it yet.
    members: Members | None = None


@attrs.frozen
class Selection:
    decision: RoutingDecision
    decode_engine: Engine
    prefill_engine: Engine | None = None
    #: For a `Select.queued` request: whether some worker (any, for any request) is below its
    #: in-flight limit after this booking. False: the queue's pass can stop, no one else
    #: would find room. True otherwise.
    room_left: bool = True


@attrs.frozen
class PrefillComplete:
    """The request's prompt has been processed: its prefill load is released."""

    request_id: str


@attrs.frozen
class Free:
    """The request is over: release everything tracked for it (no-op when unknown)."""

    request_id: str


class WorkersFull(InterlockError):
    """Every candidate worker is at its in-flight limit (`Select.admit`): the request waits
    in the frontend's queue and asks again when a slot frees.

    ``blocked_on``: the refusing leg's candidates (after every filter: exclusions, the
    gateway's subset, the salt, the adapter; reserved and ejected ones included), the workers
    of which one must free a slot (or an ejection end) before asking again can succeed.
    ``returns``: the ejected ones among them, with when each one's ejection ends (trio's
    clock); it ends with no message, so the admission queue wakes their waiters then.
    """

    def __init__(
        self,
        message: str,
        *,
        blocked_on: frozenset[int],
        returns: Mapping[int, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.blocked_on = blocked_on
        self.returns: Mapping[int, float] = returns if returns is not None else {}


@attrs.frozen
class StreamFailed:
    """Tell the Router a worker broke a stream (``stalled``: by making no progress), for
    outlier ejection. A client's bad request is never reported."""

    worker_id: int
    stalled: bool


@attrs.frozen
class GetWorkerStates:
    """Ask the Router which workers it leaves out of routing now: ``dict[int, float]`` of
    each ejected worker's seconds left."""


@attrs.frozen
class GetKvBlocks:
    """Ask the Router what its KV index holds: ``dict[int, frozenset[int]]`` of each worker's
    block ids (empty without the kv policy)."""


@attrs.frozen
class GetLoad:
    """Ask the Router for every worker's tracked load: ``dict[int, WorkerLoad]``."""


# -- Migration ---------------------------------------------------------------------------------
@attrs.frozen
class StreamBroke:
    """Ask the Migration actor whether to continue a broken stream elsewhere.

    The reply is a `MigrationPlan` or a `MigrationRefused`.
    """

    request_id: str
    original: PreprocessedRequest
    generated: tuple[int, ...]
    migrations_done: int
    worker_id: int
    exclude: frozenset[int]
    error: str


@attrs.frozen
class MigrationPlan:
    """Continue with ``request`` (the original prompt plus every generated token, max_tokens
    lowered by as many), away from every worker in ``exclude``."""

    request: PreprocessedRequest
    attempt: int
    exclude: frozenset[int]
    folded_tokens: int


@attrs.frozen
class MigrationRefused:
    reason: str
