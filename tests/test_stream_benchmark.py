"""benchmarks/bench_streams.py runs end to end at a tiny size: it prints its table of open
streams and its slow-reader line, every stream it opens is answered, and it leaves no process
behind. No timing or memory figure is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _processes_with(marker: str) -> list[list[bytes]]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if marker.encode() in environ:
            found.append(command)
    return found


def test_runs_end_to_end_at_a_tiny_size() -> None:
    # Every process the benchmark starts inherits this variable: that is how we find any
    # left behind, and only ours.
    marker = f"bench-streams-test-{uuid.uuid4().hex}"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_streams.py"), "--streams", "10,20",
         "--workers", "2", "--speedup", "0.05", "--window", "1", "--settle", "0.5",
         "--slow-readers", "2", "--slow-seconds", "2"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "BENCH_STREAMS_TEST": marker},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "KiB/stream" in out and "CPU ms/token" in out, out
    table = out.split("KiB/stream", 1)[1]
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["10"], ["20"])]
    assert len(rows) == 2, out
    assert [row[-1] for row in rows] == ["0", "0"], f"streams failed:\n{out}"
    assert "slow readers: 2 streams that never read" in out, out
    leftovers = _processes_with(marker)
    assert not leftovers, f"processes the benchmark started are still running: {leftovers}"
