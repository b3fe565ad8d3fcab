"""The mock engine: a simulated worker for tests, demos and benchmarks, in-process or behind
vLLM's HTTP surface (`serve_mock_openai`)."""

from ._engine import MockEngine, mock_continuation, mock_next_token, mock_token_text
from ._faults import FAULT_HEADER, FaultSpecError, MockFault, parse_faults
from ._http import MockOpenAIServer, MockSurfaceStats, serve_mock_openai
from ._kv_publisher import VllmKvPublisher, publish_vllm_kv_events
from ._text import MOCK_TEXT, mock_token_pool
from ._timing import MockTiming

__all__ = [
    "FAULT_HEADER",
    "MOCK_TEXT",
    "FaultSpecError",
    "MockEngine",
    "MockFault",
    "MockOpenAIServer",
    "MockSurfaceStats",
    "MockTiming",
    "VllmKvPublisher",
    "mock_continuation",
    "mock_next_token",
    "mock_token_pool",
    "mock_token_text",
    "parse_faults",
    "publish_vllm_kv_events",
    "serve_mock_openai",
]
