"""The DisaggOrchestrator actor: decides, per request, whether prefill runs elsewhere."""

from __future__ import annotations

from typing import Any

from .._errors import PrefillFailed, RequestError
from ..statemachines import Mode
from ..wire import PreprocessedRequest
from ._messages import (
    FALL_BACK,
    Free,
    GetWorkers,
    PrefillLegFailed,
    Route,
    Select,
    SplitPlan,
    WorkersChanged,
)
from ._runtime import Actor, ActorRef, Forward


class DisaggOrchestrator(Actor):
    """A request runs disaggregated when a prefill worker is registered (discover and
    query_only) or when it names one (direct_to_known). A failed prefill leg falls back to
    aggregated in discover mode unless ``enforce_disagg``; direct_to_known never falls back,
    because the caller chose the plan."""

    name = "disagg"

    def __init__(
        self,
        mode: Mode,
        *,
        enforce_disagg: bool,
        discovery: ActorRef[Any],
        router: ActorRef[Any],
    ) -> None:
        self._mode = mode
        self._router = router
        self._enforce = enforce_disagg
        self._discovery = discovery
        self._prefill_workers = 0

    async def on_start(self) -> None:
        self._count(await self._discovery.ask(GetWorkers()))

    async def handle(self, message: Any) -> Any:
        kind = type(message)
        if kind is Route:
            plan = self._plan(message.request)
            return Forward(
                self._router,
                Select(
                    message.request,
                    message.request_id,
                    plan.disaggregated,
                    message.exclude,
                    message.track,
                    self._enforce,
                    plan.reason,
                    message.admit,
                    message.candidates,
                    message.reserved,
                    message.queued,
                    message.members,
                ),
            )
        if kind is Free:
            # Sent this way by a request cancelled while its Route was here: behind it.
            return Forward(self._router, message)
        if kind is PrefillLegFailed:
            return self._prefill_failed(message)
        if kind is WorkersChanged:
            self._count(message.workers)
            return None
        raise TypeError(f"the disagg actor does not handle {message!r}")

    def _count(self, workers: Any) -> None:
        self._prefill_workers = sum(1 for e in workers.values() if e.role == "prefill")

    def _plan(self, request: PreprocessedRequest) -> SplitPlan:
        hints = request.routing
        named = hints.prefill_worker_id if hints is not None else None
        if self._mode.routing == "direct_to_known":
            if named is not None:
                return SplitPlan(True, f"the request names prefill_worker_id={named}")
            if self._enforce:
                raise RequestError(
                    "enforce_disagg=True and the request names no prefill_worker_id; a "
                    "direct_to_known request must name its prefill worker to run disaggregated",
                    field="prefill_worker_id",
                )
            return SplitPlan(False, "the request names no prefill worker")
        if named is not None:
            return SplitPlan(True, f"the request names prefill_worker_id={named}")
        if self._prefill_workers:
            return SplitPlan(True, f"{self._prefill_workers} prefill worker(s) registered")
        if self._enforce:
            raise PrefillFailed(
                "enforce_disagg=True, but no prefill worker is registered; register one or "
                "set enforce_disagg=False to serve aggregated meanwhile"
            )
        return SplitPlan(False, "no prefill worker registered")

    def _prefill_failed(self, message: PrefillLegFailed) -> str:
        if self._mode.routing == "direct_to_known":
            raise PrefillFailed(
                f"the prefill leg on worker {message.worker_id} (named by the request) failed: "
                f"{message.error}; direct_to_known does not change the caller's plan"
            )
        if self._enforce:
            raise PrefillFailed(
                f"the prefill leg on worker {message.worker_id} failed: {message.error}; "
                "enforce_disagg=True forbids serving the request aggregated"
            )
        return FALL_BACK
