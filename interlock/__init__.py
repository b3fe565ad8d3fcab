"""interlock: a configuration-driven LLM-serving frontend pipeline for trio.

Every request is an explicit state machine; supervised actors decide where it goes.
"""

from ._config import COMBINATION_RULES, CombinationRule, PipelineConfig
from ._errors import (
    ActorCrashed,
    ConfigError,
    EngineError,
    IllegalTransition,
    InterlockError,
    NoWorkersAvailable,
    Overloaded,
    PipelineClosed,
    PrefillFailed,
    RequestError,
    SelectionPolicyError,
    WorkerGone,
    WorkerRefused,
    WorkerStalled,
)
from ._pipeline import Components, Pipeline, PipelineStats, build_pipeline

__version__ = "0.1.0"

__all__ = [
    "COMBINATION_RULES",
    "ActorCrashed",
    "CombinationRule",
    "Components",
    "ConfigError",
    "EngineError",
    "IllegalTransition",
    "InterlockError",
    "NoWorkersAvailable",
    "Overloaded",
    "Pipeline",
    "PipelineClosed",
    "PipelineConfig",
    "PipelineStats",
    "PrefillFailed",
    "RequestError",
    "SelectionPolicyError",
    "WorkerGone",
    "WorkerRefused",
    "WorkerStalled",
    "__version__",
    "build_pipeline",
]
