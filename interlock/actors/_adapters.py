"""LoRA-aware candidates: the one place a request's ``model`` narrows the workers it may go to.

A request whose ``model`` names a LoRA adapter (``PreprocessedRequest.model`` is not None: the
frontend sets it only for a name other than the base model's) may go only to the engines that
serve it (an `OpenAIEngine`'s ``adapters``, from its ``/v1/models``; GAIE's model-server protocol:
a model server serves the adapter named in ``model``); when none does, not even a base-model
engine takes it (`NoWorkersAvailable`: 503, retriable). Among
those, the router prefers, as llm-d's ``lora-affinity-scorer`` scores them (its tiers and their
order), the engines where the adapter is running now (`RUNNING`), then those with room to load
one more adapter (`ROOM`: running and waiting adapters fewer than ``max_loras``), then those
where it is waiting to be loaded (`WAITING`), then the rest (`FULL`; also an engine that reports
no LoRA state); the engine's ``vllm:lora_requests_info`` says which (`LoraState`). llm-d adds
that score to its other scorers'; interlock keeps only the best tier among the serving workers
that are not ejected or full (`AdapterCandidates.best`) and lets the configured policy choose
within it, so each choice has one reason the decision record states.

Engines are read duck-typed (``adapters``, ``metrics.lora``): an engine without them
(``interlock worker``; the mock unless its ``adapters`` are set) serves no adapter, and a
request for the base model is not narrowed here.
A request with a ``cache_salt`` may go only to engines that can carry it (`carries_salt`): an
``interlock worker`` from protocol version `SALT_VERSION` on (an older one would run it
unsalted, sharing the tenant's cached prefixes); the client's refusal at stream open stays as
the backstop.

Pure functions; the router calls them in its own task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from ..wire import SelectionRecord
from ..wire._frames import SALT_VERSION

__all__ = [
    "AFFINITY",
    "FULL",
    "ROOM",
    "RUNNING",
    "WAITING",
    "AdapterCandidates",
    "Members",
    "adapter_affinity",
    "adapter_candidates",
    "carries_salt",
    "served_adapters",
    "served_by",
    "with_adapter",
]

RUNNING: Final = "running"
ROOM: Final = "room"
WAITING: Final = "waiting"
FULL: Final = "full"
#: Each tier's score in llm-d's ``lora-affinity-scorer`` (best first).
AFFINITY: Final[Mapping[str, float]] = {RUNNING: 1.0, ROOM: 0.8, WAITING: 0.6, FULL: 0.0}


def served_adapters(engine: Any) -> frozenset[str]:
    """The LoRA adapters ``engine`` serves (none when it does not say)."""
    adapters = getattr(engine, "adapters", None)
    return adapters if isinstance(adapters, frozenset) else frozenset()


#: Workers by id, each with the LoRA adapters it serves (`Select.members`).
Members = Mapping[int, frozenset[str]]


def served_by(engines: Mapping[int, Any]) -> Members:
    """Each worker of ``engines`` with the LoRA adapters it serves now (`Select.members`: a
    worker whose adapters differ later changed pools since)."""
    return {w: served_adapters(engine) for w, engine in engines.items()}


def adapter_affinity(engine: Any, adapter: str) -> str:
    """``engine``'s tier for ``adapter`` by its last ``vllm:lora_requests_info``."""
    lora = getattr(getattr(engine, "metrics", None), "lora", None)
    if lora is None:
        return FULL
    if adapter in lora.running:
        return RUNNING
    if lora.has_room():
        return ROOM
    if adapter in lora.waiting:
        return WAITING
    return FULL


@attrs.frozen
class AdapterCandidates:
    """The workers of a pool that serve ``adapter`` (``serving``, in the pool's order) and
    each one's tier (``tiers``)."""

    adapter: str
    tiers: dict[int, str]

    @property
    def serving(self) -> list[int]:
        return list(self.tiers)

    def best(self, pool: Iterable[int]) -> list[int]:
        """The workers of ``pool`` (serving ones) in the best tier among them. The router asks
        after leaving out ejected and full workers, so a full best tier yields to the next."""
        pool = list(pool)
        if not pool:
            return pool
        top = max(AFFINITY[self.tiers[w]] for w in pool)
        return [w for w in pool if AFFINITY[self.tiers[w]] == top]

    def note(self, kept: list[int]) -> str:
        """Why ``kept`` (what `best` gave), in words (for the decision record's reason)."""
        text = f"LoRA adapter {self.adapter!r} {self.tiers[kept[0]]} on {kept}"
        others = [w for w in self.serving if w not in kept]
        if others:
            text += f" (also served by {others})"
        return text


def adapter_candidates(
    adapter: str, pool: Iterable[int], engines: Mapping[int, Any]
) -> AdapterCandidates:
    """The workers of ``pool`` that serve ``adapter`` (none: empty ``serving``), with their
    tiers. Keeps ``pool``'s order."""
    tiers = {
        w: adapter_affinity(engine, adapter)
        for w in pool
        if adapter in served_adapters(engine := engines.get(w))
    }
    return AdapterCandidates(adapter, tiers)


def carries_salt(engine: Any) -> bool:
    """Whether ``engine`` can take a request's ``cache_salt``: a remote worker only when the
    protocol version of its last handshake (``protocol_version``, read duck-typed: the router
    imports no engine) is `SALT_VERSION` or later; an engine that does not say (the mock, an
    OpenAI engine) sends the salt itself."""
    version = getattr(engine, "protocol_version", None)
    return version is None or version >= SALT_VERSION


def with_adapter(
    record: SelectionRecord, candidates: AdapterCandidates, kept: list[int]
) -> SelectionRecord:
    """``record`` saying why its candidates were ``kept``: its reason prefixed with the
    adapter's note, and ``inputs["lora"]`` holding the adapter and each serving worker's
    tier."""
    reason = candidates.note(kept) + (f"; {record.reason}" if record.reason else "")
    inputs = {
        **record.inputs,
        "lora": {
            "adapter": candidates.adapter,
            "tiers": {str(w): t for w, t in sorted(candidates.tiers.items())},
        },
    }
    return attrs.evolve(record, reason=reason, inputs=inputs)
