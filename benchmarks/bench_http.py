"""The HTTP frontend's cost per request, against a bare Starlette-on-Hypercorn echo in the same run.

Starts ``interlock serve`` with zero-time mock workers (so everything measured is the frontend)
and a bare Starlette app on Hypercorn's trio worker, each in its own process pinned to CPU 0,
and drives them from a load generator in another process pinned to CPU 1: keep-alive
connections, concurrency 16, 16 output tokens. It prints requests/s and the server's CPU
milliseconds per request (utime + stime from /proc, so the generator's own cost is excluded),
non-streaming and streaming. Then it holds 2,000 streams open at once on slow mock workers and
reports the frontend's resident memory per in-flight request.

    python benchmarks/bench_http.py [--requests N] [--concurrency C] [--max-tokens T]
                                    [--streams S] [--skip-streams]
"""

from __future__ import annotations

import argparse
import json
import os
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
    name: str, server: subprocess.Popen[bytes], url: str, args: argparse.Namespace, stream: bool
) -> dict[str, Any]:
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "Tell me a short story about a fox."}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    run_client(url, min(500, args.requests), args.concurrency, body)  # warm up
    before = cpu_seconds(server.pid)
    result = run_client(url, args.requests, args.concurrency, body)
    cpu = cpu_seconds(server.pid) - before
    return {
        "name": name,
        "rps": args.requests / result["seconds"],
        "cpu_ms": cpu / args.requests * 1000,
        "errors": result["errors"],
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
        assert holder.stdout is not None and holder.stdin is not None
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server()
        return
    if args.client:
        args.url = args.client
        client_main(args)
        return

    print(
        f"{args.requests} requests per row, concurrency {args.concurrency}, "
        f"{args.max_tokens} output tokens, keep-alive; server on CPU {SERVER_CPU}, "
        f"load generator on CPU {CLIENT_CPU}"
    )
    rows = []
    echo, echo_url = start([sys.executable, __file__, "--echo-server"], SERVER_CPU)
    try:
        rows.append(measure("bare Starlette+Hypercorn echo, JSON", echo, echo_url, args, False))
        rows.append(measure("bare Starlette+Hypercorn echo, SSE", echo, echo_url, args, True))
    finally:
        echo.terminate()
        echo.wait()
    serve, serve_url = start(
        [*serve_command(), "--port", "0", "--zero-time", "--workers", "4"], SERVER_CPU
    )
    try:
        rows.append(measure("interlock serve, non-streaming", serve, serve_url, args, False))
        rows.append(measure("interlock serve, streaming", serve, serve_url, args, True))
    finally:
        serve.terminate()
        serve.wait()
    print(f"{'server':<40} {'req/s':>8} {'CPU ms/req':>11} {'errors':>7}")
    for row in rows:
        print(f"{row['name']:<40} {row['rps']:>8.0f} {row['cpu_ms']:>11.3f} {row['errors']:>7}")
    print("goal: interlock <= 0.7 ms non-streaming, <= 1.3 ms per 16-token stream")
    if not args.skip_streams:
        open_streams(args)


if __name__ == "__main__":
    main()
