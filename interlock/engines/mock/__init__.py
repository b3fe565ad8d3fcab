"""The mock engine: a simulated worker for tests, demos and benchmarks."""

from ._engine import MockEngine, mock_token_text
from ._timing import MockTiming

__all__ = ["MockEngine", "MockTiming", "mock_token_text"]
