"""Engines that speak the OpenAI HTTP API (vLLM first): `OpenAIEngine`, its load as read from
``/metrics`` (`EngineMetrics`, with its LoRA adapters' `LoraState`), and vLLM's KV-event feed.
Putting interlock in front of such servers: docs/engines.md."""

from ._engine import PREFILL_KV_TRANSFER_PARAMS, TOKENIZER_PROBE, OpenAIEngine
from ._kv_feed import (
    KvEventFeed,
    KvFeedBindError,
    KvFeedStats,
    KvReplayFailed,
    kv_topic,
    replay_kv_batches,
)
from ._kv_mirror import KvBlockSizeMismatch, KvDump, KvMirror, KvMirrorStats
from ._metrics import EngineMetrics, LoraState, parse_engine_metrics
from ._stream import usage_from

__all__ = [
    "PREFILL_KV_TRANSFER_PARAMS",
    "TOKENIZER_PROBE",
    "EngineMetrics",
    "KvBlockSizeMismatch",
    "KvDump",
    "KvEventFeed",
    "KvFeedBindError",
    "KvFeedStats",
    "KvMirror",
    "KvMirrorStats",
    "KvReplayFailed",
    "LoraState",
    "OpenAIEngine",
    "kv_topic",
    "parse_engine_metrics",
    "replay_kv_batches",
    "usage_from",
]
