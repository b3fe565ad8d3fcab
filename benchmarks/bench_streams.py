"""Thousands of open streams on one ``interlock serve`` frontend: memory per stream, CPU per token,
and what a client that never reads costs.

Starts ``--workers`` ``interlock worker`` processes (the mock engine decoding at ``--speedup``
0.0008, a token every ~7 s per stream, slow enough that every stream stays open and 10,000 of
them fit on 2 cores; its prefill made free, see FREE_PREFILL_WORKER; ``--max-num-seqs`` large
enough that admission control, left on, admits every stream, so nothing is queued or shed) and
one ``interlock serve --remote-worker ...`` over them. A load generator in another process
opens streams (one HTTP/1.1 connection each, ``/v1/completions``, ``stream: true``) in steps up
to ``--streams`` (default 100, 1,000, 10,000) and keeps them all open, each reading its tokens
slowly but steadily (one read a second). At idle and at each step it samples the frontend's
resident memory (VmRSS) and CPU time (its threads' schedstat, so the generator's and the
workers' own cost are excluded) over a steady window of ``--window`` seconds, and counts the
tokens (SSE events) the generator received in it. It prints the memory per open stream,
(RSS(S) - RSS(idle)) / S, and the frontend's CPU milliseconds per token delivered (the idle
rate subtracted), each with its ratio against a smaller step measured in the same run (memory:
1,000 streams; CPU: 100): the machine is shared and noisy, so read the ratios, not the absolute
figures. A memory ratio near 1 from 1,000 to 10,000 means no per-stream leak; a CPU ratio near
1 means a token costs the same however many streams are open.

Then the slow-reader phase: a second frontend over one ``--zero-time`` worker (tokens as fast
as it can make them), and ``--slow-readers`` streams whose client never reads (a 4 KiB receive
buffer). It samples the frontend's RSS and ``interlock_http_stream_buffer_overflows_total``
(``/metrics``) every second for ``--slow-seconds``: with bounded stream buffers each such
stream is cancelled once its client falls ``--max-stream-buffer-bytes`` behind, and RSS stops
growing. A slow reader's text is coalesced (about a byte a token), so the default 256 KiB takes
minutes to fill; this frontend runs with ``--slow-buffer`` (4 KiB) so that it fills in seconds.

The file-descriptor limit is raised to its hard limit in the generator and the frontend; if the
hard limit is below the largest step plus some headroom, the step is cut to fit and the output
says so. Every process it starts runs in its own process group, and every group is stopped at
the end, on error and on Ctrl-C.

    python benchmarks/bench_streams.py [--streams 100,1000,10000] [--workers W]
        [--speedup S] [--window SECONDS] [--settle SECONDS] [--slow-readers N]
        [--slow-seconds SECONDS] [--slow-buffer BYTES] [--skip-open | --skip-slow]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

# Process handling shared with bench_engines.py (this script's folder is on sys.path).
from bench_engines import Processes, wait_for_line

CLK_TCK = os.sysconf("SC_CLK_TCK")
FD_HEADROOM = 256  # descriptors a process needs besides its streams (workers, logs, listeners)
PROMPT = "Once"
MAX_TOKENS = 30_000  # more than any stream gets in a run: they stay open until closed
READ_INTERVAL = 1.0  # seconds between a steady reader's reads
SLOW_READER_RCVBUF = 4096
# `interlock worker` with the mock timing model's prefill made free. Its reference prefill step
# costs ~17 ms plus 0.015 ms a token (a GPU's fixed cost and a long prompt's), about 25 decode
# steps for a full batch: at a decode step slow enough for 10,000 streams on 2 cores (seconds),
# admitting them would take minutes and trip the first-token deadline. A few-token prompt's
# prefill is nearly free on a real GPU anyway; decoding keeps the reference model.
FREE_PREFILL_WORKER = (
    "import sys\n"
    "from interlock.engines.mock import MockTiming\n"
    "MockTiming.prefill_seconds = lambda self, new_tokens: 0.0\n"
    "from interlock.cli import main\n"
    "sys.exit(main(['worker', *sys.argv[1:]]))\n"
)


# -- processes ------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit; return it. The processes it
    starts afterwards inherit the raised limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_workers(
    processes: Processes,
    name: str,
    count: int,
    timing: list[str],
    max_num_seqs: int,
    free_prefill: bool = False,
) -> list[int]:
    """Start ``count`` ``interlock worker`` processes (``free_prefill``: with the prefill of
    the timing model made free); return their ports once listening."""
    started = []
    program = (
        [sys.executable, "-c", FREE_PREFILL_WORKER]
        if free_prefill
        else [sys.executable, "-m", "interlock", "worker"]
    )
    for worker_id in range(1, count + 1):
        command = [
            *program, "--id", str(worker_id), "--port", "0",
            "--tokenizer", "builtin", "--max-num-seqs", str(max_num_seqs),
            # Room for every sequence's KV blocks, so that none is preempted.
            "--num-gpu-blocks", str(max(16_384, 16 * max_num_seqs)),
            "--log-level", "warning", *timing,
        ]  # fmt: skip
        started.append(processes.start(f"{name}-worker{worker_id}", command))
    return [int(json.loads(wait_for_line(p, log, '"port"'))["port"]) for p, log in started]


def start_frontend(
    processes: Processes, name: str, ports: list[int], flags: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``interlock serve`` over the workers at ``ports``; return it and its URL."""
    command = [sys.executable, "-m", "interlock", "serve", "--port", "0", *flags]
    for worker_id, port in enumerate(ports, start=1):
        command += ["--remote-worker", f"{worker_id}=127.0.0.1:{port}"]
    process, log = processes.start(name, command)
    line = wait_for_line(process, log, "listening on ")
    return process, line.split("listening on ")[1].split()[0]


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s threads alive now, in nanoseconds' precision (schedstat), or
    utime + stime in clock ticks where schedstat is absent."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            # A thread may end between the listing and the read.
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{task}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
        return total / 1e9
    except FileNotFoundError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric(url: str, name: str) -> float:
    """The value of the unlabelled Prometheus sample ``name`` at ``url``/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# -- the load generator (its own process) ----------------------------------------------------------


@attrs.define
class Counts:
    started: int = 0  # request sent
    answered: int = 0  # first response bytes received
    failed: int = 0  # not a 200, or the connection failed
    ended: int = 0  # the server closed a stream that had started
    errors: int = 0  # SSE error events (a stream cancelled by the server)
    tokens: int = 0  # SSE data events other than [DONE]
    settled: int = 0  # answered, or failed before an answer

    def report(self) -> dict[str, int]:
        return attrs.asdict(self)


async def generator(url: str) -> None:
    """Serve the parent's commands, one a line on stdin, each answered with a JSON line:
    ``open N`` (open steady streams up to N in all, answer once each has its first bytes or
    failed), ``slow N`` (open N streams that never read), ``count``, ``close``."""
    host, port = url.removeprefix("http://").split(":")

    def request(n: int) -> bytes:
        # A prompt of its own per stream, so that no prefix-cache affinity piles them up on
        # one worker.
        body = json.dumps(
            {"model": "mock", "prompt": f"{PROMPT} {n}", "max_tokens": MAX_TOKENS,
             "ignore_eos": True, "stream": True}
        ).encode()  # fmt: skip
        return (
            f"POST /v1/completions HTTP/1.1\r\nhost: bench\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

    counts = Counts()
    spawned = 0
    connecting = trio.Semaphore(64)  # a burst of SYNs beyond the listen backlog costs retries

    async def connect(rcvbuf: int | None) -> trio.SocketStream:
        async with connecting:
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((host, int(port)))
            stream = trio.SocketStream(sock)
            await stream.send_all(request(counts.started))
            counts.started += 1
            return stream

    async def steady() -> None:
        first = True
        try:
            stream = await connect(None)
            while data := await stream.receive_some(65536):
                if first:
                    first = False
                    counts.answered += 1
                    counts.settled += 1
                    if not data.startswith(b"HTTP/1.1 200"):
                        counts.failed += 1
                        return
                counts.tokens += data.count(b"data: {")
                counts.errors += data.count(b'"error"')
                await trio.sleep(READ_INTERVAL)
            counts.ended += 1
        except OSError:
            counts.failed += 1
        if first:
            counts.settled += 1

    async def slow() -> None:
        try:
            stream = await connect(SLOW_READER_RCVBUF)
        except OSError:
            counts.failed += 1
            counts.settled += 1
            return
        counts.settled += 1
        async with stream:  # held open, never read
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        while True:
            line = (await trio.to_thread.run_sync(sys.stdin.readline)).split()
            if not line or line[0] == "close":
                nursery.cancel_scope.cancel()
                print(json.dumps(counts.report()), flush=True)
                return
            if line[0] in ("open", "slow"):
                target = int(line[1])
                for _ in range(target - spawned):
                    nursery.start_soon(steady if line[0] == "open" else slow)
                spawned = max(spawned, target)
                with trio.move_on_after(float(line[2]) if len(line) > 2 else 120.0):
                    while counts.settled < target:  # noqa: ASYNC110 (many tasks count)
                        await trio.sleep(0.02)
            print(json.dumps(counts.report()), flush=True)


# -- the measurements ------------------------------------------------------------------------------


@attrs.define
class Generator:
    """The load generator process and its command channel."""

    process: subprocess.Popen[bytes]
    log: Path

    def ask(self, command: str) -> dict[str, int]:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        while True:
            lines = self.log.read_text().splitlines()
            answers = [line for line in lines if line.startswith("{")]
            if len(answers) > self.asked:
                self.asked += 1
                return json.loads(answers[self.asked - 1])  # type: ignore[no-any-return]
            if self.process.poll() is not None:
                raise RuntimeError(f"the load generator exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.01)  # an answer takes milliseconds once its streams have settled

    asked: int = 0


def start_generator(processes: Processes, name: str, url: str) -> Generator:
    process, log = processes.start(
        name, [sys.executable, __file__, "--generator", url], stdin=subprocess.PIPE
    )
    return Generator(process, log)


@attrs.define
class Sample:
    streams: int
    rss: int
    cpu_per_s: float  # frontend CPU seconds per wall second in the window
    tokens_per_s: float
    failed: int = 0  # streams (all steps so far) refused, failed or ended by the server
    open: int = 0  # streams answered and still open at the end of the window


def window(pid: int, gen: Generator | None, seconds: float, streams: int) -> Sample:
    """Frontend CPU and tokens delivered over ``seconds`` of steady state."""
    nothing = {"tokens": 0, "failed": 0, "ended": 0, "answered": 0}
    before = gen.ask("count") if gen is not None else nothing
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    after = gen.ask("count") if gen is not None else nothing
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return Sample(
        streams,
        rss_bytes(pid),
        (cpu1 - cpu0) / (t1 - t0),
        (after["tokens"] - before["tokens"]) / (t1 - t0),
        after["failed"] + after["ended"],
        after["answered"] - after["failed"] - after["ended"],
    )


def open_streams_phase(processes: Processes, args: argparse.Namespace) -> list[Sample]:
    steps = args.streams
    # Every worker could hold every stream: admission control stays on and never limits.
    max_num_seqs = steps[-1] + 64
    ports = start_workers(
        processes,
        "steady",
        args.workers,
        ["--speedup", str(args.speedup)],
        max_num_seqs,
        free_prefill=True,
    )
    frontend, url = start_frontend(processes, "steady-frontend", ports)
    gen = start_generator(processes, "steady-generator", url)
    print(
        f"{args.workers} interlock workers at --speedup {args.speedup:g} (prefill free), "
        f"--max-num-seqs {max_num_seqs} (admission control on, every stream admitted); one "
        "interlock serve "
        f"(pid {frontend.pid}); steady window {args.window:g}s per step",
        flush=True,
    )
    # Warm every code path once, then let the frontend settle before the idle sample.
    gen.ask("open 4 60")
    time.sleep(min(2.0, args.window))
    gen.ask("close")
    gen = start_generator(processes, "steady-generator2", url)
    time.sleep(min(2.0, args.window))
    samples = [window(frontend.pid, None, args.window, 0)]
    for step in steps:
        counts = gen.ask(f"open {step} {args.open_timeout}")
        time.sleep(args.settle)
        sample = window(frontend.pid, gen, args.window, step)
        samples.append(sample)
        print(
            f"  {step} streams: {counts['answered']} answered, {counts['failed']} failed",
            flush=True,
        )
    gen.ask("close")
    return samples


def slow_reader_phase(processes: Processes, args: argparse.Namespace) -> dict[str, Any]:
    ports = start_workers(processes, "slow", 1, ["--zero-time"], max(256, args.slow_readers))
    flags = ["--max-stream-buffer-bytes", str(args.slow_buffer)]
    frontend, url = start_frontend(processes, "slow-frontend", ports, flags)
    time.sleep(min(2.0, args.window))
    idle = rss_bytes(frontend.pid)
    gen = start_generator(processes, "slow-generator", url)
    gen.ask(f"slow {args.slow_readers} 30")
    rss, overflows = [], []
    start = time.monotonic()
    while time.monotonic() - start < args.slow_seconds:
        rss.append(rss_bytes(frontend.pid))
        overflows.append(int(metric(url, "interlock_http_stream_buffer_overflows_total")))
        time.sleep(max(0.0, start + len(rss) - time.monotonic()))
    gen.ask("close")
    return {"idle": idle, "rss": rss, "overflows": overflows}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(samples: list[Sample], slow: dict[str, Any] | None, args: argparse.Namespace) -> None:
    if samples:
        open_streams_table(samples)
    if slow is not None:
        slow_reader_line(slow, args)


def open_streams_table(samples: list[Sample]) -> None:
    idle = samples[0]
    print(
        f"\n{'streams':>12} {'open':>6} {'RSS MiB':>8} {'KiB/stream':>10} {'ratio':>6} "
        f"{'tokens/s':>9} {'CPU ms/token':>12} {'ratio':>6} {'failed':>6}"
    )
    print(
        f"{'idle':>12} {'':>6} {mib(idle.rss):>8} {'':>10} {'':>6} {'':>9} {'':>12} {'':>6} {'':>6}"
    )
    per_stream: dict[int, float] = {}
    per_token: dict[int, float] = {}
    for s in samples[1:]:
        per_stream[s.streams] = (s.rss - idle.rss) / max(1, s.open)
        busy = max(0.0, s.cpu_per_s - idle.cpu_per_s)
        per_token[s.streams] = busy / s.tokens_per_s * 1000 if s.tokens_per_s else float("nan")
    # Memory per stream is compared with the second step (the first is too small to rise
    # above the allocator's noise), CPU per token with the first.
    mem_base = (
        per_stream[samples[2].streams] if len(samples) > 2 else per_stream[samples[1].streams]
    )
    cpu_base = per_token[samples[1].streams]
    for s in samples[1:]:
        n = s.streams
        print(
            f"{n:>12} {s.open:>6} {mib(s.rss):>8} {per_stream[n] / 1024:>10.1f} "
            f"{per_stream[n] / mem_base if mem_base > 0 else float('nan'):>6.2f} "
            f"{s.tokens_per_s:>9.0f} {per_token[n]:>12.4f} {per_token[n] / cpu_base:>6.2f} "
            f"{s.failed:>6}"
        )
    mem_step = samples[min(2, len(samples) - 1)].streams
    print(
        f"frontend CPU at idle: {idle.cpu_per_s * 1000:.1f} ms/s (subtracted); "
        "KiB/stream = (RSS - idle RSS) / open streams (answered, not ended), "
        f"ratio vs {mem_step} streams; "
        f"CPU ms/token ratio vs {samples[1].streams} streams; failed = streams refused, broken "
        "or ended by the server, all steps so far"
    )


def slow_reader_line(slow: dict[str, Any], args: argparse.Namespace) -> None:
    rss, overflows = slow["rss"], slow["overflows"]
    print(
        f"\nslow readers: {args.slow_readers} streams that never read, on a frontend with "
        f"--max-stream-buffer-bytes {args.slow_buffer} over a --zero-time worker, sampled each "
        f"second for {len(rss)} s: frontend RSS {mib(slow['idle'])} MiB idle, peak "
        f"{mib(max(rss))} MiB, {mib(rss[-1])} MiB at the end; "
        f"{overflows[-1]} of {args.slow_readers} streams cancelled for buffer overflow"
    )
    print(f"{'second':>12} " + " ".join(f"{i:>6}" for i in range(0, len(rss), 5)))
    print(f"{'RSS MiB':>12} " + " ".join(f"{mib(r):>6}" for r in rss[::5]))
    print(f"{'cancelled':>12} " + " ".join(f"{n:>6}" for n in overflows[::5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--streams",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[100, 1000, 10_000],
        help="the steps: open streams in all, comma-separated (100,1000,10000)",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--speedup", type=float, default=0.0008, help="the workers' decode speed (0.0008: a "
        "token every ~7 s per stream)"
    )  # fmt: skip
    parser.add_argument("--window", type=float, default=20.0, help="steady window per step (s)")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after a step opens (s)")
    parser.add_argument(
        "--open-timeout", type=float, default=90.0, help="longest wait for a step's answers (s)"
    )
    parser.add_argument("--slow-readers", type=int, default=20)
    parser.add_argument("--slow-seconds", type=float, default=25.0)
    parser.add_argument(
        "--slow-buffer",
        type=int,
        default=4096,
        help="the slow-reader frontend's --max-stream-buffer-bytes (4096, so that streams "
        "overflow within the phase: a slow reader's text is coalesced, a byte or so per token)",
    )
    parser.add_argument("--skip-slow", action="store_true", help="no slow-reader phase")
    parser.add_argument("--skip-open", action="store_true", help="only the slow-reader phase")
    parser.add_argument("--generator", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generator:
        raise_fd_limit()
        trio.run(generator, args.generator)
        return

    hard = raise_fd_limit()
    if args.streams[-1] + FD_HEADROOM > hard:
        cut = hard - FD_HEADROOM
        print(f"the open-file hard limit is {hard}: the largest step is cut to {cut} streams")
        args.streams = [min(s, cut) for s in args.streams]
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-streams-")))
    slow = None
    samples: list[Sample] = []
    try:
        if not args.skip_open:
            samples = open_streams_phase(processes, args)
            processes.stop_all()
            processes.started.clear()
        if not args.skip_slow:
            slow = slow_reader_phase(processes, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise
    finally:
        processes.stop_all()
    report(samples, slow, args)
    print(f"logs: {processes.directory}")


if __name__ == "__main__":
    main()
