"""`LoadLedger`: the load each worker carries, as the router has booked it."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ..engines import WorkerSnapshot
from ..wire import Leg


@attrs.define
class WorkerLoad:
    """Tracked load of one worker: requests, prompt tokens not yet prefilled, KV blocks."""

    active_requests: int = 0
    prefill_tokens: int = 0
    active_blocks: int = 0


@attrs.define
class _Entry:
    worker_id: int
    leg: Leg
    prefill_tokens: int
    blocks: int


class LoadLedger:
    """Per-request bookings, summed per worker. Synchronous; owned by the Router actor.

    A booking lives from `add` to `free`; `prefill_complete` drops its prefill tokens and ends
    a prefill leg's booking (that worker is done with the request).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._entries: dict[str, list[_Entry]] = {}
        self._loads: dict[int, WorkerLoad] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, worker_id: int) -> WorkerLoad:
        return self._loads.get(worker_id) or WorkerLoad()

    def loads(self) -> dict[int, WorkerLoad]:
        return {w: attrs.evolve(load) for w, load in self._loads.items() if load.active_requests}

    def add(
        self,
        request_id: str,
        worker_id: int,
        leg: Leg,
        prompt_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        """Book ``request_id`` on ``worker_id``: its blocks, and the prompt tokens the worker
        must compute (those not already in its cache; none for a decode leg, whose KV arrives
        from the prefill worker)."""
        prefill = 0 if leg == "decode" else max(0, prompt_tokens - cached_tokens)
        entry = _Entry(worker_id, leg, prefill, -(-prompt_tokens // self.block_size))
        self._entries.setdefault(request_id, []).append(entry)
        load = self._loads.get(worker_id)
        if load is None:
            load = self._loads[worker_id] = WorkerLoad()
        load.active_requests += 1
        load.prefill_tokens += entry.prefill_tokens
        load.active_blocks += entry.blocks

    def prefill_complete(self, request_id: str) -> None:
        entries = self._entries.get(request_id)
        if not entries:
            return
        kept = []
        for entry in entries:
            if entry.leg == "prefill":
                self._release(entry)
                continue
            self._loads[entry.worker_id].prefill_tokens -= entry.prefill_tokens
            entry.prefill_tokens = 0
            kept.append(entry)
        if kept:
            self._entries[request_id] = kept
        else:
            del self._entries[request_id]

    def free(self, request_id: str) -> None:
        for entry in self._entries.pop(request_id, ()):
            self._release(entry)

    def rebuild(self, snapshots: Iterable[WorkerSnapshot]) -> None:
        """Replace every booking with what the workers report they are serving."""
        self._entries.clear()
        self._loads.clear()
        for snap in snapshots:
            for seq in snap.active:
                if snap.role == "prefill" and seq.prefill_done:
                    continue  # a prefill leg's booking ends when its prefill does
                leg: Leg = "prefill" if snap.role == "prefill" else "agg"
                self.add(seq.request_id, snap.worker_id, leg, seq.prompt_tokens)
                if seq.prefill_done:
                    entry = self._entries[seq.request_id][-1]
                    self._loads[snap.worker_id].prefill_tokens -= entry.prefill_tokens
                    entry.prefill_tokens = 0

    def _release(self, entry: _Entry) -> None:
        load = self._loads.get(entry.worker_id)
        if load is None:
            return
        load.active_requests -= 1
        load.prefill_tokens -= entry.prefill_tokens
        load.active_blocks -= entry.blocks
        if load.active_requests <= 0:
            del self._loads[entry.worker_id]
