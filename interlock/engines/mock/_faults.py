"""HTTP-level faults of the mock's vLLM surface: what a real vLLM does on the wire when it fails
(reference/vllm-cpu.md section 5), chosen per request or for every request.

A spec is one or more faults separated by ``;``, each ``KIND`` or ``KIND:key=value,...``:

==========================  ===================================================================
``http500``                 500 with vLLM's engine-dead error body, before any stream
``reset:after=N``           after N token chunks, a TCP reset (``ECONNRESET`` at the client)
``error:after=N``           after N chunks, an in-band ``data: {"error": {...}}`` then
                            ``data: [DONE]`` (vLLM whose EngineCore died mid-stream)
``eof:after=N``             after N chunks, a clean close: no finish_reason, no usage, no
                            ``[DONE]``, no terminating chunk (vLLM's API server killed)
``stall:after=N[,seconds=S]``  after N chunks, no bytes for S seconds (forever without S) while
                            ``/health`` stays 200; then the backlog in one chunk (as after
                            SIGCONT)
``freeze:after=N[,seconds=S]``  after N chunks, the whole engine stops for S seconds (forever
                            without S): every request stalls and ``/health`` stays 200 (vLLM
                            whose EngineCore was SIGSTOPped); ``stall`` stops only this response
                            while the engine keeps generating (its API server stopped)
``slow:seconds=S``          S more seconds (trio time) before every chunk
``burst:after=N,tokens=K``  after N chunks, K tokens per SSE chunk
==========================  ===================================================================

``after`` counts token chunks sent (0: before the first). Any fault also takes ``times=K``:
it applies to the first K requests that carry it from the command line, then no more (per
request, in a header, it applies to that request). A non-streaming request sees ``http500``
and ``error`` as a 500, ``reset`` and ``eof`` as a connection that dies before the answer,
``stall``, ``freeze`` and ``slow`` as a late answer, and ``burst`` not at all.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import attrs

FaultKind = Literal["http500", "reset", "error", "eof", "stall", "freeze", "slow", "burst"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = (
    "http500",
    "reset",
    "error",
    "eof",
    "stall",
    "freeze",
    "slow",
    "burst",
)
#: The request header that chooses a request's faults (mock-only; ``none`` for no fault).
FAULT_HEADER: Final = "x-interlock-mock-fault"

_KEYS: Final[dict[str, frozenset[str]]] = {
    "http500": frozenset({"times"}),
    "reset": frozenset({"after", "times"}),
    "error": frozenset({"after", "times"}),
    "eof": frozenset({"after", "times"}),
    "stall": frozenset({"after", "seconds", "times"}),
    "freeze": frozenset({"after", "seconds", "times"}),
    "slow": frozenset({"seconds", "times"}),
    "burst": frozenset({"after", "tokens", "times"}),
}
_REQUIRED: Final[dict[str, frozenset[str]]] = {
    "slow": frozenset({"seconds"}),
    "burst": frozenset({"tokens"}),
}


class FaultSpecError(ValueError):
    """A fault spec that does not parse; the message names the part and the grammar."""


@attrs.frozen
class MockFault:
    """One fault: ``kind`` with its parameters (see the module docstring)."""

    kind: FaultKind
    after: int = 0
    seconds: float | None = None
    tokens: int = 1
    times: int | None = None

    @property
    def ends_stream(self) -> bool:
        """Whether the fault ends the response (the others only delay or regroup it)."""
        return self.kind in ("http500", "reset", "error", "eof")


def parse_faults(spec: str) -> tuple[MockFault, ...]:
    """The faults a spec names (``"none"`` or ``""``: none).

    Raises:
        FaultSpecError: an unknown kind or key, a bad value, or two faults that end the stream.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return ()
    faults = tuple(_parse_one(part.strip()) for part in spec.split(";") if part.strip())
    if sum(1 for fault in faults if fault.ends_stream) > 1:
        raise FaultSpecError(
            f"fault spec {spec!r} has more than one fault that ends the stream "
            "(http500, reset, error, eof); keep one"
        )
    return faults


def _parse_one(text: str) -> MockFault:
    kind, _, params = text.partition(":")
    kind = kind.strip()
    if kind not in _KEYS:
        raise FaultSpecError(
            f"unknown fault {kind!r} in {text!r}; the kinds are {', '.join(FAULT_KINDS)} "
            "(e.g. 'reset:after=3', 'slow:seconds=0.05', 'stall:after=2,seconds=5')"
        )
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS[kind]:
            raise FaultSpecError(
                f"fault {kind!r} takes {', '.join(sorted(_KEYS[kind]))} as key=value; "
                f"got {item!r} in {text!r}"
            )
        values[key] = value.strip()
    missing = _REQUIRED.get(kind, frozenset()) - values.keys()
    if missing:
        raise FaultSpecError(f"fault {kind!r} needs {', '.join(sorted(missing))} (in {text!r})")
    return MockFault(
        kind=kind,  # type: ignore[arg-type]
        after=_count(values, "after", text, minimum=0) or 0,
        seconds=_seconds(values, text),
        tokens=_count(values, "tokens", text, minimum=1) or 1,
        times=_count(values, "times", text, minimum=1),
    )


def _count(values: dict[str, str], key: str, text: str, *, minimum: int) -> int | None:
    if key not in values:
        return None
    try:
        value = int(values[key])
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise FaultSpecError(
            f"{key} must be an integer >= {minimum}, got {values[key]!r} in {text!r}"
        )
    return value


def _seconds(values: dict[str, str], text: str) -> float | None:
    if "seconds" not in values:
        return None
    try:
        value = float(values["seconds"])
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise FaultSpecError(
            f"seconds must be a number >= 0, got {values['seconds']!r} in {text!r}"
        )
    return value


class FaultSchedule:
    """The command line's faults: each applies to every request, or to its first ``times``."""

    __slots__ = ("_faults", "_left")

    def __init__(self, faults: tuple[MockFault, ...] = ()) -> None:
        self._faults = faults
        self._left = [fault.times for fault in faults]

    def next_request(self) -> tuple[MockFault, ...]:
        """The faults the next request gets (counting it against each ``times``)."""
        chosen: list[MockFault] = []
        for index, fault in enumerate(self._faults):
            left = self._left[index]
            if left is None:
                chosen.append(fault)
            elif left > 0:
                self._left[index] = left - 1
                chosen.append(fault)
        return tuple(chosen)
