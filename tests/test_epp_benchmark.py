"""benchmarks/bench_epp.py runs end to end at a tiny size: both pick paths and both Envoy
rows print, and it leaves no process behind; its per-thread CPU split keeps an ended thread's
CPU; a count below 1 is refused at the start. No timing figure is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from _envoy import require_envoy
from helpers import load_benchmark
from test_stream_benchmark import _processes_with

ROOT = Path(__file__).resolve().parents[1]


def test_runs_end_to_end_at_a_tiny_size() -> None:
    require_envoy()
    # Every process the benchmark starts inherits this variable: that is how we find any
    # left behind, and only ours.
    marker = f"bench-epp-test-{uuid.uuid4().hex}"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_epp.py"), "--tokens", "2000",
         "--picks", "5", "--requests", "5", "--workers", "2", "--prompts", "2",
         "--envoy-cpu", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BENCH_EPP_TEST": marker},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for row in (
        "ext_proc stream (grpcio client, lockstep)",
        "POST /v1/route + /free (HTTP/1.1)",
        "ext_proc / route-only: p50",
        "router per pick",
        "short prompt, fixed endpoint",
        "short prompt, interlock picking",
        "interlock adds (p50):",
        "Envoy on CPU 1",
    ):
        assert row in out, out
    leftovers = _processes_with(marker)
    assert not leftovers, f"processes the benchmark started are still running: {leftovers}"


def test_the_transport_comparison_runs_end_to_end_at_a_tiny_size() -> None:
    """benchmarks/ab_ext_proc_transport.py: every transport (a null grpc.aio server, interlock's
    h2 + trio server, and that server with h2's frame repr back) answers grpcio's client and a
    real Envoy, every CPU cell prints a ratio, and the latency table what each transport adds
    to Envoy's own p50."""
    require_envoy()
    marker = f"ab-ext-proc-test-{uuid.uuid4().hex}"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_ext_proc_transport.py"), "--rounds", "1",
         "--streams", "3", "--body", "2000", "--requests", "3"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BENCH_EPP_TEST": marker},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for row in ("lockstep, short body", "lockstep, 2081 B body", "envoy, short request"):
        assert any(line.startswith(row) and "h2+trio-repr" in line for line in out.splitlines())
    assert "through Envoy, short request" in out, out
    lines = out.splitlines()
    assert any(line.startswith("fixed endpoint") for line in lines), out
    for transport in ("grpc.aio ", "h2+trio ", "h2+trio-repr "):
        # A ratio, or n/a when grpc.aio's added p50 is not positive: 3 requests on a busy box
        # can be faster through the picker than to the fixed endpoint.
        assert any(line.startswith(transport) and line.endswith(("x", "n/a")) for line in lines), (
            out
        )
    leftovers = _processes_with(marker)
    assert not leftovers, f"processes the benchmark started are still running: {leftovers}"


def test_the_transport_comparisons_server_starts_and_names_its_port() -> None:
    """benchmarks/ab_ext_proc_transport.py's ``serve`` mode (each transport's no-op picker)
    builds its answer with the picker's own helpers: it must still start where there is no
    Envoy (the end-to-end test above skips there), and name its port."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "ab_ext_proc_transport.py"), "serve",
         "grpc.aio", "127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stderr is not None
        line = server.stdout.readline()
        if not line:
            server.wait(timeout=30)
            pytest.fail(f"the server exited: {server.stderr.read().decode()[-3000:]}")
        assert json.loads(line)["port"] > 0
    finally:
        server.kill()
        server.wait(timeout=30)


def test_the_per_thread_cpu_split_keeps_the_cpu_of_a_thread_that_ended_meanwhile() -> None:
    """bench_epp.py's "router per pick" rows: a thread of the router that ends between the
    two readings (a thread pool's idle worker reaped) must not take its whole past CPU out of
    "others" (CPU time never goes backwards; the process's own total keeps it)."""
    bench = load_benchmark("bench_epp")
    burnt = threading.Event()
    leave = threading.Event()

    def worker() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass
        burnt.set()
        leave.wait()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert burnt.wait(30)
        pid = os.getpid()
        total_before = bench.cpu_seconds(pid)
        before = bench.thread_usage(pid)
    finally:
        leave.set()
        thread.join()
    after = bench.thread_usage(pid)
    total_after = bench.cpu_seconds(pid)
    assert total_after >= total_before
    # /proc gives whole clock ticks, the process's and the main thread's each rounded down
    # from its own user/system split: "others", their difference, may dip by a few ticks
    # while the main thread runs between readings (seen: one in ~25 runs). The ended thread's
    # 0.3 s is 30 ticks.
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert after.others - before.others >= -4 * tick, (before.others, after.others)
    # Its context switches are left out, not subtracted.
    assert bench.usage_between(before, after)[2] >= 0, (before.switches, after.switches)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--picks", "0"], "--picks 0"),
        (["--requests", "0"], "--requests 0"),
        (["--prompts", "-1"], "--prompts -1"),
        (["--workers", "0"], "--workers 0"),
        (["--tokens", "0"], "--tokens 0"),
    ],
)
def test_a_count_below_one_is_refused_naming_its_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each count divides a figure or sizes what is measured: 0 used to end the run midway
    # (a ZeroDivisionError after the picks, with --requests 0) instead of at the start.
    bench = load_benchmark("bench_epp")
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(argv)
    assert exited.value.code == 2
    assert f"error: {flag}: give 1 or more" in capsys.readouterr().err


def test_requests_are_not_counted_when_the_envoy_part_is_skipped() -> None:
    bench = load_benchmark("bench_epp")
    assert bench.parse_args(["--requests", "0", "--skip-envoy"]).skip_envoy
