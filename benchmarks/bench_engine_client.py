"""The engine client alone: the CPU a pipeline over `OpenAIEngine` spends per request, in
process, against zero-time ``interlock worker --openai-port 0`` engines (the mock behind vLLM's
HTTP surface), for several checkouts in the same run, interleaved.

No HTTP server in front and no tokenizer: each request is a `PreprocessedRequest` of
``--prompt-tokens`` ids and ``--max-tokens`` tokens, ``--concurrency`` at a time, streamed
(``pipeline.generate``) or a whole answer (``progress=False``, what a non-streamed HTTP request
uses). What is measured is the measuring process's own CPU (``time.process_time``) per
request, so the figure is the pipeline's and the engine client's, and moves much less with
the machine's load than a whole frontend's. Each round runs every checkout in its own process
(``PYTHONPATH=DIR``), in turn, the order alternating; the engines are started once from this
checkout and shared. It prints a line per round and checkout, then the medians, outputs per
request, and the median of the per-round ratios of the last checkout to the first.

    python benchmarks/bench_engine_client.py --src base=/tmp/base --src new=. \\
        [--rounds 6] [-n 2000] [--concurrency 16] [--modes stream,whole] [--speedup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_engines import Processes, start_mock_engines

#: What each checkout's process runs: argv[1] is a JSON object of the settings.
_MEASURE = """
import json, sys, time
import trio
from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.openai import OpenAIEngine
from interlock.wire import PreprocessedRequest

settings = json.loads(sys.argv[1])

async def main():
    engines = [
        OpenAIEngine(url, instance_id=i, health_interval=1.0)
        for i, url in enumerate(settings["urls"], start=1)
    ]
    config = PipelineConfig(router_mode="round_robin")
    async with build_pipeline(config, Components(workers=engines)) as pipeline:
        progress = settings["mode"] == "stream"
        prompt = tuple(range(1000, 1000 + settings["prompt_tokens"]))
        outputs = 0

        async def one(i):
            nonlocal outputs
            request = PreprocessedRequest(
                token_ids=(i % 997, *prompt), max_tokens=settings["max_tokens"]
            )
            async for _ in pipeline.generate(request, progress=progress):
                outputs += 1

        async def run(n):
            todo = iter(range(n))

            async def client():
                for i in todo:
                    await one(i)

            async with trio.open_nursery() as nursery:
                for _ in range(settings["concurrency"]):
                    nursery.start_soon(client)

        await run(200)  # warm-up: connections, caches
        outputs = 0
        cpu = time.process_time()
        await run(settings["n"])
        cpu = time.process_time() - cpu
        n = settings["n"]
        print(json.dumps({"cpu_ms": 1000 * cpu / n, "outputs": outputs / n}))

trio.run(main)
"""


def measure(src: str, settings: dict[str, Any]) -> dict[str, float]:
    """One checkout's run: its CPU ms and outputs per request."""
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(settings)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(src).resolve())},
        timeout=600,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{src}: {completed.stderr[-2000:]}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--src", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("-n", type=int, default=2000, help="requests per run (2000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=255)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--modes", default="stream,whole", help="stream, whole or both (default)")
    parser.add_argument(
        "--speedup",
        type=float,
        help="engines at this many times the reference timing model's speed (1: a GPU's, a "
        "chunk a token) instead of zero-time",
    )
    args = parser.parse_args(argv)
    sources = [tuple(value.split("=", 1)) for value in args.src]
    modes = args.modes.split(",")
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_engine_client-") as scratch:
        processes = Processes(Path(scratch))
        try:
            urls = [
                url for url, _ in start_mock_engines(processes, args.engines, speedup=args.speedup)
            ]
            for number in range(args.rounds):
                order = sources if number % 2 == 0 else sources[::-1]
                for mode in modes:
                    for name, src in order:
                        settings = {
                            "urls": urls, "mode": mode, "n": args.n,
                            "concurrency": args.concurrency,
                            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                        }  # fmt: skip
                        result = measure(src, settings)
                        runs.setdefault((mode, name), []).append(result)
                        print(json.dumps({"round": number, "mode": mode, "src": name, **result}))
        finally:
            processes.stop_all()
    first, last = sources[0][0], sources[-1][0]
    print(
        f"\n{args.engines} engines "
        f"({'zero-time' if args.speedup is None else f'timing x{args.speedup:g}'}), "
        f"{args.prompt_tokens}-id prompts, "
        f"max_tokens {args.max_tokens}, concurrency {args.concurrency}, {args.n} requests a "
        f"run, {args.rounds} rounds; CPU ms per request (median) and outputs per request"
    )
    print("| mode | " + " | ".join(f"{name} ms/req | outputs" for name, _ in sources) + " |")
    for mode in modes:
        cells = []
        for name, _ in sources:
            cpu = statistics.median(r["cpu_ms"] for r in runs[mode, name])
            outputs = statistics.median(r["outputs"] for r in runs[mode, name])
            cells.append(f"{cpu:.3f} | {outputs:.1f}")
        ratios = [
            b["cpu_ms"] / a["cpu_ms"]
            for a, b in zip(runs[mode, first], runs[mode, last], strict=True)
        ]
        print(
            f"| {mode} | "
            + " | ".join(cells)
            + f" | {last}/{first} {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}] |"
        )


if __name__ == "__main__":
    main()
