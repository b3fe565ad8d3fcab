"""The HTTP frontend's cost per request, against a bare Starlette-on-Hypercorn echo in the same run.

Starts ``interlock serve`` with zero-time mock workers (so everything measured is the frontend)
and a bare Starlette app on Hypercorn's trio worker, each in its own process pinned to CPU 0,
and drives them from a load generator in another process pinned to CPU 1: keep-alive
connections, concurrency 16, 16 output tokens. It prints requests/s and the server's CPU
milliseconds per request (utime + stime from /proc, so the generator's own cost is excluded),
non-streaming and streaming. Then it holds 2,000 streams open at once on slow mock workers and
reports the frontend's resident memory per in-flight request.

    python benchmarks/bench_http.py [--requests N] [--concurrency C] [--max-tokens T]
                                    [--runs R] [--streams S] [--skip-streams]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

HARNESS = (
    "import argparse, sys\n"
    "from interlock.http import add_route_parser, add_serve_parser\n"
    "p = argparse.ArgumentParser(prog='interlock')\n"
    "s = p.add_subparsers(dest='command', required=True)\n"
    "add_serve_parser(s); add_route_parser(s)\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.run(a))\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SERVER_CPU, CLIENT_CPU = 0, 1


# -- processes -----------------------------------------------------------------------------------


def serve_command() -> list[str]:
    """``python -m interlock serve`` once cli.py registers it; the same functions until then."""
    from interlock import cli

    try:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            cli.build_parser().parse_args(["serve"])
    except SystemExit:
        return [sys.executable, "-c", HARNESS, "serve"]
    return [sys.executable, "-m", "interlock", "serve"]


def start(command: list[str], cpu: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server process on ``cpu``; return it and its URL (from its first line)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "listening on " not in line:
        raise RuntimeError(f"{command} did not start: {line!r}")
    url = line.split("listening on ")[1].split()[0]
    return process, url


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


# -- the bare echo server --------------------------------------------------------------------------


def echo_server() -> None:
    """Starlette on Hypercorn's trio worker: a fixed chat completion, and a 16-token SSE stream
    of the same shape as interlock's (pre-encoded bytes)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from interlock.http import serve_http

    answer = json.dumps(
        {
            "id": "chatcmpl-0",
            "object": "chat.completion",
            "created": 0,
            "model": "mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x" * 16},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36},
        }
    ).encode()
    chunk = (
        b'data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":0,"model":"mock",'
        b'"choices":[{"index":0,"delta":{"content":"x"},"logprobs":null,"finish_reason":null}]}'
        b"\n\n"
    )

    async def complete(request: Request) -> Response:
        body = json.loads(await request.body())
        if body.get("stream"):

            async def chunks() -> Any:
                for _ in range(body.get("max_tokens", 16)):
                    yield chunk
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return Response(answer, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", complete, methods=["POST"])])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_http, app, "127.0.0.1", 0)
            print(f"echo: listening on {url}", flush=True)

    trio.run(main)


# -- the mock engines alone ------------------------------------------------------------------------


def engines_alone(requests: int, concurrency: int, max_tokens: int) -> None:
    """The zero-time mock workers' own CPU per request (same prompt, same token count), with
    no frontend in front: what ``interlock serve`` spends simulating the model, not serving."""
    from interlock.engines.mock import MockEngine, MockTiming
    from interlock.http import Preprocessor
    from interlock.http._cli import mock_token_pool
    from interlock.wire import PreprocessedRequest

    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    prompt = preprocessor.encode_chat(
        [{"role": "user", "content": "Tell me a short story about a fox."}]
    )
    engines = [
        MockEngine(i, timing=MockTiming.zero(), token_pool=mock_token_pool(tokenizer))
        for i in range(1, 5)
    ]

    async def main() -> float:
        remaining = iter(range(requests))
        turn = 0

        async def client() -> None:
            nonlocal turn
            for n in remaining:
                engine = engines[turn % len(engines)]
                turn += 1
                request = PreprocessedRequest(
                    token_ids=prompt, max_tokens=max_tokens, request_id=f"r{n}"
                )
                async with engine.open_stream(request) as stream:
                    async for _ in stream:
                        pass

        async with trio.open_nursery() as nursery:
            for engine in engines:
                await nursery.start(engine.run)
            start = time.process_time()
            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(client)
            spent = time.process_time() - start
            nursery.cancel_scope.cancel()
        return spent

    trio.run(main)  # warm up
    print(json.dumps({"cpu_ms": trio.run(main) / requests * 1000}), flush=True)


def wait_quiet(idle: float = 0.85, seconds: float = 1.0, patience: float = 30.0) -> None:
    """Wait (up to ``patience`` s) for a window in which the machine is mostly idle: the
    figures are CPU time, but a busy neighbour still slows caches and the scheduler."""

    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        idle0, total0 = times()
        time.sleep(seconds)
        idle1, total1 = times()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= idle:
            return


# -- the load generator --------------------------------------------------------------------------


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked); return status and raw body."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        buffer += data
    head = bytes(buffer[:end]).lower()
    del buffer[: end + 4]
    status = int(head[9:12])
    if b"content-length:" in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            buffer += await stream.receive_some(65536)
        body = bytes(buffer[:length])
        del buffer[:length]
        return status, body
    while (end := buffer.find(b"\r\n0\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        buffer += data
    body = bytes(buffer[: end + 7])
    del buffer[: end + 7]
    return status, body


def _request_bytes(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def drive(url: str, requests: int, concurrency: int, body: dict[str, Any]) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    request = _request_bytes("/v1/chat/completions", body)
    remaining = iter(range(requests))
    errors = 0
    stream_ok = body.get("stream", False)

    async def connection() -> None:
        nonlocal errors
        stream = await trio.open_tcp_stream(host, int(port))
        buffer = bytearray()
        for _ in remaining:
            await stream.send_all(request)
            status, answer = await _read_response(stream, buffer)
            if status != 200 or (stream_ok and b"data: [DONE]" not in answer):
                errors += 1
        await stream.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(connection)
    return {"seconds": time.perf_counter() - start, "errors": errors}


async def hold_streams(url: str, n: int, body: dict[str, Any]) -> dict[str, Any]:
    """Open ``n`` streams, wait until every one has sent its first event, report, close all."""
    host, port = url.removeprefix("http://").split(":")
    request = _request_bytes("/v1/chat/completions", body)
    opened = 0
    errors = 0
    all_open = trio.Event()
    release = trio.Event()

    async def one() -> None:
        nonlocal opened, errors
        try:
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(request)
            received = b""
            while b"data: " not in received:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionError("closed before the first event")
                received += data
            if not received.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(received[:100].decode(errors="replace"))
        except (OSError, ConnectionError):
            errors += 1
            opened += 1
            if opened == n:
                all_open.set()
            return
        opened += 1
        if opened == n:
            all_open.set()
        await release.wait()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
        with trio.fail_after(300):
            await all_open.wait()
        print(json.dumps({"open": n - errors, "errors": errors}), flush=True)
        # The parent measures the server now, then tells us to close.
        await trio.to_thread.run_sync(sys.stdin.readline)
        release.set()
    return {"open": n - errors, "errors": errors}


def client_main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    body = json.loads(args.body)
    if args.hold:
        trio.run(hold_streams, args.url, args.hold, body)
        return
    result = trio.run(drive, args.url, args.requests, args.concurrency, body)
    print(json.dumps(result), flush=True)


def run_client(url: str, requests: int, concurrency: int, body: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--client",
            url,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
            "--body",
            json.dumps(body),
        ],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- the measurements ------------------------------------------------------------------------------


def measure(
    server: subprocess.Popen[bytes], url: str, args: argparse.Namespace, stream: bool
) -> dict[str, Any]:
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "Tell me a short story about a fox."}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    run_client(url, min(500, args.requests), args.concurrency, body)  # warm up
    wait_quiet()
    before = cpu_seconds(server.pid)
    result = run_client(url, args.requests, args.concurrency, body)
    cpu = cpu_seconds(server.pid) - before
    return {
        "rps": args.requests / result["seconds"],
        "cpu_ms": cpu / args.requests * 1000,
        "errors": result["errors"],
    }


def median_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "rps": statistics.median(r["rps"] for r in runs),
        "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
        "cpu_min": min(r["cpu_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


def open_streams(args: argparse.Namespace) -> None:
    n = args.streams
    workers = max(4, -(-n // 256))  # a mock worker runs at most 256 sequences at once
    server, url = start(
        [*serve_command(), "--port", "0", "--speedup", "1", "--workers", str(workers)], SERVER_CPU
    )
    try:
        body = {
            "model": "mock",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 30_000,
            "ignore_eos": True,
            "stream": True,
        }
        run_client(url, 50, 8, {**body, "max_tokens": 4})  # warm up every code path
        idle = rss_bytes(server.pid)
        holder = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                url,
                "--hold",
                str(n),
                "--body",
                json.dumps(body),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None
        assert holder.stdin is not None
        status = json.loads(holder.stdout.readline())
        held = rss_bytes(server.pid)
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
        holder.wait(timeout=120)
        per_request = (held - idle) / max(1, status["open"])
        print(
            f"\n{n} concurrent streams on {workers} slow mock workers: {status['open']} open, "
            f"{status['errors']} errors; frontend RSS {idle / 2**20:.1f} MiB idle -> "
            f"{held / 2**20:.1f} MiB, {per_request / 1024:.1f} KiB per in-flight request"
        )
    finally:
        server.terminate()
        server.wait()


ROWS = (
    "bare Starlette+Hypercorn echo, JSON",
    "interlock serve, non-streaming",
    "bare Starlette+Hypercorn echo, SSE",
    "interlock serve, streaming",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--engines-alone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server()
        return
    if args.engines_alone:
        engines_alone(args.requests, args.concurrency, args.max_tokens)
        return
    if args.client:
        args.url = args.client
        client_main(args)
        return

    print(
        f"{args.requests} requests per run, concurrency {args.concurrency}, "
        f"{args.max_tokens} output tokens, keep-alive; server on CPU {SERVER_CPU}, "
        f"load generator on CPU {CLIENT_CPU}; median of {args.runs} runs"
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
    echo, echo_url = start([sys.executable, __file__, "--echo-server"], SERVER_CPU)
    serve, serve_url = start(
        [*serve_command(), "--port", "0", "--zero-time", "--workers", "4"], SERVER_CPU
    )
    try:
        for _ in range(args.runs):
            runs[ROWS[0]].append(measure(echo, echo_url, args, False))
            runs[ROWS[1]].append(measure(serve, serve_url, args, False))
            runs[ROWS[2]].append(measure(echo, echo_url, args, True))
            runs[ROWS[3]].append(measure(serve, serve_url, args, True))
    finally:
        for process in (echo, serve):
            process.terminate()
            process.wait()
    alone = subprocess.run(
        [sys.executable, __file__, "--engines-alone", "--requests", str(args.requests),
         "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)],
        capture_output=True, check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),
    )  # fmt: skip
    engines_ms = json.loads(alone.stdout)["cpu_ms"]
    print(
        f"{'server':<40} {'req/s':>7} {'CPU ms/req':>11} {'(min)':>7} {'w/o mock':>9} {'errors':>7}"
    )
    for name in ROWS:
        row = median_row(name, runs[name])
        frontend = (
            f"{row['cpu_ms'] - engines_ms:>9.3f}" if name.startswith("interlock") else " " * 9
        )
        print(
            f"{name:<40} {row['rps']:>7.0f} {row['cpu_ms']:>11.3f} {row['cpu_min']:>7.3f} "
            f"{frontend} {row['errors']:>7}"
        )
    print(
        f"the zero-time mock engines alone: {engines_ms:.3f} ms CPU per request "
        "(w/o mock = interlock's CPU minus this)"
    )
    print("goal: interlock <= 0.7 ms non-streaming, <= 1.3 ms per 16-token stream")
    if not args.skip_streams:
        open_streams(args)


if __name__ == "__main__":
    main()
