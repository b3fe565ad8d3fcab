"""Selection policies of "your own", importable as ``custom_policies:...`` by the replay tests
(tests/ is on sys.path, as for ``helpers``)."""

from __future__ import annotations

from collections.abc import Sequence

from interlock import PipelineConfig
from interlock.actors import WorkerView, candidate_records
from interlock.wire import Leg, PreprocessedRequest, SelectionRecord


class LeastActive:
    """The candidate with the fewest active requests; ties go to the lowest id. Stateless, so
    losing it to a router restart loses nothing."""

    name = "least_active"

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        best = min(candidates, key=lambda c: (c.load.active_requests, c.worker_id))
        return SelectionRecord(
            leg=leg,
            policy=self.name,
            chosen=best.worker_id,
            candidates=candidate_records(candidates),
            reason=f"fewest active requests ({best.load.active_requests})",
            inputs={"active": [c.load.active_requests for c in candidates]},
        )


def least_active(config: PipelineConfig) -> LeastActive:
    """The factory ``--policies mine=custom_policies:least_active`` names."""
    return LeastActive()


#: Not a factory: ``--policies x=custom_policies:NOT_CALLABLE`` is refused.
NOT_CALLABLE = 42
