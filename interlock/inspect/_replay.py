"""Replaying a request's routing decisions from their records (`replay_selection`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import RequestError
from ..actors import REPLAYABLE_POLICIES, replay_selection
from ..wire import SelectionRecord, from_builtins
from ._history import RequestHistory
from ._records import LogEntry


@attrs.frozen
class LegReplay:
    """One selection recomputed: the worker the record says was ``recorded`` and the one its
    inputs give (``replayed``), or why it could not be replayed (``error``).

    ``custom``: the selection was made by a policy interlock does not know (a
    ``Components.selection_policy`` of your own), whose choice cannot be recomputed; that is
    not a mismatch.
    """

    leg: str
    policy: str
    recorded: int | None
    replayed: int | None
    error: str | None = None
    custom: bool = False

    @property
    def matches(self) -> bool:
        return self.error is None and self.recorded == self.replayed

    @property
    def mismatch(self) -> bool:
        """Replaying contradicts the record (a custom policy's leg never does)."""
        return not self.matches and not self.custom


@attrs.frozen
class DecisionReplay:
    """Every selection of one routing decision (record ``seq``), replayed, plus the checks that
    the decision agrees with its selections (``inconsistencies``: one sentence each)."""

    entry: LogEntry
    legs: tuple[LegReplay, ...]
    inconsistencies: tuple[str, ...] = ()

    @property
    def matches(self) -> bool:
        return (
            bool(self.legs) and all(leg.matches for leg in self.legs) and not self.inconsistencies
        )

    @property
    def contradicts(self) -> bool:
        """Something in the record is wrong: a leg replays to another worker (or cannot be
        read), or the decision disagrees with its selections. Legs of a custom policy, which
        cannot be recomputed, do not count."""
        return bool(self.inconsistencies) or any(leg.mismatch for leg in self.legs)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "seq": self.entry.seq,
            "trigger": self.entry.trigger,
            "location": self.entry.location,
            "matches": self.matches,
            "legs": [
                attrs.asdict(leg) | {"matches": leg.matches, "mismatch": leg.mismatch}
                for leg in self.legs
            ],
            "inconsistencies": list(self.inconsistencies),
        }


def _replay_leg(data: Any) -> LegReplay:
    if not isinstance(data, Mapping):
        return LegReplay("?", "?", None, None, f"a selection must be an object, got {data!r}")
    leg, policy = str(data.get("leg", "?")), str(data.get("policy", "?"))
    chosen = data.get("chosen")
    recorded = chosen if isinstance(chosen, int) else None
    try:
        record = from_builtins(data, SelectionRecord)
    except RequestError as exc:
        return LegReplay(leg, policy, recorded, None, f"not a valid selection record: {exc}")
    if record.policy not in REPLAYABLE_POLICIES:
        return LegReplay(
            leg,
            policy,
            recorded,
            None,
            f"{policy!r} is not a built-in policy: interlock cannot recompute a custom "
            "selection policy's choice (its reason and inputs are in the record: "
            "--request shows them)",
            custom=True,
        )
    try:
        replayed = replay_selection(record)
    except Exception as exc:
        # A record that cannot be replayed is the finding to report, whatever the policy's
        # replay raised; nothing here runs on a pipeline.
        return LegReplay(leg, policy, recorded, None, f"{type(exc).__name__}: {exc}")
    return LegReplay(leg, policy, recorded, replayed)


def replay_decision(entry: LogEntry) -> DecisionReplay:
    """Recompute the routing decision of one ``route`` or ``fall_back`` record."""
    decision = entry.decision
    if not isinstance(decision, Mapping):
        return DecisionReplay(entry, (), ("the record carries no routing decision",))
    selections = decision.get("selections") or []
    legs = tuple(_replay_leg(s) for s in selections)
    problems: list[str] = []
    if not legs:
        problems.append("the decision lists no selection to replay")
    by_leg = {leg.leg: leg for leg in legs}
    decode = by_leg.get("decode") or by_leg.get("agg")
    if decode is not None and decode.recorded != decision.get("decode_worker_id"):
        problems.append(
            f"decode_worker_id={decision.get('decode_worker_id')} but the {decode.leg} leg "
            f"chose {decode.recorded}"
        )
    prefill = by_leg.get("prefill")
    if (
        decision.get("disaggregated")
        and prefill is not None
        and prefill.recorded != decision.get("prefill_worker_id")
    ):
        problems.append(
            f"prefill_worker_id={decision.get('prefill_worker_id')} but the prefill leg chose "
            f"{prefill.recorded}"
        )
    if entry.worker_id != decision.get("decode_worker_id"):
        problems.append(
            f"the record names worker {entry.worker_id}, the decision decode worker "
            f"{decision.get('decode_worker_id')}"
        )
    return DecisionReplay(entry, legs, tuple(problems))


def replay_decisions(history: RequestHistory) -> list[DecisionReplay]:
    """Recompute every routing decision of a request, oldest first (empty when it has none)."""
    return [replay_decision(entry) for entry in history.routing_entries]
