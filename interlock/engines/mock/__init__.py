"""The mock engine: a simulated worker for tests, demos and benchmarks."""

from ._engine import MockEngine, mock_continuation, mock_next_token, mock_token_text
from ._text import MOCK_TEXT, mock_token_pool
from ._timing import MockTiming

__all__ = [
    "MOCK_TEXT",
    "MockEngine",
    "MockTiming",
    "mock_continuation",
    "mock_next_token",
    "mock_token_pool",
    "mock_token_text",
]
