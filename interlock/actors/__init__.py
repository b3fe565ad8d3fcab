"""Supervised actors: the runtime, the supervisor, and the actors that make decisions
(Router, DisaggOrchestrator, Migration, Discovery)."""

from ._adapters import AFFINITY, adapter_affinity, served_adapters
from ._disagg import DisaggOrchestrator
from ._discovery import DiscoveryActor
from ._kv_policy import KvPolicy, kv_selection_record
from ._load import LoadLedger, WorkerLoad
from ._messages import (
    FALL_BACK,
    Free,
    GetKvBlocks,
    GetLoad,
    GetWorkers,
    GetWorkerStates,
    MigrationPlan,
    MigrationRefused,
    PrefillComplete,
    PrefillLegFailed,
    Route,
    Select,
    Selection,
    SplitPlan,
    StreamBroke,
    StreamFailed,
    WorkersChanged,
    WorkersFull,
)
from ._migration import MigrationActor
from ._outliers import OutlierEjector
from ._policies import (
    REPLAYABLE_POLICIES,
    DirectPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SelectionPolicy,
    WorkerView,
    candidate_records,
    replay_selection,
)
from ._router import PRESELECTION_FIELDS, RouterActor, RouterLimits
from ._runtime import Actor, ActorRef, Forward, InjectedCrash, open_mailbox, run_actor
from ._supervisor import RestartEvent, RestartPolicy, Supervisor

__all__ = [
    "AFFINITY",
    "FALL_BACK",
    "PRESELECTION_FIELDS",
    "REPLAYABLE_POLICIES",
    "Actor",
    "ActorRef",
    "DirectPolicy",
    "DisaggOrchestrator",
    "DiscoveryActor",
    "Forward",
    "Free",
    "GetKvBlocks",
    "GetLoad",
    "GetWorkerStates",
    "GetWorkers",
    "InjectedCrash",
    "KvPolicy",
    "LoadLedger",
    "MigrationActor",
    "MigrationPlan",
    "MigrationRefused",
    "OutlierEjector",
    "PrefillComplete",
    "PrefillLegFailed",
    "RandomPolicy",
    "RestartEvent",
    "RestartPolicy",
    "RoundRobinPolicy",
    "Route",
    "RouterActor",
    "RouterLimits",
    "Select",
    "Selection",
    "SelectionPolicy",
    "SplitPlan",
    "StreamBroke",
    "StreamFailed",
    "Supervisor",
    "WorkerLoad",
    "WorkerView",
    "WorkersChanged",
    "WorkersFull",
    "adapter_affinity",
    "candidate_records",
    "kv_selection_record",
    "open_mailbox",
    "replay_selection",
    "run_actor",
    "served_adapters",
]
