"""The mock engine: a simulated worker for tests, demos and benchmarks."""

from ._engine import MockEngine, mock_continuation, mock_next_token, mock_token_text
from ._timing import MockTiming

__all__ = [
    "MockEngine",
    "MockTiming",
    "mock_continuation",
    "mock_next_token",
    "mock_token_text",
]
