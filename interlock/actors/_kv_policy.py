"""The ``kv`` selection policy: route where the prompt's prefix is cached, without piling
load on one worker.

Owned by the Router actor, which feeds it the workers' KV events (or, in approximate mode, its
own routing decisions) and asks it to choose. The cost of each candidate is the reference
one: ``overlap_score_weight`` times the prefill blocks it would compute (its queued prefill
plus this prompt's uncached part) plus the decode blocks it would hold.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio

from .._config import PipelineConfig
from ..engines import WorkerSnapshot
from ..kv import (
    ApproxKvIndexer,
    KvEvent,
    KvIndexer,
    KvSelection,
    OverlapScores,
    TtftModel,
    TtftSelection,
    WorkerLoadView,
    compute_block_hashes,
    kv_salt,
    select_by_ttft,
    select_worker,
)
from ..kv._hashing import iter_block_hashes, salt_hex
from ..wire import CandidateRecord, Leg, PreprocessedRequest, SelectionRecord, to_builtins
from ._policies import WorkerView


class KvPolicy:
    """Selection by prefix overlap and load over an index of what each worker caches.

    ``router_mode='kv'`` scores with the reference cost (`select_worker`);
    ``'predicted_ttft'`` with the predicted time to first token (`select_by_ttft`). The decode
    leg of a disaggregated request is chosen by the kv cost with overlap weight 0 (its prompt
    KV arrives from the prefill worker; only decode load matters). Per-request
    ``router_config_override`` values replace the configured weight and temperature.
    """

    def __init__(self, config: PipelineConfig, model: TtftModel | None = None) -> None:
        self.name = config.router_mode
        self.model = model or TtftModel()
        self.block_size = config.kv_block_size
        self.weight = config.overlap_score_weight
        self.temperature = config.router_temperature
        self._rng = random.Random(config.router_seed)
        self.exact = config.kv_events
        self.index: KvIndexer | None = KvIndexer() if self.exact else None
        self.approx: ApproxKvIndexer | None = (
            None
            if self.exact
            else ApproxKvIndexer(ttl=config.kv_approx_ttl, max_blocks=config.kv_approx_max_blocks)
        )
        self._memo: tuple[PreprocessedRequest, list[int]] | None = None

    # -- the index --------------------------------------------------------------------------

    def apply(self, event: KvEvent) -> None:
        """Mirror one KV event.

        Raises:
            WorkerOutOfSync: the worker's events have a gap; load a dump with `load_snapshot`.
        """
        if self.index is not None:
            self.index.apply(event)

    def load_snapshot(self, snapshot: WorkerSnapshot) -> None:
        """Replace one worker's entries with its dump."""
        if self.index is not None:
            self.index.remove_worker(snapshot.worker_id)
            self.index.load_dump(
                snapshot.worker_id, snapshot.kv_blocks, last_event_id=snapshot.kv_last_event_id
            )

    def rebuild(self, snapshots: Iterable[WorkerSnapshot]) -> None:
        for snapshot in snapshots:
            self.load_snapshot(snapshot)

    def forget_worker(self, worker_id: int) -> None:
        if self.index is not None:
            self.index.remove_worker(worker_id)
        if self.approx is not None:
            self.approx.remove_worker(worker_id)

    def routed(self, worker_id: int, request: PreprocessedRequest) -> None:
        """Approximate mode: assume ``worker_id`` now caches the request's prefix."""
        if self.approx is not None:
            self.approx.record_routed(worker_id, self.hashes(request), trio.current_time())

    @staticmethod
    def _salt_of(request: PreprocessedRequest) -> int | None:
        """The salt ``request``'s prompt is looked up (and, in approximate mode, recorded)
        under: its LoRA adapter's (``model``, None for the base model) and its ``cache_salt``;
        the engines cache an adapter's or a salt's blocks apart from the base model's
        (`kv_salt`)."""
        return kv_salt(request.model, request.cache_salt)

    def hashes(self, request: PreprocessedRequest) -> list[int]:
        """The prompt's block hashes (computed once per request, reused across its legs)."""
        memo = self._memo
        if memo is not None and memo[0] is request:
            return memo[1]
        hashes = compute_block_hashes(request.token_ids, self.block_size, self._salt_of(request))
        self._memo = (request, hashes)
        return hashes

    def overlaps(self, request: PreprocessedRequest) -> OverlapScores:
        if self.index is not None:
            memo = self._memo
            if memo is not None and memo[0] is request:
                return self.index.find_matches(memo[1])
            # The lookup stops at the first block no worker holds: hash only that far.
            return self.index.find_matches(
                iter_block_hashes(request.token_ids, self.block_size, self._salt_of(request))
            )
        hashes = self.hashes(request)
        assert self.approx is not None
        return self.approx.find_matches(hashes, trio.current_time())

    # -- choosing ---------------------------------------------------------------------------

    def choose(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        override = request.router_config_override
        weight = self.weight
        temperature = self.temperature
        if override is not None:
            if override.overlap_score_weight is not None:
                weight = override.overlap_score_weight
            if override.router_temperature is not None:
                temperature = override.router_temperature
        if leg == "decode":
            weight = 0.0
        elif self.name == "predicted_ttft":
            return self._salted(self._choose_by_ttft(leg, candidates, request), request)
        overlaps = self.overlaps(request) if weight else OverlapScores({}, {})
        views = [
            WorkerLoadView(c.worker_id, c.load.prefill_tokens, c.load.active_blocks)
            for c in candidates
        ]
        selection = select_worker(
            views,
            overlaps,
            len(request.token_ids),
            self.block_size,
            weight,
            temperature,
            self._rng,
        )
        record = kv_selection_record(leg, selection, candidates)
        return self._salted(record, request) if weight else record

    def _salted(self, record: SelectionRecord, request: PreprocessedRequest) -> SelectionRecord:
        """``record`` saying, for a salted request, which salt its overlaps were looked up
        under (``inputs["kv_salt"]``, the `kv_salt` in hex: never the cache salt itself,
        which a tenant may keep secret); an unsalted request's record is unchanged."""
        salt = self._salt_of(request)
        if salt is None:
            return record
        return attrs.evolve(record, inputs={**record.inputs, "kv_salt": salt_hex(salt)})

    def _choose_by_ttft(
        self, leg: Leg, candidates: Sequence[WorkerView], request: PreprocessedRequest
    ) -> SelectionRecord:
        selection = select_by_ttft(
            [c.worker_id for c in candidates],
            [c.load.prefill_tokens for c in candidates],
            [c.load.active_requests for c in candidates],
            self.overlaps(request),
            len(request.token_ids),
            self.block_size,
            self.model,
        )
        return ttft_selection_record(leg, selection, candidates)


def ttft_selection_record(
    leg: Leg, selection: TtftSelection, candidates: Sequence[WorkerView]
) -> SelectionRecord:
    """A `SelectionRecord` holding the whole `TtftSelection` (``inputs["predicted_ttft"]``)."""
    rows = tuple(
        CandidateRecord(
            worker_id=worker_id,
            overlap_blocks=overlap,
            prefill_tokens=queued,
            decode_blocks=view.load.active_blocks,
            active_requests=active,
            cost=predicted,
        )
        for worker_id, overlap, queued, active, predicted, view in zip(
            selection.worker_ids,
            selection.overlap_blocks,
            selection.queued_tokens,
            selection.active_requests,
            selection.predicted_ms,
            candidates,
            strict=True,
        )
    )
    index = selection.worker_ids.index(selection.chosen)
    reason = (
        f"predicted first token in {selection.predicted_ms[index]:.1f} ms: "
        f"{selection.queued_tokens[index]} queued + {selection.new_tokens(index)} uncached "
        f"prompt tokens ({selection.overlap_blocks[index]} blocks cached)"
    )
    return SelectionRecord(
        leg=leg,
        policy="predicted_ttft",
        chosen=selection.chosen,
        candidates=rows,
        reason=reason,
        inputs={"predicted_ttft": to_builtins(selection)},
    )


def kv_selection_record(
    leg: Leg, selection: KvSelection, candidates: Sequence[WorkerView]
) -> SelectionRecord:
    """A `SelectionRecord` holding the whole `KvSelection` (``inputs["kv"]``) for replay."""
    rows = tuple(
        CandidateRecord(
            worker_id=worker_id,
            overlap_blocks=overlap,
            prefill_tokens=prefill,
            decode_blocks=decode,
            active_requests=view.load.active_requests,
            cost=logit,
        )
        for worker_id, overlap, prefill, decode, logit, view in zip(
            selection.worker_ids,
            selection.overlap_blocks,
            selection.prefill_tokens,
            selection.decode_blocks,
            selection.logits,
            candidates,
            strict=True,
        )
    )
    chosen = selection.chosen
    best = selection.candidate(chosen)
    reason = (
        f"{selection.reason}: cost {best.logit:.2f} = {selection.overlap_score_weight:g} x "
        f"{best.prefill_tokens / selection.block_size:.2f} prefill blocks "
        f"({best.overlap_blocks} cached) + {best.decode_blocks} decode blocks"
    )
    inputs: dict[str, Any] = {"kv": to_builtins(selection)}
    return SelectionRecord(
        leg=leg, policy="kv", chosen=chosen, candidates=rows, reason=reason, inputs=inputs
    )
