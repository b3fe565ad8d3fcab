"""Whether ``interlock serve``'s memory stays flat as it answers more and more requests.

Starts ``interlock serve`` at its default settings over 2 ``interlock worker --zero-time``
processes with the real Qwen3 tokenizer (as ``bench_frontend.py`` does), and sends it
``bench_frontend.py``'s non-stream workload (~252-token chat prompts, max_tokens 16) at
concurrency ``--concurrency`` (64), on keep-alive connections, until each of ``--checkpoints``
(20,000 and 200,000 requests served, by default) is reached. At each checkpoint it reads the
frontend's resident memory (VmRSS, from psutil) and prints it with its growth since the first
checkpoint. The goal (issue 15): at most +10 % between 20,000 and 200,000 requests. 200,000
requests take several minutes on a quiet 2-core box. Every process it starts runs in its own
process group, stopped at the end, on error and on Ctrl-C.

    python benchmarks/bench_memory.py [--checkpoints 20000,200000] [--concurrency C]
        [--tokenizer DIR] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

# This script's folder is on sys.path: the processes and workload of bench_frontend.py.
from bench_engines import Processes
from bench_frontend import QWEN3, drive, request_body, start_interlock

BATCH = 5_000  # requests generated and sent at a time (the client's own memory stays small)
GOAL = 0.10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoints",
        default="20000,200000",
        help="comma-separated request counts at which RSS is read (20000,200000)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    parser.add_argument(
        "--tokenizer", default=str(QWEN3), help="the tokenizer folder, or 'builtin' (Qwen3's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: checkpoints at 100 and 300 requests"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.checkpoints = "100,300"
    try:
        args.checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    except ValueError:
        parser.error(f"--checkpoints {args.checkpoints!r}: give counts such as 20000,200000")
    if args.checkpoints[0] < 1:
        parser.error("--checkpoints: every count must be at least 1")
    if args.tokenizer != "builtin" and not Path(args.tokenizer).is_dir():
        parser.error(
            f"--tokenizer {args.tokenizer}: no such folder; point it at the Qwen3 tokenizer "
            "(shared/data/tokenizers/qwen3), or use 'builtin'"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[tuple[int, float, int, float]] = []  # served, RSS MiB, errors, seconds
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        processes = Processes(Path(tmp))
        try:
            system = start_interlock(processes, args.tokenizer, router_mode=None)
            idle = system.frontend.memory_info().rss / 2**20
            print(f"interlock serve at its defaults: {idle:.1f} MiB RSS idle", flush=True)
            rng = random.Random(args.seed)
            served = errors = 0
            started = time.monotonic()
            for checkpoint in args.checkpoints:
                while served < checkpoint:
                    count = min(BATCH, checkpoint - served)
                    bodies = [
                        json.dumps(request_body(rng, served + i, stream=False)).encode()
                        for i in range(count)
                    ]
                    outcomes, *_ = asyncio.run(
                        drive(system.url, bodies, args.concurrency, False, (), lambda: None)
                    )
                    errors += sum(1 for o in outcomes if o.error is not None)
                    served += count
                rss = system.frontend.memory_info().rss / 2**20
                rows.append((served, rss, errors, time.monotonic() - started))
                print(
                    f"  {served:>8} requests: {rss:.1f} MiB RSS ({errors} failed, "
                    f"{time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        except psutil.NoSuchProcess:
            print("interlock serve exited during the run", file=sys.stderr)
            return 1
        finally:
            processes.stop_all()
    first = rows[0][1]
    print()
    print("| requests served | RSS MiB | vs the first checkpoint | failed |")
    print("|---|---|---|---|")
    for served, rss, failed, _ in rows:
        print(f"| {served} | {rss:.1f} | {100 * (rss / first - 1):+.1f} % | {failed} |")
    growth = rows[-1][1] / first - 1
    verdict = "within" if growth <= GOAL else "ABOVE"
    print(
        f"\nRSS growth from {rows[0][0]} to {rows[-1][0]} requests: {100 * growth:+.1f} % "
        f"({verdict} the +{100 * GOAL:.0f} % goal); load average {os.getloadavg()[0]:.1f}"
    )
    return 1 if rows[-1][2] else 0


if __name__ == "__main__":
    sys.exit(main())
