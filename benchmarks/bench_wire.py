"""The worker protocol's cost: the pipeline over `RemoteEngine` workers in other processes
against the same pipeline over in-process `MockEngine`s, and the frame codec alone.

Both pipelines use zero-time mock workers, the same requests and the same concurrency, back to
back in one run, so the ratio holds on a noisy machine even when absolute figures move. The
remote workers are ``interlock worker`` processes on 127.0.0.1 (each has its own core when one
is free: the frontend pays for the protocol, the workers for the engine).

    python benchmarks/bench_wire.py [--requests N] [--concurrency C] [--max-tokens T]
                                    [--workers W] [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import trio

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines import Engine
from interlock.engines.mock import MockEngine, MockTiming
from interlock.engines.remote import RemoteEngine
from interlock.wire import EngineOutput, FrameParser, PreprocessedRequest, decode_body, encode_frame
from interlock.wire._frames import Output, Outputs, Start

PROMPT = tuple(range(1, 257))
STANDALONE = "import sys; from interlock.engines.remote._cli import main; raise SystemExit(main())"


def worker_command() -> list[str]:
    """``interlock worker`` once the top-level CLI has it; the same parser standalone until
    then."""
    from interlock.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(["worker", "--id", "0"])
        except SystemExit:
            return [sys.executable, "-c", STANDALONE]
    return [sys.executable, "-m", "interlock", "worker"]


@contextlib.contextmanager
def worker_processes(n: int) -> Iterator[list[int]]:
    """Start ``n`` zero-time workers (ids 0..n-1); yield their ports."""
    command = worker_command()
    processes = [
        subprocess.Popen(
            [*command, "--id", str(i), "--zero-time", "--log-level", "warning"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        ports = []
        for process in processes:
            assert process.stdout is not None
            ports.append(json.loads(process.stdout.readline())["port"])
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


async def _drive(
    n_requests: int, concurrency: int, one_request: Callable[[], Awaitable[None]]
) -> float:
    remaining = iter(range(n_requests))

    async def client() -> None:
        for _ in remaining:
            await one_request()

    start = time.perf_counter()
    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    _CPU.append(time.process_time() - cpu)
    return time.perf_counter() - start


#: The CPU seconds this process (the frontend) spent in each timed `_drive`, in order.
_CPU: list[float] = []


async def run_pipeline(args: argparse.Namespace, engines: list[Engine]) -> float:
    request = PreprocessedRequest(token_ids=PROMPT, max_tokens=args.max_tokens)
    async with build_pipeline(PipelineConfig(), Components(workers=engines)) as pipeline:

        async def one() -> None:
            async for _ in pipeline.generate(request):
                pass

        # Warm up (connections, caches) before timing.
        await _drive(min(200, args.requests), args.concurrency, one)
        return await _drive(args.requests, args.concurrency, one)


def codec_rates(n: int) -> dict[str, float]:
    """Frames per second of the codec alone, in this process."""
    output = Output(stream=12345, output=EngineOutput(token_ids=(31_999,)))
    final = Output(stream=12345, output=EngineOutput(token_ids=(31_999,), finish_reason="length"))
    start_frame = Start(stream=1, request=PreprocessedRequest(token_ids=PROMPT, max_tokens=16))
    rates: dict[str, float] = {}
    for name, message in (("output", output), ("final output", final), ("start", start_frame)):
        began = time.perf_counter()
        for _ in range(n):
            encode_frame(message)
        rates[f"encode {name}"] = n / (time.perf_counter() - began)
        body = encode_frame(message)[4:]
        began = time.perf_counter()
        for _ in range(n):
            decode_body(body)
        rates[f"decode {name}"] = n / (time.perf_counter() - began)
    batch = encode_frame(output) * 64
    parser = FrameParser()
    rounds = max(1, n // 64)
    began = time.perf_counter()
    for _ in range(rounds):
        parser.feed(batch)
    rates["parse 64 coalesced output frames per read"] = rounds * 64 / (time.perf_counter() - began)
    # Version 3: the outputs of 64 streams queued between two writes, in one frame.
    batch_frame = encode_frame(
        Outputs(outputs=tuple((12345 + i, EngineOutput(token_ids=(31_999,))) for i in range(64)))
    )
    began = time.perf_counter()
    for _ in range(rounds):
        parser.feed(batch_frame)
    rates["parse 1 outputs frame of 64 outputs, per output"] = (
        rounds * 64 / (time.perf_counter() - began)
    )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec-frames", type=int, default=100_000)
    args = parser.parse_args()
    n = args.requests

    def local() -> list[Engine]:
        return [MockEngine(i, timing=MockTiming.zero()) for i in range(args.workers)]

    in_process = statistics.median(
        trio.run(run_pipeline, args, local()) for _ in range(args.repeats)
    )
    # Every second drive is the timed one (the first warms up).
    in_process_cpu = statistics.median(_CPU[1::2]) / n * 1e6
    _CPU.clear()
    with worker_processes(args.workers) as ports:

        def remote() -> list[Engine]:
            return [RemoteEngine("127.0.0.1", port, instance_id=i) for i, port in enumerate(ports)]

        over_tcp = statistics.median(
            trio.run(run_pipeline, args, remote()) for _ in range(args.repeats)
        )
        over_tcp_cpu = statistics.median(_CPU[1::2]) / n * 1e6
    print(
        f"{n} requests, concurrency {args.concurrency}, {args.workers} zero-time workers, "
        f"{args.max_tokens} output token(s), 256-token prompt; median of {args.repeats}"
    )
    print(
        f"{'workers':34} {'req/s':>10} {'µs/req':>8} {'overhead µs':>12} {'ratio':>6} "
        f"{'frontend CPU µs/req':>20}"
    )
    print(
        f"{'in-process MockEngine':34} {n / in_process:10.0f} {in_process / n * 1e6:8.1f} "
        f"{'':12} {'':6} {in_process_cpu:20.1f}"
    )
    overhead = (over_tcp - in_process) / n * 1e6
    print(
        f"{'RemoteEngine -> interlock worker':34} {n / over_tcp:10.0f} "
        f"{over_tcp / n * 1e6:8.1f} {overhead:12.1f} {over_tcp / in_process:6.2f} "
        f"{over_tcp_cpu:20.1f}"
    )
    print()
    print("frame codec alone (msgpack + strict cattrs), frames/s:")
    for name, rate in codec_rates(args.codec_frames).items():
        print(f"  {name:44} {rate:10.0f}  ({1e6 / rate:.2f} µs)")


if __name__ == "__main__":
    main()
