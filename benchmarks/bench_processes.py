"""``interlock serve --processes N``: throughput and CPU per request with N = 1 and N = 2.

Starts two ``interlock worker --zero-time`` processes (so the workers cost little and the
frontend is what is measured), then, in interleaved rounds, ``interlock serve --processes N``
over them for each N, and drives it from a load generator in its own process: keep-alive
connections at concurrency C, non-streaming chat completions of 16 tokens. For each N it
prints requests/s, the frontend's CPU milliseconds per request (the supervisor and its
children, utime + stime from /proc), and how the requests were spread over the processes (the
``x-interlock-process`` header of each answer); then the ratio of N = 2 to N = 1.

    python benchmarks/bench_processes.py [--requests N] [--concurrency C] [--rounds R]
                                         [--processes 1,2] [--tokenizer PATH|builtin]

The machine's other load moves requests/s: compare the N rows of one run only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

CLK_TCK = os.sysconf("SC_CLK_TCK")
QWEN3 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "qwen3"
PROMPT = "You are a railway signalling assistant. Answer briefly and name the rule you apply. " * 12


# -- processes -----------------------------------------------------------------------------------


def start(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start ``python -m interlock ARGV``; return it once it printed its first line (a
    worker's JSON, or serve's "listening on", printed once every process listens)."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"{argv[0]} exited early:\n{log.read_text()}")
    return process, [line.rstrip("\n")]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its living descendants."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# -- the load generator --------------------------------------------------------------------------


async def drive(url: str, requests: int, concurrency: int, body: dict[str, Any]) -> dict[str, Any]:
    """Send ``requests`` requests over ``concurrency`` keep-alive connections; the seconds
    taken, the errors, and how many answers each process gave."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    remaining = iter(range(requests))
    errors = 0
    by_process: collections.Counter[str] = collections.Counter()

    async def connection() -> None:
        nonlocal errors
        stream = await trio.open_tcp_stream(host, int(port))
        buffer = bytearray()
        for _ in remaining:
            await stream.send_all(request)
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                buffer += await stream.receive_some(65536)
            head = bytes(buffer[:end]).lower()
            del buffer[: end + 4]
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            del buffer[:length]
            if not head.startswith(b"http/1.1 200"):
                errors += 1
            process = head.partition(b"x-interlock-process:")[2].split(b"\r\n")[0].strip()
            by_process[process.decode() or "0"] += 1
        await stream.aclose()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(connection)
    return {
        "seconds": time.perf_counter() - began,
        "errors": errors,
        "by_process": dict(by_process),
    }


def run_client(url: str, requests: int, concurrency: int, body: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--client", url, "--requests", str(requests)),
            *("--concurrency", str(concurrency), "--body", json.dumps(body)),
        ],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- the measurement -----------------------------------------------------------------------------


def measure(
    processes: int, remote: list[str], tokenizer: list[str], args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    argv = ["serve", "--port", "0", "--processes", str(processes), "--model-name", "mock"]
    argv += [*tokenizer, "--router-mode", "round_robin", *remote]
    serve, banner = start(argv, log)
    try:
        url = banner[0].split("listening on ")[1].split(" ")[0]
        body = {
            "model": "mock",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16,
            "ignore_eos": True,
        }
        run_client(url, min(500, args.requests), args.concurrency, body)  # warm up
        before = tree_cpu_seconds(serve.pid)
        result = run_client(url, args.requests, args.concurrency, body)
        cpu = tree_cpu_seconds(serve.pid) - before
    finally:
        stop(serve)
    spread = sorted(result["by_process"].values(), reverse=True)
    return {
        "rps": args.requests / result["seconds"],
        "cpu_ms": cpu / args.requests * 1000,
        "errors": result["errors"],
        "spread": [round(n / args.requests, 2) for n in spread],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", default="1,2", help="comma-separated N to compare (1,2)")
    parser.add_argument(
        "--tokenizer",
        default=str(QWEN3) if QWEN3.exists() else "builtin",
        help="a tokenizer.json or model directory, or builtin (the shared Qwen3 tokenizer)",
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(trio.run(drive, args.client, args.requests, args.concurrency,
                                  json.loads(args.body))))  # fmt: skip
        return
    counts = [int(n) for n in args.processes.split(",")]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-processes-{os.getpid()}"
    logs.mkdir()
    tokenizer = [] if args.tokenizer == "builtin" else ["--tokenizer", args.tokenizer]
    workers = []
    try:
        remote = []
        for worker_id in (1, 2):
            worker, lines = start(
                [
                    *("worker", "--id", str(worker_id), "--port", "0", "--zero-time"),
                    *("--tokenizer", args.tokenizer, "--log-level", "warning"),
                ],
                logs / f"worker-{worker_id}.log",
            )
            workers.append(worker)
            remote += ["--remote-worker", f"{worker_id}=127.0.0.1:{json.loads(lines[0])['port']}"]
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
        for round_ in range(args.rounds):
            for n in counts:
                row = measure(n, remote, tokenizer, args, logs / f"serve-{n}-{round_}.log")
                runs[n].append(row)
                print(json.dumps({"round": round_, "processes": n, **row}), flush=True)
    finally:
        for worker in workers:
            stop(worker)
    print(
        f"\nnon-stream chat, max_tokens 16, C={args.concurrency}, {args.requests} requests, "
        f"2 zero-time interlock workers, medians of {args.rounds} interleaved rounds"
    )
    print("| processes | req/s | frontend CPU ms/req | share of requests per process |")
    print("|---|---|---|---|")
    medians = {}
    for n in counts:
        rps = statistics.median(r["rps"] for r in runs[n])
        cpu = statistics.median(r["cpu_ms"] for r in runs[n])
        medians[n] = rps
        spreads = " / ".join("+".join(f"{s:.2f}" for s in r["spread"]) for r in runs[n])
        print(f"| {n} | {rps:.0f} | {cpu:.2f} | {spreads} |")
    if len(counts) > 1:
        first = counts[0]
        for n in counts[1:]:
            print(f"req/s with {n} processes / with {first}: {medians[n] / medians[first]:.2f}")


if __name__ == "__main__":
    main()
