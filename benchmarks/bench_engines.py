"""What ``interlock serve`` adds in front of a real engine: TTFT and request latency through it,
against the same requests sent straight to the engines, measured in the same run.

The engines are OpenAI-compatible servers: running vLLMs given with ``--engine-url`` (repeat
it; ``--model-dir`` names their tokenizer), or by default ``interlock worker --openai-port 0``
mock engines that this script starts (the mock model behind vLLM's HTTP surface, at the
reference timing model's speed, ``--speedup 1``, so that an engine step costs what it costs on
a GPU; ``--zero-time`` for none). In front of them it starts ``interlock serve --engine
ID=URL ...``. One load generator (keep-alive HTTP/1.1 connections, concurrency C) sends the
same workload both ways in interleaved rounds, alternating which path goes first: streamed chat
(or completions) requests, prompts of 200-1000 tokens that start with one of a few shared
prefixes (a system message), max_tokens 16, greedy, ignore_eos. Every prefix is cached on every
engine before measuring, and each request's own suffix starts with a tag naming its path, so
neither path finds the other's suffixes in an engine's prefix cache.

TTFT is the time to the first streamed chunk with text in it, as vLLM's own benchmark
measures it (a chat stream's first, role-only chunk does not count). It prints TTFT and
latency percentiles for both paths, their ratios (interlock / direct), the ratio of TTFT p50 in
each round (how much the machine's noise moves it), and the CPU milliseconds the interlock
process tree spent per request (utime + stime from /proc, while its requests ran). The machine
is shared and noisy: read the ratios, not the absolute times. Every process it starts runs in
its own process group, and the whole group is stopped at the end, on error and on Ctrl-C.

Where the frontend's CPU goes per token and per request: ``--max-tokens 4,64`` runs every
path at each length in every round and fits the CPU per request (net of the idle polling) to
``a + b * tokens``: ``b`` is what each streamed token costs (one SSE chunk in from the engine,
one out to the client, as a real engine sends them), ``a`` what a request costs whatever its
length. ``--wire`` measures, beside it, an ``interlock serve`` over the same mock engines
through interlock's own wire protocol (``--remote-worker``; mock engines only), for the same
fit on that path.

Old against new: ``--src NAME=DIR`` (repeat it) starts one ``interlock serve`` per checkout
(``PYTHONPATH=DIR``), all in front of the same engines and measured in the same rounds, the
order alternating; it prints each one's CPU per request and the median over rounds of the
last one's over the first one's. (Without ``--kv-events-bind``: vLLM publishes its KV events
to one socket.)

    python benchmarks/bench_engines.py [--engines E] [--speedup S | --zero-time]
        [--requests N] [--concurrency C] [--rounds R] [--api chat|completions]
        [--max-tokens T[,T...]] [--router-mode MODE] [--model-dir DIR] [--wire]
        [--src NAME=DIR ...]
    python benchmarks/bench_engines.py --engine-url http://127.0.0.1:8100 [--engine-url ...]
        --model-dir DIR [--served-model-name NAME] [--kv-events-bind ENDPOINT]
        [--src NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import trio

CLK_TCK = os.sysconf("SC_CLK_TCK")
KV_BLOCK_SIZE = 32  # vLLM's CPU backend forces a multiple of 32 (reference/vllm-cpu.md)
GOAL_TTFT_RATIO = 1.05
#: The name of the frontend over the mock engines' wire protocol (`--wire`).
WIRE = "interlock-wire"
# Words for the prompts: common, mostly one token each in a BPE vocabulary.
_WORD_TEXT = (
    "the river mountain quiet stone light window garden morning evening story paper table "
    "water forest market winter summer bridge train station letter music silver yellow "
    "orange purple simple gentle careful sudden ancient modern distant narrow bright dark "
    "walk read write think build carry follow answer listen remember travel gather return "
    "house city field ocean island valley cloud storm wind rain snow fire road path door "
    "friend teacher doctor farmer sailor painter writer child mother father brother sister "
    "apple bread cheese honey salt sugar coffee tea milk butter lamp chair clock mirror"
)
WORDS = tuple(_WORD_TEXT.split())


# -- processes ------------------------------------------------------------------------------------


@attrs.define
class Processes:
    """Every process this script started, each the leader of its own process group, with the
    file its output goes to. `stop_all` ends every group."""

    directory: Path
    started: list[subprocess.Popen[bytes]] = attrs.field(factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdin: int | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``command`` in a new session (so its children are in its group), with ``env``
        added to this process's environment and ``stdin`` as `subprocess.Popen` takes it,
        output to ``<directory>/<name>.log``; return the process and that file. Does not
        wait."""
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(command),
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        self.started.append(process)
        return process, log

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every group, wait up to ``grace`` seconds for the leaders, then SIGKILL
        what is left of every group. Blocks until the leaders are reaped."""
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The leader may be gone while a child it started is not: end the group either way.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def wait_for_line(
    process: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 120.0
) -> str:
    """Wait until ``log`` has a line containing ``marker``; return that line.

    Raises:
        RuntimeError: the process exited first, or ``timeout`` seconds passed (the message
            carries the end of its output).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if marker in line:
                return line
        if process.poll() is not None:
            break
        time.sleep(0.01)  # a start-up is a second or less: a coarser poll adds to each
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    state = f"exited with {process.returncode}" if process.poll() is not None else "timed out"
    raise RuntimeError(f"{process.args} {state} before printing {marker!r}:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mock_engines(
    processes: Processes, count: int, *, speedup: float | None = None,
    kv_endpoint: str | None = None, tokenizer: str | None = None,
    served_model_name: str | None = None,
) -> list[tuple[str, int]]:  # fmt: skip
    """Start ``count`` ``interlock worker --openai-port 0`` processes (the mock behind vLLM's
    HTTP surface), zero-time (or at ``speedup`` times the reference timing model's speed: one
    SSE chunk a token, as a real engine sends them), with ``tokenizer`` (``builtin`` or a
    model directory; None: none, any id below 32000 goes); return each one's URL and wire
    protocol port (`--wire`) once it has printed its JSON line."""
    timing = ["--zero-time"] if speedup is None else ["--speedup", str(speedup)]
    started = []
    for worker_id in range(1, count + 1):
        command = [
            sys.executable, "-m", "interlock", "worker", "--id", str(worker_id),
            "--port", "0", "--openai-port", "0", "--block-size", str(KV_BLOCK_SIZE),
            "--served-model-name", served_model_name or "mock",
            "--log-level", "warning", *timing,
        ]  # fmt: skip
        if tokenizer is not None:
            command += ["--tokenizer", tokenizer]
        if kv_endpoint is not None:
            command += ["--kv-events-endpoint", kv_endpoint]
        started.append(processes.start(f"engine{worker_id}", command))
    announced = [json.loads(wait_for_line(p, log, '"openai_url"')) for p, log in started]
    return [(str(a["openai_url"]), int(a["port"])) for a in announced]


@attrs.frozen
class Frontend:
    """One ``interlock serve`` measured: its name in the tables, URL and process id."""

    name: str
    url: str
    pid: int


def start_interlock(
    processes: Processes, args: argparse.Namespace, engine_urls: Sequence[str], model: str,
    kv_bind: str | None, *, name: str = "interlock", src: str | None = None,
    wire_ports: Sequence[int] = (),
) -> Frontend:  # fmt: skip
    """Start ``interlock serve`` over ``engine_urls`` (ids 1..E; with ``wire_ports``, over
    those engines' wire protocol ports instead), from checkout ``src`` (None: this one);
    return it once it listens (it has checked every engine's /health, /v1/models and
    /tokenize by then)."""
    command = [
        sys.executable, "-m", "interlock", "serve", "--port", "0", "--model-name", model,
        "--kv-block-size", str(KV_BLOCK_SIZE), "--router-mode", args.router_mode,
    ]  # fmt: skip
    if args.model_dir:
        command += ["--tokenizer", args.model_dir]
    if wire_ports:
        for worker_id, port in enumerate(wire_ports, start=1):
            command += ["--remote-worker", f"{worker_id}=127.0.0.1:{port}"]
    else:
        for worker_id, url in enumerate(engine_urls, start=1):
            command += ["--engine", f"{worker_id}={url}"]
        if kv_bind is not None:
            command += ["--kv-events-bind", kv_bind]
    env = {"PYTHONPATH": str(Path(src).resolve())} if src is not None else None
    process, log = processes.start(name.replace(":", "-"), command, env)
    line = wait_for_line(process, log, "listening on ")
    return Frontend(name, line.split("listening on ")[1].split()[0], process.pid)


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and every descendant still alive, plus what the reaped ones
    left in their parents' cutime + cstime (so nothing is counted twice)."""
    parents: dict[int, int] = {}
    spent: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        pid = int(entry)
        parents[pid] = int(fields[1])
        spent[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(spent.get(pid, 0.0) for pid in tree)


def engine_health(url: str) -> int | str:
    """``GET url/health``'s status code, or the error's text."""
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def served_model(url: str) -> str:
    """The first model id an engine lists in ``GET /v1/models``."""
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


# -- the workload -------------------------------------------------------------------------------


@attrs.frozen
class Spec:
    """One request of the workload: which shared prefix, and its own suffix's text."""

    prefix: int
    suffix: str


def load_tokenizer(model_dir: str | None) -> Any:
    from interlock.processing import ByteTokenizer, load_tokenizer

    return load_tokenizer(model_dir) if model_dir else ByteTokenizer()


def text_of_tokens(tokenizer: Any, rng: random.Random, tokens: int) -> str:
    """Random words cut to about ``tokens`` tokens of ``tokenizer``."""
    words = " ".join(rng.choice(WORDS) for _ in range(tokens + 8))
    ids = tokenizer.encode(words)[:tokens]
    return str(tokenizer.decode(ids)).strip().replace("\ufffd", "")


@attrs.frozen
class Workload:
    """The shared prefixes and, per round, the requests both paths send (the same ones, tagged
    with the path's name so that their suffixes never hit each other's cache)."""

    prefixes: tuple[str, ...]
    rounds: tuple[tuple[Spec, ...], ...]

    @classmethod
    def build(
        cls, tokenizer: Any, *, requests: int, rounds: int, prefixes: int, seed: int
    ) -> Workload:
        """Prefixes of 100-500 tokens, suffixes of 100-500: prompts of 200-1000 tokens."""
        rng = random.Random(seed)
        texts = tuple(
            f"You are assistant {n}. " + text_of_tokens(tokenizer, rng, rng.randint(100, 500))
            for n in range(prefixes)
        )
        per_round = [
            requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)
        ]
        specs = tuple(
            tuple(
                Spec(rng.randrange(prefixes), text_of_tokens(tokenizer, rng, rng.randint(100, 500)))
                for _ in range(count)
            )
            for count in per_round
        )
        return cls(texts, specs)

    def body(
        self, args: argparse.Namespace, model: str, spec: Spec, tag: str, max_tokens: int
    ) -> bytes:
        """The request's JSON body: streamed, greedy, ignore_eos, ``max_tokens``."""
        common: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": not args.non_stream,
        }
        prefix, suffix = self.prefixes[spec.prefix], f"{tag}: {spec.suffix}"
        if args.api == "chat":
            common["messages"] = [
                {"role": "system", "content": prefix},
                {"role": "user", "content": suffix},
            ]
        else:
            common["prompt"] = f"{prefix}\n\n{suffix}"
        return json.dumps(common).encode()


# -- the load generator ---------------------------------------------------------------------------


@attrs.frozen
class Sample:
    """One request as the client saw it: seconds to the first text and to the end (None when
    it failed), and why it failed."""

    ttft: float | None
    latency: float | None
    error: str | None = None


class StreamFailed(Exception):
    """A request did not end as a 200 with ``data: [DONE]`` (or, not streamed, choices)."""


def first_text(event: bytes) -> bool:
    """Whether one SSE event carries generated text (a chat delta's content, a completion's
    text); a role-only or usage-only chunk does not."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            continue
        for choice in chunk.get("choices") or ():
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


class Connection:
    """One keep-alive HTTP/1.1 connection (h11) to one server, one request at a time."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        return cls(stream, f"{host}:{port}")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _next_event(self) -> Any:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._h11.receive_data(await self._stream.receive_some(65536))

    async def stream(self, path: str, body: bytes) -> Sample:
        """POST ``body`` to ``path`` and read the SSE stream to its end.

        Raises:
            StreamFailed: not a 200, or no ``data: [DONE]`` at the end (a whole answer: no
                choices).
            OSError, h11.ProtocolError: the connection broke (open a new one).
        """
        start = time.perf_counter()
        headers = [
            ("host", self._host),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        await self._stream.send_all(
            self._h11.send(h11.Request(method="POST", target=path, headers=headers))
            + self._h11.send(h11.Data(data=body))
            + self._h11.send(h11.EndOfMessage())
        )
        response = await self._next_event()
        if not isinstance(response, h11.Response):
            raise StreamFailed(f"no response: {response!r}")
        received = bytearray()
        scanned = 0  # received[:scanned] holds whole events without text
        ttft = None
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                received += event.data
                while ttft is None and (end := received.find(b"\n\n", scanned)) >= 0:
                    if first_text(bytes(received[scanned:end])):
                        ttft = time.perf_counter() - start
                    scanned = end + 2
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise StreamFailed(f"the stream ended with {event!r}")
        latency = time.perf_counter() - start
        self._h11.start_next_cycle()
        if response.status_code != 200:
            raise StreamFailed(f"status {response.status_code}: {bytes(received[:300])!r}")
        if not received.startswith(b"data: ") and received.startswith(b"{"):
            # A whole (non-stream) answer: its first token is its last.
            if b'"choices"' not in received:
                raise StreamFailed(f"an answer without choices: {bytes(received[:300])!r}")
            return Sample(latency, latency)
        if not received.rstrip().endswith(b"data: [DONE]"):
            raise StreamFailed(f"no data: [DONE] at the end: {bytes(received[-300:])!r}")
        return Sample(ttft, latency)


class LoadGenerator:
    """``concurrency`` clients, each keeping one connection per server across batches."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._connections: dict[tuple[int, str], Connection] = {}

    async def run(self, jobs: Sequence[tuple[str, str, bytes]]) -> list[Sample]:
        """Send every ``(url, path, body)``, ``concurrency`` at a time; return their samples
        in order. Waits for all of them; a failed request is a sample with ``error``."""
        samples: list[Sample | None] = [None] * len(jobs)
        pending = iter(enumerate(jobs))

        async def client(slot: int) -> None:
            for index, (url, path, body) in pending:
                key = (slot, url)
                try:
                    reused = key in self._connections
                    if not reused:
                        self._connections[key] = await Connection.open(url)
                    try:
                        samples[index] = await self._connections[key].stream(path, body)
                    except (OSError, h11.ProtocolError):
                        if not reused:
                            raise
                        # The server closed the idle keep-alive connection as the request
                        # went out (uvicorn's 5 s timeout): what any client does, once.
                        await self._connections.pop(key).aclose()
                        self._connections[key] = await Connection.open(url)
                        samples[index] = await self._connections[key].stream(path, body)
                except (OSError, h11.ProtocolError, StreamFailed) as exc:
                    samples[index] = Sample(None, None, f"{type(exc).__name__}: {exc}")
                    broken = self._connections.pop(key, None)
                    if broken is not None:
                        await broken.aclose()

        async with trio.open_nursery() as nursery:
            for slot in range(self.concurrency):
                nursery.start_soon(client, slot)
        return [s if s is not None else Sample(None, None, "not sent") for s in samples]

    async def aclose(self) -> None:
        for connection in self._connections.values():
            await connection.aclose()
        self._connections.clear()


# -- the measurement ------------------------------------------------------------------------------


@attrs.define
class PathResult:
    """Everything measured on one path (at one ``max_tokens``), over all rounds."""

    samples: list[Sample] = attrs.field(factory=list)
    seconds: float = 0.0
    #: CPU seconds each interlock process tree (by name) spent while this path's requests
    #: ran: its own requests' cost on its own path, its idle cost (polling the engines'
    #: /health and /metrics) on the others.
    cpu: dict[str, float] = attrs.field(factory=dict)
    #: Per round: CPU seconds of this path's own interlock and requests sent.
    per_round_cpu: list[tuple[float, int]] = attrs.field(factory=list)
    per_round_ttft_p50: list[float] = attrs.field(factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    def percentile(self, field: str, q: float) -> float:
        values = sorted(getattr(s, field) for s in self.ok if getattr(s, field) is not None)
        if not values:
            return float("nan")
        if len(values) == 1:
            return float(values[0])
        return float(statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1])


#: Results by (path name, max_tokens); the direct path is named "direct".
Results = dict[tuple[str, int], PathResult]


def p50_ttft(samples: Sequence[Sample]) -> float:
    values = [s.ttft for s in samples if s.error is None and s.ttft is not None]
    return statistics.median(values) if values else float("nan")


async def measure(
    args: argparse.Namespace, workload: Workload, engine_urls: Sequence[str], model: str,
    frontends: Sequence[Frontend],
) -> Results:  # fmt: skip
    """Warm up, then run the rounds: in each, every path at every length, the order of the
    paths alternating; return what each measured."""
    path = "/v1/chat/completions" if args.api == "chat" else "/v1/completions"
    generator = LoadGenerator(args.concurrency)
    lengths: list[int] = args.max_tokens
    # Warm up: every prefix into every engine's cache, then every path and connection.
    warm = [
        (url, path, workload.body(args, model, Spec(p, f"warm-up {p}"), "warm", lengths[0]))
        for url in engine_urls
        for p in range(len(workload.prefixes))
    ]
    for frontend in frontends:
        warm += [
            (frontend.url, path, workload.body(args, model, Spec(p % len(workload.prefixes),
             f"warm-up {p}"), f"warm-{frontend.name}", lengths[0]))
            for p in range(2 * args.concurrency)
        ]  # fmt: skip
    failed = [s.error for s in await generator.run(warm) if s.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(warm)} warm-up requests failed: {failed[0]}")
    names = ["direct", *(f.name for f in frontends)]
    urls = {f.name: f.url for f in frontends}
    results: Results = {(name, t): PathResult() for name in names for t in lengths}
    for number, specs in enumerate(workload.rounds):
        order = names if number % 2 == 0 else names[::-1]
        for max_tokens in lengths:
            for name in order:
                jobs = [
                    (engine_urls[i % len(engine_urls)] if name == "direct" else urls[name],
                     path, workload.body(args, model, spec, f"{name} {number}-{i}", max_tokens))
                    for i, spec in enumerate(specs)
                ]  # fmt: skip
                result = results[name, max_tokens]
                cpu_before = {f.name: tree_cpu_seconds(f.pid) for f in frontends}
                start = time.perf_counter()
                samples = await generator.run(jobs)
                result.seconds += time.perf_counter() - start
                for f in frontends:
                    spent = tree_cpu_seconds(f.pid) - cpu_before[f.name]
                    result.cpu[f.name] = result.cpu.get(f.name, 0.0) + spent
                    if f.name == name:
                        result.per_round_cpu.append((spent, len(samples)))
                result.samples += samples
                result.per_round_ttft_p50.append(p50_ttft(samples))
    await generator.aclose()
    return results


def net_cpu_ms(results: Results, name: str, max_tokens: int) -> tuple[float, float, float]:
    """Frontend ``name``'s CPU ms per request at ``max_tokens``: gross, net of its idle cost
    (its CPU per second while the other paths ran, at any length), and that idle cost (ms per
    second)."""
    own = results[name, max_tokens]
    idle_cpu = sum(r.cpu.get(name, 0.0) for (n, _), r in results.items() if n != name)
    idle_seconds = sum(r.seconds for (n, _), r in results.items() if n != name)
    idle_rate = idle_cpu / max(idle_seconds, 1e-9)
    requests = max(len(own.samples), 1)
    gross = own.cpu.get(name, 0.0) / requests * 1000.0
    net = (own.cpu.get(name, 0.0) - idle_rate * own.seconds) / requests * 1000.0
    return gross, net, idle_rate * 1000.0


def report(
    results: Results, frontends: Sequence[Frontend], max_tokens: int, *, label: bool
) -> None:
    """The table of one length: the direct path and every frontend, their ratios to it, and
    each frontend's CPU per request."""
    ms = 1000.0
    if label:
        print(f"\nmax_tokens {max_tokens}")
    header = (
        f"{'path':<26} {'TTFT p50':>9} {'TTFT p90':>9} {'lat p50':>9} {'lat p90':>9} "
        f"{'req/s':>7} {'errors':>7}"
    )
    print(header + "\n" + "-" * len(header))
    direct = results["direct", max_tokens]
    rows = [("direct to the engines", direct)]
    single = len(frontends) == 1 and frontends[0].name == "interlock"
    for f in frontends:
        title = "through interlock serve" if single else f"through {f.name}"
        rows.append((title, results[f.name, max_tokens]))
    for title, result in rows:
        errors = len(result.samples) - len(result.ok)
        print(
            f"{title:<26} {result.percentile('ttft', 50) * ms:>9.1f} "
            f"{result.percentile('ttft', 90) * ms:>9.1f} "
            f"{result.percentile('latency', 50) * ms:>9.1f} "
            f"{result.percentile('latency', 90) * ms:>9.1f} "
            f"{len(result.ok) / max(result.seconds, 1e-9):>7.1f} {errors:>7}"
        )
    for f in frontends:
        through = results[f.name, max_tokens]
        ratios = [
            through.percentile(field, q) / direct.percentile(field, q)
            for field, q in (("ttft", 50), ("ttft", 90), ("latency", 50), ("latency", 90))
        ]
        title = "ratio interlock / direct" if single else f"ratio {f.name} / direct"
        print(
            f"{title:<26} {ratios[0]:>9.3f} {ratios[1]:>9.3f} "
            f"{ratios[2]:>9.3f} {ratios[3]:>9.3f} "
            f"{(len(through.ok) / through.seconds) / (len(direct.ok) / direct.seconds):>7.3f}"
        )
    for f in frontends:
        through = results[f.name, max_tokens]
        who = "interlock" if single else f.name
        added = (through.percentile("ttft", 50) - direct.percentile("ttft", 50)) * ms
        added_latency = (through.percentile("latency", 50) - direct.percentile("latency", 50)) * ms
        print(f"{who} adds {added:+.1f} ms to TTFT p50 and {added_latency:+.1f} ms to latency p50")
        per_round = [
            f"{i / d:.3f}"
            for i, d in zip(through.per_round_ttft_p50, direct.per_round_ttft_p50, strict=True)
        ]
        print(f"{who}: TTFT p50 ratio per round: {', '.join(per_round)}")
        gross, net, idle = net_cpu_ms(results, f.name, max_tokens)
        print(
            f"{who} serve CPU per request: {gross:.2f} ms while its requests ran, {net:.2f} ms "
            f"net of its idle cost ({idle:.1f} ms per second polling the engines' "
            "/health and /metrics, measured while the other paths ran)"
        )
        if f.name == frontends[0].name:
            verdict = "met" if ratios[0] <= GOAL_TTFT_RATIO else "NOT met"
            print(
                f"goal: interlock adds at most 5% to TTFT p50 (ratio <= {GOAL_TTFT_RATIO}): "
                f"{verdict}"
            )
    paths = [("direct", direct)] + [(f.name, results[f.name, max_tokens]) for f in frontends]
    no_text = sum(1 for _, r in paths for s in r.ok if s.ttft is None)
    if no_text:
        print(f"{no_text} streams carried no text at all (no TTFT; latency counted)")
    for name, result in paths:
        errors = [s.error for s in result.samples if s.error is not None]
        if errors:
            print(f"{name}: {len(errors)} errors, the first: {errors[0]}")


def report_comparisons(results: Results, frontends: Sequence[Frontend], lengths: list[int]) -> None:
    """With several checkouts (``--src``), the last one's CPU per request over the first
    one's; with several lengths, each frontend's CPU per token and per request."""
    checkouts = [f for f in frontends if f.name != WIRE]
    if len(checkouts) > 1:
        first, last = checkouts[0].name, checkouts[-1].name
        print(f"\nCPU per request, {last} / {first} (gross; the per-round ratios' median):")
        for t in lengths:
            ratios = [
                (b_cpu / b_n) / (a_cpu / a_n)
                for (a_cpu, a_n), (b_cpu, b_n) in zip(
                    results[first, t].per_round_cpu, results[last, t].per_round_cpu, strict=True
                )
                if a_cpu > 0 and a_n and b_n
            ]
            net = [net_cpu_ms(results, f.name, t)[1] for f in checkouts]
            nets = ", ".join(f"{f.name} {n:.2f}" for f, n in zip(checkouts, net, strict=True))
            median = statistics.median(ratios) if ratios else float("nan")
            print(
                f"  max_tokens {t}: {median:.3f} (per round: "
                f"{', '.join(f'{r:.3f}' for r in ratios)}); net ms/req: {nets}"
            )
    if len(lengths) > 1:
        low, high = min(lengths), max(lengths)
        print(f"\nCPU per token and per request (net, fitted between max_tokens {low} and {high}):")
        for f in frontends:
            at_low = net_cpu_ms(results, f.name, low)[1]
            at_high = net_cpu_ms(results, f.name, high)[1]
            per_token = (at_high - at_low) / (high - low)
            per_request = at_low - per_token * low
            print(
                f"  {f.name}: {per_token * 1000:.0f} us per token, {per_request:.2f} ms per "
                f"request ({at_low:.2f} ms at {low} tokens, {at_high:.2f} ms at {high})"
            )


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    engines = parser.add_argument_group("engines")
    engines.add_argument(
        "--engine-url", action="append", default=[], metavar="URL",
        help="a running OpenAI-compatible server (a vLLM) to measure; repeat for each. "
        "Without any, mock engines are started",
    )  # fmt: skip
    engines.add_argument(
        "--model-dir", metavar="DIR",
        help="the engines' tokenizer (a Hugging Face model directory); required with "
        "--engine-url (interlock checks its tokens against each engine's /tokenize)",
    )  # fmt: skip
    engines.add_argument(
        "--served-model-name", metavar="NAME",
        help="the engines' model name (default: the first in an engine's /v1/models; mock)",
    )  # fmt: skip
    engines.add_argument(
        "--kv-events-bind", metavar="ENDPOINT",
        help="with --engine-url: interlock binds its KV-event SUB socket here (where the "
        "engines' --kv-events-config endpoint points). With mock engines and --router-mode kv "
        "a free port is bound and the engines publish to it",
    )  # fmt: skip
    engines.add_argument("--engines", type=int, default=2, help="mock engines to start (2)")
    engines.add_argument(
        "--speedup", type=float, default=1.0,
        help="mock engines' timing model this many times faster than a GPU (1)",
    )  # fmt: skip
    engines.add_argument("--zero-time", action="store_true", help="mock engine steps take no time")
    load = parser.add_argument_group("workload")
    load.add_argument("--requests", type=int, default=400, help="requests per path (400)")
    load.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    load.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    load.add_argument("--api", choices=("chat", "completions"), default="chat")
    load.add_argument(
        "--non-stream", action="store_true",
        help="whole answers (stream false; TTFT is then the latency): interlock reads the "
        "engine's stream all the same",
    )  # fmt: skip
    load.add_argument(
        "--max-tokens", default="16", type=_lengths, metavar="T[,T...]",
        help="tokens per answer; several (4,64): each path runs at each, and the CPU per "
        "request is fitted to a cost per token and one per request (16)",
    )  # fmt: skip
    load.add_argument("--prefixes", type=int, default=8, help="shared prompt prefixes (8)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--router-mode", default="round_robin",
        help="interlock's router_mode (round_robin, as the direct path spreads requests)",
    )  # fmt: skip
    ab = parser.add_argument_group("what runs in front")
    ab.add_argument(
        "--src", action="append", default=[], metavar="NAME=DIR",
        help="an interlock checkout to measure (repeat: old against new, in the same rounds); "
        "default: this one",
    )  # fmt: skip
    ab.add_argument(
        "--wire", action="store_true",
        help="also measure interlock serve over the mock engines' wire protocol "
        "(--remote-worker): what interlock's own workers cost per token and request",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sources = []
    for value in args.src:
        name, sep, directory = value.partition("=")
        if not sep or not name or not Path(directory, "interlock").is_dir():
            parser.error(f"--src {value!r}: NAME=DIR, DIR an interlock checkout")
        sources.append((name, directory))
    args.sources = sources
    if len({name for name, _ in sources}) != len(sources):
        parser.error("--src names must differ")
    if len(sources) > 1 and (args.kv_events_bind or args.router_mode in ("kv", "predicted_ttft")):
        parser.error("several --src: each would bind the engines' one KV-event socket")
    if args.wire and args.engine_url:
        parser.error("--wire needs mock engines (no --engine-url)")
    if args.engine_url and not args.model_dir:
        parser.error("--engine-url needs --model-dir (the engines' tokenizer)")
    if min(args.requests, args.concurrency, args.rounds, args.engines, args.prefixes) < 1:
        parser.error("--requests, --concurrency, --rounds, --engines, --prefixes must be >= 1")
    if args.requests < args.rounds:
        parser.error("--requests must be at least --rounds")
    return args


def _lengths(text: str) -> list[int]:
    lengths = sorted({int(part) for part in text.split(",")})
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"--max-tokens {text!r}: positive ints, comma-separated")
    return lengths


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.model_dir)
    workload = Workload.build(
        tokenizer, requests=args.requests, rounds=args.rounds, prefixes=args.prefixes,
        seed=args.seed,
    )  # fmt: skip
    lengths = [
        len(tokenizer.encode(workload.prefixes[s.prefix])) + len(tokenizer.encode(s.suffix))
        for s in workload.rounds[0]
    ]
    with tempfile.TemporaryDirectory(prefix="bench_engines-") as scratch:
        processes = Processes(Path(scratch))
        try:
            run(args, workload, processes, lengths)
        finally:
            processes.stop_all()


def run(
    args: argparse.Namespace, workload: Workload, processes: Processes, lengths_of: list[int]
) -> None:
    """Start the engines (unless given) and interlock in ``processes``, measure, print."""
    kv_bind = args.kv_events_bind
    wire_ports: list[int] = []  # the mock engines' (`--wire` needs them)
    if args.engine_url:
        engine_urls = [url.rstrip("/") for url in args.engine_url]
        for url in engine_urls:
            status = engine_health(url)
            if status != 200:
                raise SystemExit(f"{url}/health answered {status}, not 200: is the engine up?")
        what = f"{len(engine_urls)} engine(s) at {', '.join(engine_urls)}"
    else:
        if kv_bind is None and args.router_mode in ("kv", "predicted_ttft"):
            kv_bind = f"tcp://127.0.0.1:{free_port()}"
        engines = start_mock_engines(
            processes, args.engines, speedup=None if args.zero_time else args.speedup,
            kv_endpoint=kv_bind, tokenizer=args.model_dir or "builtin",
            served_model_name=args.served_model_name,
        )  # fmt: skip
        engine_urls = [url for url, _ in engines]
        wire_ports = [port for _, port in engines]
        timing = "zero-time" if args.zero_time else f"timing x{args.speedup:g}"
        what = f"{len(engine_urls)} mock engines (interlock worker --openai-port, {timing})"
    model = args.served_model_name or served_model(engine_urls[0])
    frontends = [
        start_interlock(processes, args, engine_urls, model, kv_bind, name=name, src=src)
        for name, src in args.sources or [("interlock", None)]
    ]
    if args.wire:
        frontends.append(
            start_interlock(
                processes, args, engine_urls, model, None, name=WIRE,
                src=args.sources[-1][1] if args.sources else None, wire_ports=wire_ports,
            )
        )  # fmt: skip
    lengths = ",".join(str(t) for t in args.max_tokens)
    print(
        f"{what}; model {model!r}\n"
        f"{args.api}, {'non-stream' if args.non_stream else 'stream'}, "
        f"concurrency {args.concurrency}, {args.requests} requests per path "
        f"in {args.rounds} interleaved rounds; {len(workload.prefixes)} shared prefixes, "
        f"prompts of {min(lengths_of)}-{max(lengths_of)} tokens before the template; "
        f"max_tokens {lengths}, greedy, ignore_eos; "
        f"interlock router_mode {args.router_mode}"
        + (f", KV events at {kv_bind}" if kv_bind else "")
        + f"; frontends: {', '.join(f.name for f in frontends)}",
        flush=True,
    )
    results = trio.run(measure, args, workload, engine_urls, model, frontends)
    for t in args.max_tokens:
        report(results, frontends, t, label=len(args.max_tokens) > 1)
    report_comparisons(results, frontends, args.max_tokens)


if __name__ == "__main__":
    main()
