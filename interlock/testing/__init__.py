"""Tools for testing a serving stack built on interlock: invariants, fault schedules,
hypothesis strategies.

`interlock.testing.strategies` needs hypothesis (the ``test`` extra); the rest does not.
"""

from ._faults import FAULT_KINDS, Fault, FaultKind, run_fault_schedule
from ._invariants import InvariantViolation, check_invariants

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "InvariantViolation",
    "check_invariants",
    "run_fault_schedule",
]
