"""The HTTP/1.1 server layer alone: `serve_http`'s llhttp server (``h1``) against Hypercorn.

Serves a bare ASGI app (no framework, no pipeline: what is measured is the server) with each
server in its own process pinned to CPU 0, and drives it with ``wrk`` (``apt-get install wrk``)
pinned to CPU 1: keep-alive connections, concurrency 16, a small JSON POST. Two answers: a
~330-byte JSON body with a Content-Length, and a stream of 17 chunked SSE events (~170 bytes
each, one ASGI send each, as a 16-token stream). Rounds alternate between the servers; it
prints each server's CPU milliseconds per request (utime + stime from /proc, so wrk's own
cost is excluded), requests/s, and the hypercorn/h1 ratios (medians over the rounds).

    python benchmarks/bench_h1.py [--seconds S] [--rounds R] [--connections C]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

SERVER = r"""
import sys, trio
from interlock.http import serve_http

JSON = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":'
        b'[{"index":0,"message":{"role":"assistant","content":"' + b"x" * 160 + b'"},'
        b'"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":16,'
        b'"total_tokens":25}}')
EVENT = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"' + b"x" * 60 + b'"},'
         b'"finish_reason":null}]}\n\n')

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(16):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(JSON)).encode())]})
        await send({"type": "http.response.body", "body": JSON})

async def main():
    async with trio.open_nursery() as nursery:
        url = await nursery.start(lambda task_status: serve_http(
            app, "127.0.0.1", 0, server=sys.argv[1], task_status=task_status))
        print(url, flush=True)

trio.run(main)
"""

LUA = """
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(url: str, path: str, pid: int, seconds: float, connections: int, lua: str) -> dict:
    """One wrk run against ``url + path``: requests/s and server CPU ms per request."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", lua,
         url + path],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"wrk failed: {out.stdout}{out.stderr}")
    out = out.stdout
    used = cpu_seconds(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return {"rps": requests / seconds, "cpu_ms": used * 1000 / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    servers = ("hypercorn", "h1")
    processes = {}
    urls = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(LUA)
    try:
        for name in servers:
            process = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, "-c", SERVER, name],
                stdout=subprocess.PIPE,
                text=True,
            )
            processes[name] = process
            urls[name] = process.stdout.readline().strip()
        time.sleep(0.5)
        results: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.rounds):
            for path in ("/json", "/stream"):
                for name in servers if round_ % 2 == 0 else servers[::-1]:
                    result = measure(
                        urls[name], path, processes[name].pid, args.seconds, args.connections,
                        lua.name,
                    )  # fmt: skip
                    results.setdefault((name, path), []).append(result)
        print(f"{'answer':8} {'server':10} {'req/s':>8} {'CPU ms/req':>11}")
        for path in ("/json", "/stream"):
            medians = {}
            for name in servers:
                rows = results[(name, path)]
                rps = statistics.median(r["rps"] for r in rows)
                cpu = statistics.median(r["cpu_ms"] for r in rows)
                medians[name] = (rps, cpu)
                print(f"{path[1:]:8} {name:10} {rps:8.0f} {cpu:11.3f}")
            ratio = medians["hypercorn"][1] / medians["h1"][1]
            print(f"{path[1:]:8} hypercorn/h1 CPU per request: {ratio:.2f}x")
    finally:
        for process in processes.values():
            process.kill()
        os.unlink(lua.name)


if __name__ == "__main__":
    main()
