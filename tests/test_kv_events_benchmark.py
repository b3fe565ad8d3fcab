"""benchmarks/bench_kv_events.py runs at a tiny size and prints every row, in both layouts. No
timing figure is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runs_at_a_tiny_size() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kv_events.py"), "--tokens", "512",
         "--rounds", "1", "--steps", "20", "--cpu", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    for layout in ("map", "array"):
        for row in (f"store, {layout}", f"remove, {layout}", f"20 decode steps, {layout}"):
            assert row in completed.stdout, completed.stdout
