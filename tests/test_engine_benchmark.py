"""benchmarks/bench_engines.py runs end to end on mock engines, counts TTFT from the first text
(not a role-only chunk), and leaves no process behind. No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


bench = load_benchmark("bench_engines")


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode()


def test_a_role_only_or_usage_chunk_is_not_the_first_token() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert not bench.first_text(_event(role))
    assert not bench.first_text(_event(usage))
    assert not bench.first_text(b"data: [DONE]")


def test_chat_content_and_completion_text_are_the_first_token() -> None:
    chat = {"choices": [{"index": 0, "delta": {"content": " The"}}]}
    completion = {"choices": [{"index": 0, "text": " The"}]}
    assert bench.first_text(_event(chat))
    assert bench.first_text(_event(completion))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stopping_ends_every_process_group_children_included(tmp_path: Path) -> None:
    processes = bench.Processes(tmp_path)
    # A leader that ignores SIGTERM and a child of its own: both must go.
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    script += "; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    script += "; print('ready', flush=True); time.sleep(60)"
    process, log = processes.start("stubborn", [sys.executable, "-c", script])
    bench.wait_for_line(process, log, "ready")
    processes.stop_all(grace=0.5)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel reaps the orphaned child asynchronously
    assert not _group_alive(process.pid), "a process of the group outlived stop_all"


def test_a_process_that_exits_before_its_line_is_reported_with_its_output(tmp_path: Path) -> None:
    processes = bench.Processes(tmp_path)
    process, log = processes.start("broken", [sys.executable, "-c", "print('no such flag')"])
    with pytest.raises(RuntimeError, match="no such flag"):
        bench.wait_for_line(process, log, "listening on ")
    processes.stop_all()


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


def test_runs_end_to_end_on_mock_engines() -> None:
    # Every process the benchmark starts inherits this variable: that is how we find any
    # left behind, and only ours (other tests may run interlock workers at the same time).
    marker = f"bench-engines-test-{uuid.uuid4().hex}"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_engines.py"), "--zero-time",
         "--engines", "2", "--requests", "8", "--rounds", "2", "--concurrency", "2",
         "--prefixes", "2"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "BENCH_ENGINES_TEST": marker},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "ratio interlock / direct" in out, out
    assert "interlock serve CPU per request" in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith(("direct ", "through "))]
    assert [row[-1] for row in rows] == ["0", "0"], f"requests failed:\n{out}"
    leftovers = _processes_with(marker)
    assert not leftovers, f"processes the benchmark started are still running: {leftovers}"


def test_checkouts_lengths_and_the_wire_path_are_measured_side_by_side() -> None:
    # --src twice (old against new: here the same checkout), two lengths (the per-token fit)
    # and --wire: every frontend answers every request, and each comparison is printed.
    marker = f"bench-engines-test-{uuid.uuid4().hex}"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_engines.py"), "--zero-time",
         "--requests", "4", "--rounds", "2", "--concurrency", "2", "--prefixes", "2",
         "--max-tokens", "2,4", "--wire", "--src", f"old={ROOT}", "--src", f"new={ROOT}"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "BENCH_ENGINES_TEST": marker},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("direct ", "through "))]
    # direct, old, new and the wire path, at each of the two lengths; none failed.
    assert len(rows) == 8 and [row[-1] for row in rows] == ["0"] * 8, out
    assert "CPU per request, new / old" in out, out
    for name in ("old", "new", "interlock-wire"):
        assert f"  {name}: " in out and " us per token, " in out, out
    assert not _processes_with(marker)


def test_the_engine_client_benchmark_runs_each_checkout() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_engine_client.py"),
         "--src", f"old={ROOT}", "--src", f"new={ROOT}", "--rounds", "1", "-n", "20",
         "--concurrency", "4"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = [line for line in completed.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| stream", "| whole"], table
    assert all("new/old" in line for line in table[1:]), table
