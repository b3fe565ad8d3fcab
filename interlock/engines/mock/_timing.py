"""The mock engine's timing model: the reference mocker's polynomials (milliseconds)."""

from __future__ import annotations

import math

import attrs


@attrs.frozen(kw_only=True)
class MockTiming:
    """How long the mock engine's steps take, in trio's (possibly virtual) seconds.

    Prefill of ``n`` new tokens (over the whole batch): ``a·n² + b·n + c`` ms, 0 for no new
    tokens. A decode step at KV occupancy ``p`` (active KV tokens / capacity):
    ``max(floor, d·p² + e·p + f)`` ms. Both are divided by ``speedup_ratio``; an infinite
    ratio (`MockTiming.zero`) makes every step take no time at all.
    """

    speedup_ratio: float = 1.0
    prefill_coefficients: tuple[float, float, float] = (4.209989e-7, 1.518344e-2, 16.50142)
    decode_coefficients: tuple[float, float, float] = (-25.74, 54.01, 5.74)
    decode_floor_ms: float = 1.0

    @classmethod
    def zero(cls) -> MockTiming:
        """Steps that take no time (benchmarks of everything but the engine)."""
        return cls(speedup_ratio=math.inf)

    @property
    def is_zero(self) -> bool:
        return math.isinf(self.speedup_ratio)

    def prefill_seconds(self, new_tokens: int) -> float:
        if new_tokens <= 0 or self.is_zero:
            return 0.0
        a, b, c = self.prefill_coefficients
        n = float(new_tokens)
        return (a * n * n + b * n + c) / 1000.0 / self.speedup_ratio

    def decode_seconds(self, kv_fraction: float) -> float:
        if self.is_zero:
            return 0.0
        d, e, f = self.decode_coefficients
        p = min(max(kv_fraction, 0.0), 1.0)
        return max(self.decode_floor_ms, d * p * p + e * p + f) / 1000.0 / self.speedup_ratio
