"""Tools for testing a serving stack built on interlock: invariants, fault schedules,
hypothesis strategies.

`interlock.testing.strategies` needs hypothesis (the ``test`` extra); the rest does not.
"""

from ._faults import FAULT_KINDS, Fault, FaultKind, run_fault_schedule
from ._invariants import InvariantViolation, check_invariants
from ._workload import TimedRequest, WorkloadReport, run_workload, shared_prefix_workload

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "InvariantViolation",
    "TimedRequest",
    "WorkloadReport",
    "check_invariants",
    "run_fault_schedule",
    "run_workload",
    "shared_prefix_workload",
]
