"""Engines that speak the OpenAI HTTP API (vLLM first): `OpenAIEngine`, its load as read from
``/metrics`` (`EngineMetrics`), and vLLM's KV-event feed. Putting interlock in front of such
servers: docs/engines.md."""

from ._engine import PREFILL_KV_TRANSFER_PARAMS, TOKENIZER_PROBE, OpenAIEngine
from ._metrics import EngineMetrics, parse_engine_metrics

__all__ = [
    "PREFILL_KV_TRANSFER_PARAMS",
    "TOKENIZER_PROBE",
    "EngineMetrics",
    "OpenAIEngine",
    "parse_engine_metrics",
]
