"""`EngineMetrics`: what an engine's Prometheus ``/metrics`` page says about its load.

vLLM (``vllm:``) and SGLang (``sglang:``) name the same facts differently; both are read, and an
engine that exposes neither gives an `EngineMetrics` of Nones (interlock's own bookkeeping then
stands alone).
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
#: Line prefixes of every series read (samples only: no # TYPE lines, so each family is
#: untyped and keeps its samples' own names).
_READ = tuple(
    f"{name}{end}"
    for name in (*_RUNNING, *_WAITING, *_KV_USAGE, *_CACHE_INFO, *_PREFIX_HITS, *_PREFIX_QUERIES)
    for end in ("{", " ")
)


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
    )
