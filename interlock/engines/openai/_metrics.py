"""`EngineMetrics`: what an engine's Prometheus ``/metrics`` page says about its load.

vLLM (``vllm:``) and SGLang (``sglang:``) name the same facts differently; both are read, and an
engine that exposes neither gives an `EngineMetrics` of Nones (interlock's own bookkeeping then
stands alone). vLLM's LoRA state (``vllm:lora_requests_info``, with ``--enable-lora``) is read
into `LoraState`, as GAIE's model-server protocol names it.
"""

from __future__ import annotations

import math

import attrs
from prometheus_client.parser import text_string_to_metric_families

#: Gauge names per fact, the first found wins: vLLM's, then SGLang's.
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "sglang:token_usage")
_CACHE_INFO = ("vllm:cache_config_info",)
_PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
_PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")
#: One series per state the engine was in (labels ``max_lora``, ``running_lora_adapters``,
#: ``waiting_lora_adapters``); its value is when it was set, so the newest is the state now.
_LORA_INFO = "vllm:lora_requests_info"
#: Line prefixes of every series read (samples only: no # TYPE lines, so each family is
#: untyped and keeps its samples' own names).
_READ = tuple(
    f"{name}{end}"
    for name in (
        *_RUNNING,
        *_WAITING,
        *_KV_USAGE,
        *_CACHE_INFO,
        *_PREFIX_HITS,
        *_PREFIX_QUERIES,
        _LORA_INFO,
    )
    for end in ("{", " ")
)


@attrs.frozen(kw_only=True)
class LoraState:
    """The LoRA adapters an engine has loaded now (``running``: in its running batch),
    ``waiting`` (requested by waiting requests), and how many it can hold at once
    (``max_loras``, vLLM's ``--max-loras``; None: not said)."""

    max_loras: int | None = None
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()

    def has_room(self) -> bool:
        """Whether one more adapter fits beside those running and waiting (llm-d's rule:
        ``len(running) + len(waiting) < max_loras``)."""
        return self.max_loras is not None and len(self.running) + len(self.waiting) < (
            self.max_loras
        )


def _adapter_names(text: str) -> frozenset[str]:
    return frozenset(name for name in (part.strip() for part in text.split(",")) if name)


@attrs.frozen(kw_only=True)
class EngineMetrics:
    """An engine's own view of its load, from one scrape (None: the engine does not say).

    ``requests_running`` and ``requests_waiting`` sum over the engine's data-parallel ranks;
    ``kv_usage`` is the fraction of its KV cache in use (0-1, the highest rank's);
    ``block_size`` is the tokens per KV block it reports (vLLM's ``cache_config_info``).
    """

    requests_running: int | None = None
    requests_waiting: int | None = None
    kv_usage: float | None = None
    block_size: int | None = None
    #: KV blocks the engine has (vLLM's ``cache_config_info`` ``num_gpu_blocks``).
    num_blocks: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_queries: int | None = None
    #: The engine's LoRA state (None: it reports none: LoRA is off, or it is not vLLM).
    lora: LoraState | None = None


def parse_engine_metrics(text: str) -> EngineMetrics:
    """Read an engine's ``/metrics`` page (Prometheus text format). Pure.

    Series are matched by metric and label *names*, never positions (vLLM's
    ``cache_config_info`` has some thirty labels, in no promised order).

    Raises:
        ValueError: ``text`` is not in the Prometheus text format.
    """
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    block_size: int | None = None
    num_blocks: int | None = None
    lora: LoraState | None = None
    lora_set_at = -math.inf
    # A vLLM page has ~650 lines of histograms; the full parser takes tens of milliseconds on
    # them, on the event loop. Only the few series read here are parsed.
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(_READ))
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            name = sample.name
            if not math.isfinite(sample.value):
                continue  # a NaN or an infinity says nothing usable about load
            if name in _CACHE_INFO:
                size = sample.labels.get("block_size", "")
                if size.isdigit():
                    block_size = int(size)
                blocks = sample.labels.get("num_gpu_blocks", "")
                if blocks.isdigit():
                    num_blocks = int(blocks)
                continue
            if name == _LORA_INFO:
                if sample.value > lora_set_at:
                    lora_set_at = sample.value
                    lora = _lora_state(sample.labels)
                continue
            sums[name] = sums.get(name, 0.0) + sample.value
            maxima[name] = max(maxima.get(name, sample.value), sample.value)

    def first(names: tuple[str, ...], table: dict[str, float]) -> float | None:
        return next((table[n] for n in names if n in table), None)

    def count(names: tuple[str, ...]) -> int | None:
        value = first(names, sums)
        return None if value is None else int(value)

    usage = first(_KV_USAGE, maxima)
    return EngineMetrics(
        requests_running=count(_RUNNING),
        requests_waiting=count(_WAITING),
        kv_usage=usage,
        block_size=block_size,
        num_blocks=num_blocks,
        prefix_cache_hits=count(_PREFIX_HITS),
        prefix_cache_queries=count(_PREFIX_QUERIES),
        lora=lora,
    )


def _lora_state(labels: dict[str, str]) -> LoraState:
    size = labels.get("max_lora", "")
    return LoraState(
        max_loras=int(size) if size.isdigit() else None,
        running=_adapter_names(labels.get("running_lora_adapters", "")),
        waiting=_adapter_names(labels.get("waiting_lora_adapters", "")),
    )
