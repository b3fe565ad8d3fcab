"""Tools for testing a serving stack built on interlock, in virtual time: a simulated cluster
(the real pipeline over mock workers), workloads and what they measure, fault schedules,
the invariants every transition log must keep, and hypothesis strategies.

`interlock.testing.strategies` needs hypothesis (the ``test`` extra); the rest does not.
See docs/testing.md.
"""

from .._simclock import SimulationClock
from ._cluster import (
    MockWorkerSpec,
    NotInVirtualTime,
    SimulatedCluster,
    open_simulated_cluster,
    require_virtual_time,
    run_simulation,
    seed_scheduler,
)
from ._faults import (
    FAULT_KINDS,
    Fault,
    FaultKind,
    FaultSpecError,
    fault_schedule,
    faults_from_records,
    load_fault_schedule,
    parse_fault_spec,
    run_fault_schedule,
)
from ._invariants import InvariantViolation, check_invariants
from ._workload import (
    RequestResult,
    TimedRequest,
    WorkloadReport,
    run_workload,
    shared_prefix_workload,
)

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "FaultSpecError",
    "InvariantViolation",
    "MockWorkerSpec",
    "NotInVirtualTime",
    "RequestResult",
    "SimulatedCluster",
    "SimulationClock",
    "TimedRequest",
    "WorkloadReport",
    "check_invariants",
    "fault_schedule",
    "faults_from_records",
    "load_fault_schedule",
    "open_simulated_cluster",
    "parse_fault_spec",
    "require_virtual_time",
    "run_fault_schedule",
    "run_simulation",
    "run_workload",
    "seed_scheduler",
    "shared_prefix_workload",
]
