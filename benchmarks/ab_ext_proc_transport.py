"""grpc.aio against h2 + trio: the ext_proc transport's own CPU per stream, both in one run,
interleaved (issue 14: the transport with less Python per message, against grpcio's).

Each transport serves a picker that does no picking (`NoOpPicker`: every message answered at
once with what the real picker sends for it, the body echoed back in 62,000-byte chunks after
a fixed destination header; no router), in a process of its own pinned to CPU 0:
``grpc.aio`` is a null grpc.aio server (grpcio's C-core on an asyncio loop in the main thread,
each message answered in its handler: no trio, no thread hand-over; the baseline, what grpcio
costs at the least), ``h2+trio`` is `interlock.gateway.serve_ext_proc` (h2 on trio sockets,
one task per connection, no thread: interlock/gateway/_grpc.py), and ``h2+trio-repr`` the same
with h2's own ``H2Connection._receive_frame`` put back (it formats every received frame for
its trace log even when nothing logs: this shows what the server's override saves). Two
clients, on CPU 1:

- **lockstep**: grpcio's client as benchmarks/bench_epp.py drives a pick (request headers, the
  body in 64 KiB chunks, the answers, then the response headers and the half-close), with a
  short body and a ``--body``-byte one;
- **envoy** (unless ``--skip-envoy``): HTTP requests through a real Envoy configured with
  docs/gateway/envoy.yaml in front of each server, going to one ``interlock worker``.

Each round runs every cell on every server in turn (the order alternates between rounds),
``--streams`` streams each after 20 warm-up ones, and reads the server's CPU (user + system)
from /proc. Then the latency (unless ``--skip-envoy``): a short request through each server's
Envoy and through an Envoy routing to the worker without ext_proc ("fixed endpoint"), the
paths taking turns request by request, ``--requests`` each per round. Prints each round's
figures as JSON lines, then each transport's median CPU ms per stream per cell and its ratio
to grpc.aio's, and what each transport adds to the fixed endpoint's p50 per round (the
median of the rounds, and its ratio to grpc.aio's).

    python benchmarks/ab_ext_proc_transport.py [--rounds 3] [--streams 400] [--requests 300]
        [--skip-envoy | --skip-cpu]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_epp  # noqa: E402  (benchmarks/ is not a package)

SERVER_CPU, CLIENT_CPU = 0, 1
TRANSPORTS = ("grpc.aio", "h2+trio", "h2+trio-repr")


# -- the server (run as ``python ab_ext_proc_transport.py serve``) ---------------------------------


def serve(transport: str, destination: str) -> None:
    """Serve a `NoOpPicker` with ``transport`` on 127.0.0.1, a free port (printed), until
    killed."""
    import trio
    from envoy.service.ext_proc.v3.external_processor_pb2 import (
        CommonResponse,
        HeadersResponse,
        ProcessingResponse,
        TrailersResponse,
    )

    from interlock.gateway import serve_ext_proc
    from interlock.gateway._picker import (
        DESTINATION_HEADER,
        _set_destination,
        _set_header,
        _streamed,
    )

    answer = ProcessingResponse(
        request_headers=HeadersResponse(response=CommonResponse(clear_route_cache=True))
    )
    _set_header(answer.request_headers.response.header_mutation, DESTINATION_HEADER, destination)
    _set_destination(answer, destination)

    class NoOpStream:
        """A stream of a picker that does no picking: every message is answered at once."""

        def __init__(self) -> None:
            self.parts: list[bytes] = []
            self.finished = False
            self.response_ended = False

        def answer_now(self, message: Any) -> list[Any]:
            phase = message.WhichOneof("request")
            if phase == "request_body":
                self.parts.append(message.request_body.body)
                if not message.request_body.end_of_stream:
                    return []
                body = b"".join(self.parts)
                chunks = [body[i : i + 62_000] for i in range(0, len(body), 62_000)] or [b""]
                return [answer] + [
                    _streamed("request_body", c, i == len(chunks) - 1) for i, c in enumerate(chunks)
                ]
            if phase == "response_headers":
                self.response_ended = True
                return [ProcessingResponse(response_headers=HeadersResponse())]
            if phase == "response_trailers":
                self.response_ended = True
                return [ProcessingResponse(response_trailers=TrailersResponse())]
            return []

        async def handle(self, message: Any) -> list[Any]:
            return self.answer_now(message)

        def close(self) -> None:
            self.finished = True

    class NoOpPicker:
        ready = True

        def open_stream(self) -> NoOpStream:
            return NoOpStream()

        async def process(self, requests: Any, stream: Any = None) -> Any:
            raise AssertionError("every message is answered at once")
            yield

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            address, _ = await nursery.start(serve_ext_proc, NoOpPicker(), "127.0.0.1", 0)
            print(json.dumps({"port": int(address.rpartition(":")[2])}), flush=True)

    async def grpc_main() -> None:
        import grpc
        import grpc.aio
        from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

        from interlock.gateway import EXT_PROC_SERVICE

        async def process(requests: Any, context: Any) -> None:
            stream = NoOpStream()
            async for message in requests:
                for response in stream.answer_now(message):
                    await context.write(response)

        handler = grpc.method_handlers_generic_handler(
            EXT_PROC_SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    process,
                    request_deserializer=ProcessingRequest.FromString,
                    response_serializer=ProcessingResponse.SerializeToString,
                )
            },
        )
        server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port}), flush=True)
        await server.wait_for_termination()

    if transport == "h2+trio-repr":
        # h2's own method back: it formats every frame it receives for its trace log whether
        # or not anything logs (``logger.trace("...", repr(frame))``, eager).
        import h2.connection

        from interlock.gateway import _grpc

        _grpc._H2Connection._receive_frame = h2.connection.H2Connection._receive_frame  # type: ignore[method-assign]
    # As `interlock route` does (`tune_gc`): a serving process's collector, not the default.
    from interlock.http._cli import tune_gc

    tune_gc()
    if transport == "grpc.aio":
        import asyncio

        asyncio.run(grpc_main())
    else:
        trio.run(main)


# -- the measurement -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--body", type=int, default=100_000)
    parser.add_argument("--skip-envoy", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true", help="latency through Envoy only")
    parser.add_argument(
        "--requests", type=int, default=300, help="per path per round, for the latency"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    import httpx

    with tempfile.TemporaryDirectory(prefix="ab-ext-proc-") as work:
        processes = bench_epp.Processes(Path(work))
        try:
            _, line = processes.start(
                [sys.executable, "-m", "interlock", "worker", "--id", "1", "--openai-port", "0",
                 "--zero-time", "--served-model-name", bench_epp.MODEL, "--log-level", "warning"],
                "worker",
            )  # fmt: skip
            worker = json.loads(line)
            destination = f"127.0.0.1:{worker['openai_port']}"
            servers: dict[str, tuple[int, int]] = {}
            for name in TRANSPORTS:
                log = (Path(work) / f"{name}.log").open("wb")
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "serve", name, destination],
                    stdout=subprocess.PIPE, stderr=log,
                    preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),
                )  # fmt: skip
                processes.running.append(process)
                assert process.stdout is not None
                port = json.loads(process.stdout.readline())["port"]
                servers[name] = (port, process.pid)
            clients = {name: bench_epp.ExtProcClient(port) for name, (port, _) in servers.items()}
            short = bench_epp.bodies(1, 100)[0]
            long = bench_epp.bodies(1, args.body)[0]
            cells: dict[str, Any] = {
                "lockstep, short body": lambda name, n: clients[name].pick(short, f"s{n}"),
                f"lockstep, {len(long)} B body": lambda name, n: clients[name].pick(long, f"l{n}"),
            }
            if not args.skip_envoy:
                envoys = {}
                for name, (port, _) in servers.items():
                    config = bench_epp.envoy_config(ext_proc_port=port, pool=[destination])
                    url = bench_epp.start_envoy(processes, config, f"envoy-{name}")
                    envoys[name] = httpx.Client(base_url=url, timeout=bench_epp.TIMEOUT)
                hello = json.dumps(
                    {"model": bench_epp.MODEL, "max_tokens": 1,
                     "messages": [{"role": "user", "content": "hello"}]}
                ).encode()  # fmt: skip

                def through_envoy(name: str, n: int) -> None:
                    answer = envoys[name].post(
                        "/v1/chat/completions",
                        content=hello,
                        headers={"content-type": "application/json"},
                    )
                    if answer.status_code != 200:
                        raise RuntimeError(f"{name}: {answer.status_code} {answer.text}")

                cells["envoy, short request"] = through_envoy
            if args.skip_cpu:
                cells = {}
            results: dict[str, dict[str, list[float]]] = {
                cell: {name: [] for name in servers} for cell in cells
            }
            names = list(servers)
            for round_ in range(args.rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for cell, run in cells.items():
                    for name in order:
                        pid = servers[name][1]
                        for n in range(20):
                            run(name, n)
                        before = bench_epp.cpu_seconds(pid)
                        for n in range(args.streams):
                            run(name, n)
                        ms = (bench_epp.cpu_seconds(pid) - before) / args.streams * 1000
                        results[cell][name].append(ms)
                        row = {"round": round_, "cell": cell, "transport": name}
                        print(json.dumps(row | {"cpu_ms_per_stream": round(ms, 3)}), flush=True)
            if cells:
                print(f"\n{'server CPU ms per stream (median)':<36}"
                      + "".join(f"{n:>16}" for n in names) + "   ratio to " + names[0])  # fmt: skip
            for cell, by_name in results.items():
                medians = [statistics.median(by_name[n]) for n in names]
                ratios = ", ".join(
                    f"{n} {bench_epp._ratio(m, medians[0])}"
                    for n, m in zip(names[1:], medians[1:], strict=True)
                )
                print(f"{cell:<36}" + "".join(f"{m:>16.3f}" for m in medians) + f"   {ratios}")
            if not args.skip_envoy:
                fixed = bench_epp.start_envoy(
                    processes,
                    bench_epp.envoy_config(ext_proc_port=None, pool=[destination]),
                    "envoy-fixed",
                )
                envoys["fixed endpoint"] = httpx.Client(base_url=fixed, timeout=bench_epp.TIMEOUT)
                latency(through_envoy, ["fixed endpoint", *names], args.rounds, args.requests)
        finally:
            processes.stop()


def latency(request: Any, paths: list[str], rounds: int, requests: int) -> None:
    """Each path's p50 and p99 of a short request through Envoy, per round, and what each
    transport adds to Envoy's fixed-endpoint p50: the paths take turns request by request (the
    order rotating), so that every path sees the same machine (a shared box's load changes from
    second to second)."""
    import time

    added: dict[str, list[float]] = {path: [] for path in paths[1:]}
    p99s: dict[str, list[float]] = {path: [] for path in paths}
    for round_ in range(rounds):
        times: dict[str, list[float]] = {path: [] for path in paths}
        for n in range(requests + 20):
            shift = n % len(paths)
            for path in paths[shift:] + paths[:shift]:
                start = time.perf_counter()
                request(path, n)
                if n >= 20:
                    times[path].append(time.perf_counter() - start)
        rows = {path: bench_epp.summary(times[path]) for path in paths}
        for path, row in rows.items():
            p99s[path].append(row["p99_ms"])
            if path != paths[0]:
                added[path].append(row["p50_ms"] - rows[paths[0]]["p50_ms"])
            figures = {"p50_ms": round(row["p50_ms"], 3), "p99_ms": round(row["p99_ms"], 3)}
            print(json.dumps({"round": round_, "latency": path} | figures), flush=True)
    print(f"\n{'through Envoy, short request':<28}{'added p50 ms (per round)':>36}"
          f"{'median':>9}{'p99 ms (median)':>17}   ratio to {paths[1]}")  # fmt: skip
    print(f"{paths[0]:<28}{'':>36}{'':>9}{statistics.median(p99s[paths[0]]):>17.3f}")
    baseline = statistics.median(added[paths[1]])
    for path, values in added.items():
        median = statistics.median(values)
        ratio = f"{median / baseline:.2f}x" if baseline > 0 else "n/a"
        print(f"{path:<28}{', '.join(f'{v:.3f}' for v in values):>36}{median:>9.3f}"
              f"{statistics.median(p99s[path]):>17.3f}   {ratio}")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
