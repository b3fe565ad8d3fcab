"""What the frontend process costs per request, ``interlock serve`` beside NVIDIA Dynamo's frontend
on the same work, in the same run.

Starts ``interlock serve`` over 2 ``interlock worker --zero-time`` processes (so the workers'
cost is as small as it gets and the frontend is what is measured), with the real Qwen3
tokenizer and chat template (``--tokenizer``, by default ``../shared/data/tokenizers/qwen3``
next to the checkout). When Dynamo is installed (``bash ../shared/peers/install_peers.sh
dynamo``, venv ``/tmp/peers/dynamo``), it also starts ``python -m dynamo.frontend`` and
``python -m dynamo.mocker --num-workers 2 --speedup-ratio 1000`` over a model directory made
from the same tokenizer files (a temporary folder, removed at the end), without etcd or NATS
(file discovery, TCP request plane, ZMQ events), as ``../shared/peers/run_peer.sh dynamo``
does. Without Dynamo it says so and measures interlock alone.

The workload is ``../shared/peers/loadgen.py``'s (what ``compare_dynamo.sh`` and issue 15
measured): chat completions whose system message is one of 4 shared prompts ("System prompt
G: you are a helpful routing test assistant. " repeated, ~230 Qwen3 tokens) and whose user
message is ``question I R`` (R seeded-random), ~252 prompt tokens in all, max_tokens 16. One
aiohttp client in this process (keep-alive connections, about a tenth of a frontend's CPU per
request) drives each cell: concurrency C (``--concurrency``, default 16, 64, 256) times mode
(``--modes``: non-stream, stream), ``-n`` requests after a warm-up that opens the C
connections. The systems take turns cell by cell, in ``--rounds`` rounds, the first system
alternating from round to round, so that the machine's noise falls on both alike.

For each cell it prints the frontend's CPU milliseconds per request (user + system time of the
frontend process and any children, from psutil, before and after the cell: robust to a busy
box, unlike req/s), the workers' CPU ms/req, req/s, latency p50/p99 and errors, as medians
over rounds, and the interlock / Dynamo ratio of CPU ms/req (the median of the per-round
ratios). Then the "non-stream req/s on one core" figure: C=64 (``--one-core-concurrency``)
non-stream with each frontend
(every thread) pinned to one CPU and the workers and the client pinned to the other CPUs; it
prints how busy the frontend's core was, since the figure only measures the frontend when that
is near 100 %. Its client is wrk (``--wrk``, by default the one on PATH; ``wrk_bodies.lua``
beside this script sends the same bodies in turn, one thread, C keep-alive connections, and
checks every answer), which costs the other CPU a tenth of what the aiohttp client does; both
systems are measured with it alike. Without wrk the aiohttp client stands in, and it says so.
The machine is shared and noisy: read the CPU per request and the ratios, not the absolute
req/s. Every process it starts runs in its own process group, stopped at the end,
on error and on Ctrl-C.

``--interlock-workers openai`` puts ``interlock serve --engine ID=URL`` over the same zero-time
workers behind vLLM's HTTP surface (``interlock worker --openai-port 0``, KV events over ZMQ as
vLLM publishes them; the path a real vLLM takes); ``both`` runs that and the wire workers in
the same run, interleaved, and adds the ratio of their CPU per request.

    python benchmarks/bench_frontend.py [--rounds R] [-n N] [--concurrency 16,64,256]
        [--modes nonstream,stream] [--router-mode kv|round_robin] [--tokenizer DIR]
        [--dynamo-python PATH | --no-dynamo] [--one-core-requests N]
        [--one-core-concurrency C] [--raw FILE.jsonl]
        [--interlock-workers wire|openai|both] [--wrk PATH] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import httpx
import psutil

# Process handling shared with bench_engines.py (this script's folder is on sys.path).
from bench_engines import Processes, free_port, wait_for_line

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT.parent / "shared" / "data" / "tokenizers" / "qwen3"
DYNAMO_PYTHON = Path("/tmp/peers/dynamo/bin/python")
MODEL = "qwen3"
WORKERS = 2
KV_BLOCK_SIZE = 16
# loadgen.py's workload, with the system prompt repeated so that Qwen3 gives it the ~240
# tokens that the tokenizer gave it (loadgen's 8 repeats are ~70 Qwen3 tokens).
PREFIX_GROUPS = 4
PREFIX_REPEAT = 28
MAX_TOKENS = 16
ONE_CORE_CONCURRENCY = 64
#: How busy the frontend's core must be for the one-core figure to measure the frontend.
SATURATED = 0.95
# Dynamo's router spells its modes with a hyphen.
DYNAMO_ROUTER_MODES = {"kv": "kv", "round_robin": "round-robin"}
# dynamo.mocker needs a config.json beside the tokenizer; it reads the vocabulary size and the
# special ids from it (the weights are never loaded). The shape is Qwen3's, shrunk.
QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": True,
}


# -- the systems -----------------------------------------------------------------------------------


@attrs.define
class System:
    """One frontend and its workers, running: ``frontend`` is the process whose CPU is measured
    (with its children), ``workers`` the processes that simulate the engines."""

    name: str
    url: str
    frontend: psutil.Process
    workers: list[psutil.Process]


def serve_tokenizer_flags(tokenizer: str) -> list[str]:
    """``interlock serve``'s flags for ``tokenizer``: none for 'builtin' (serve's default, which
    its --tokenizer does not name; the workers' does), else ``--tokenizer`` and the folder."""
    return [] if tokenizer == "builtin" else ["--tokenizer", tokenizer]


def start_interlock(processes: Processes, tokenizer: str, router_mode: str | None) -> System:
    """Start ``WORKERS`` ``interlock worker --zero-time`` processes and ``interlock serve`` over
    them (``router_mode`` None: its defaults, else that mode and Dynamo's migration limit);
    return once ``/health`` lists every worker.

    Raises:
        RuntimeError: a process exited or did not get ready in time (with its output).
    """
    started = []
    for worker_id in range(1, WORKERS + 1):
        command = [
            sys.executable, "-m", "interlock", "worker", "--id", str(worker_id), "--port", "0",
            "--tokenizer", tokenizer, "--block-size", str(KV_BLOCK_SIZE), "--zero-time",
            "--log-level", "warning",
        ]  # fmt: skip
        started.append(processes.start(f"interlock-worker{worker_id}", command))
    ports = [int(json.loads(wait_for_line(p, log, '"port"'))["port"]) for p, log in started]
    command = [
        sys.executable, "-m", "interlock", "serve", "--port", "0", "--model-name", MODEL,
        *serve_tokenizer_flags(tokenizer), "--kv-block-size", str(KV_BLOCK_SIZE),
    ]  # fmt: skip
    if router_mode is not None:
        command += ["--router-mode", router_mode, "--migration-limit", "3"]
    for worker_id, port in enumerate(ports, start=1):
        command += ["--remote-worker", f"{worker_id}=127.0.0.1:{port}"]
    process, log = processes.start("interlock-serve", command)
    url = wait_for_line(process, log, "listening on ").split("listening on ")[1].split()[0]
    wait_until(
        lambda: len(httpx.get(f"{url}/health", timeout=5).json().get("workers", ())) == WORKERS,
        f"interlock serve at {url} to list {WORKERS} workers in /health",
        log,
    )
    return System(
        "interlock", url, psutil.Process(process.pid), [psutil.Process(p.pid) for p, _ in started]
    )


def make_dynamo_model_dir(tokenizer: Path, directory: Path) -> Path:
    """A model folder for ``dynamo.mocker`` in ``directory``: the tokenizer files (gunzipped),
    a tiny Qwen3 ``config.json`` and a generation config. Returns its path."""
    out = directory / "qwen3-model"
    out.mkdir()
    packed = tokenizer / "tokenizer.json.gz"
    if packed.exists():
        with gzip.open(packed, "rb") as reader, (out / "tokenizer.json").open("wb") as writer:
            shutil.copyfileobj(reader, writer)
    else:
        shutil.copy(tokenizer / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(tokenizer / "tokenizer_config.json", out / "tokenizer_config.json")
    (out / "config.json").write_text(json.dumps(QWEN3_CONFIG, indent=2))
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def start_dynamo(
    processes: Processes, python: Path, model_dir: Path, directory: Path, router_mode: str
) -> System:
    """Start ``dynamo.frontend`` and ``dynamo.mocker --num-workers WORKERS`` (file discovery in
    ``directory``, no etcd/NATS); return once both workers answer.

    Raises:
        RuntimeError: a process exited or did not get ready in time (with its output).
    """
    home = directory / "home"  # dynamo caches model cards in $HOME/.cache/dynamo
    home.mkdir()
    env = {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(directory / "dynkv"),
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_EVENT_PLANE": "zmq",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DYN_LOG": "warn",
        "HOME": str(home),
    }
    port = free_port()
    frontend, log = processes.start(
        "dynamo-frontend",
        [str(python), "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
         str(port), "--router-mode", DYNAMO_ROUTER_MODES[router_mode], "--kv-cache-block-size",
         str(KV_BLOCK_SIZE), "--migration-limit", "3"],
        env=env,
    )  # fmt: skip
    # --speedup-ratio 0 is not "no delay" in Dynamo 1.6.1 (~6 ms a token): a large ratio is.
    mocker, mocker_log = processes.start(
        "dynamo-mocker",
        [str(python), "-m", "dynamo.mocker", "--model-path", str(model_dir), "--model-name",
         MODEL, "--block-size", str(KV_BLOCK_SIZE), "--speedup-ratio", "1000",
         "--num-workers", str(WORKERS)],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def lists_model() -> bool:
        if mocker.poll() is not None:
            raise RuntimeError(f"dynamo.mocker exited:\n{tail(mocker_log)}")
        return MODEL in httpx.get(f"{url}/v1/models", timeout=5).text

    wait_until(lists_model, f"Dynamo's frontend at {url} to list {MODEL}", log)
    # The model is listed once one worker registered: wait for every worker's registration
    # (a file each under the discovery folder) and for an answer.
    instances = directory / "dynkv" / "v1" / "instances"

    def ready() -> bool:
        if len(list(instances.glob("*generate*"))) < WORKERS:
            return False
        body = request_body(random.Random(0), 0, stream=False)
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200

    wait_until(ready, f"both Dynamo mocker workers to register and answer at {url}", log)
    return System("dynamo", url, psutil.Process(frontend.pid), [psutil.Process(mocker.pid)])


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(condition: Any, what: str, log: Path, timeout: float = 120.0) -> None:
    """Poll ``condition()`` (connection errors count as not yet) until true.

    Raises:
        RuntimeError: ``timeout`` seconds passed; names ``what`` and ends with ``log``'s tail.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.02)  # what it waits for takes a second or less: a coarser poll adds to it
    raise RuntimeError(f"timed out waiting for {what}:\n{tail(log)}")


def tree_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` and its live children."""
    total = 0.0
    for one in (process, *process.children(recursive=True)):
        try:
            times = one.cpu_times()
        except psutil.NoSuchProcess:
            continue  # it ended while we looked
        total += times.user + times.system
    return total


def pin(processes: Iterable[psutil.Process], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of ``processes`` and their children (threads they
    start later inherit it)."""
    for process in processes:
        for one in (process, *process.children(recursive=True)):
            try:
                for thread in one.threads():
                    try:
                        os.sched_setaffinity(thread.id, cpus)
                    except ProcessLookupError:
                        pass  # the thread ended
            except psutil.NoSuchProcess:
                pass


# -- interlock in front of HTTP engines (--interlock-workers) --------------------------------------

#: The name of interlock serve over `interlock worker --openai-port` engines (vLLM's HTTP surface).
OPENAI_SYSTEM = "interlock-openai"


def add_interlock_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interlock-workers",
        choices=("wire", "openai", "both"),
        default="wire",
        help="what interlock serve runs over: 'wire' (--remote-worker, interlock's own "
        "protocol), 'openai' (--engine ID=URL: the same zero-time workers behind vLLM's HTTP "
        f"surface, named {OPENAI_SYSTEM} in the tables) or 'both' in the same run, with the "
        "ratio of their CPU per request (default wire)",
    )


def start_interlocks(processes: Processes, args: argparse.Namespace) -> list[System]:
    """The interlock systems ``--interlock-workers`` names, started."""
    systems = []
    if args.interlock_workers in ("wire", "both"):
        systems.append(start_interlock(processes, args.tokenizer, args.router_mode))
    if args.interlock_workers in ("openai", "both"):
        systems.append(start_interlock_openai(processes, args.tokenizer, args.router_mode))
    return systems


def start_interlock_openai(
    processes: Processes, tokenizer: str, router_mode: str | None, name: str = OPENAI_SYSTEM
) -> System:
    """Start ``WORKERS`` ``interlock worker --openai-port 0 --zero-time`` processes (the mock
    behind vLLM's HTTP surface, publishing KV events as vLLM does when the router mode is kv)
    and ``interlock serve --engine ID=URL`` over them; return once ``/health`` lists every
    engine. ``name`` names the system and its processes' log files.

    Raises:
        RuntimeError: a process exited or did not get ready in time (with its output).
    """
    kv_bind = f"tcp://127.0.0.1:{free_port()}" if router_mode in (None, "kv") else None
    started = []
    for worker_id in range(1, WORKERS + 1):
        command = [
            sys.executable, "-m", "interlock", "worker", "--id", str(worker_id), "--port", "0",
            "--openai-port", "0", "--served-model-name", MODEL, "--tokenizer", tokenizer,
            "--block-size", str(KV_BLOCK_SIZE), "--zero-time", "--log-level", "warning",
        ]  # fmt: skip
        if kv_bind is not None:
            command += ["--kv-events-endpoint", kv_bind]
        started.append(processes.start(f"{name}-worker{worker_id}", command))
    urls = [
        str(json.loads(wait_for_line(p, log, '"openai_url"'))["openai_url"]) for p, log in started
    ]
    command = [
        sys.executable, "-m", "interlock", "serve", "--port", "0", "--model-name", MODEL,
        *serve_tokenizer_flags(tokenizer), "--kv-block-size", str(KV_BLOCK_SIZE),
    ]  # fmt: skip
    if router_mode is not None:
        command += ["--router-mode", router_mode, "--migration-limit", "3"]
    for worker_id, url in enumerate(urls, start=1):
        command += ["--engine", f"{worker_id}={url}"]
    if kv_bind is not None:
        command += ["--kv-events-bind", kv_bind]
    process, log = processes.start(f"{name}-serve", command)
    url = wait_for_line(process, log, "listening on ").split("listening on ")[1].split()[0]
    wait_until(
        lambda: len(httpx.get(f"{url}/health", timeout=5).json().get("workers", ())) == WORKERS,
        f"interlock serve at {url} to list {WORKERS} engines in /health",
        log,
    )
    return System(
        name, url, psutil.Process(process.pid), [psutil.Process(p.pid) for p, _ in started]
    )


# -- the workload and the client -------------------------------------------------------------------


def request_body(rng: random.Random, index: int, *, stream: bool) -> dict[str, Any]:
    """Request ``index`` of loadgen.py's workload: one of the shared system prompts and a
    question of its own."""
    group = index % PREFIX_GROUPS
    system = f"System prompt {group}: " + "you are a helpful routing test assistant. " * (
        PREFIX_REPEAT
    )
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"question {index} {rng.randint(0, 10**6)}"},
        ],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
    return body


@attrs.frozen
class Outcome:
    """One request as the client saw it: seconds to the end, prompt tokens (non-stream) or
    SSE data events (stream), or why it failed."""

    latency: float
    tokens: int = 0
    error: str | None = None


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool
) -> Outcome:
    """Send one chat completion; an answer counts when it is a 200 with choices (non-stream)
    or a 200 stream that ends with ``data: [DONE]``."""
    start = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers={"content-type": "application/json"}
        ) as response:
            if not stream:
                answer = json.loads(await response.read())
                if response.status != 200 or not answer.get("choices"):
                    return Outcome(time.perf_counter() - start, error=f"HTTP {response.status}")
                prompt = int((answer.get("usage") or {}).get("prompt_tokens", 0))
                return Outcome(time.perf_counter() - start, prompt)
            events, done = 0, False
            async for line in response.content:
                if line.startswith(b"data: "):
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    else:
                        events += 1
            if response.status != 200 or not done:
                return Outcome(time.perf_counter() - start, error=f"HTTP {response.status}")
            return Outcome(time.perf_counter() - start, events)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return Outcome(time.perf_counter() - start, error=type(exc).__name__)


async def drive(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    stream: bool,
    warmup: Sequence[bytes],
    snapshot: Callable[[], Any],
) -> tuple[list[Outcome], float, Any, Any]:
    """Send ``warmup`` (all at once: it opens the connections), then ``bodies`` with at most
    ``concurrency`` in flight, calling ``snapshot()`` just before and just after those.
    Returns their outcomes, the seconds they took, and the two snapshots."""
    endpoint = f"{url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one_request(session, endpoint, b, stream) for b in warmup))
        queue = iter(bodies)
        outcomes: list[Outcome] = []

        async def client() -> None:
            for body in queue:
                outcomes.append(await one_request(session, endpoint, body, stream))

        before = snapshot()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = snapshot()
        return outcomes, wall, before, after


@attrs.frozen
class Cell:
    """One measured cell: a system at concurrency C in one mode, in one round."""

    system: str
    round: int
    mode: str
    concurrency: int
    requests: int
    errors: int
    frontend_cpu_ms: float  # per request
    workers_cpu_ms: float  # per request
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    tokens: float  # prompt tokens (non-stream) or SSE data events (stream) per answered request
    frontend_busy: float  # frontend CPU seconds per wall second (1.0: one core saturated)
    #: The one-core figure's: how busy the frontend's CPU was with every process on it (the
    #: box's other tenants too), from /proc/stat.
    core_busy: float | None = None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile of ``values`` (seconds) in milliseconds; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


def measure(
    system: System, mode: str, concurrency: int, requests: int, round_: int, seed: int
) -> Cell:
    """Run one cell against ``system`` (blocks until its requests are answered); return what
    it measured."""
    stream = mode == "stream"
    rng = random.Random(f"{seed}-{round_}-{mode}-{concurrency}")
    warmup = [
        json.dumps(request_body(rng, -1 - i, stream=stream)).encode() for i in range(concurrency)
    ]
    bodies = [json.dumps(request_body(rng, i, stream=stream)).encode() for i in range(requests)]

    def snapshot() -> tuple[float, float]:
        workers = sum(tree_cpu_seconds(w) for w in system.workers)
        return tree_cpu_seconds(system.frontend), workers

    outcomes, wall, before, after = asyncio.run(
        drive(system.url, bodies, concurrency, stream, warmup, snapshot)
    )
    frontend, workers = after[0] - before[0], after[1] - before[1]
    answered = [o for o in outcomes if o.error is None]
    report_errors(system, outcomes)
    return Cell(
        system=system.name,
        round=round_,
        mode=mode,
        concurrency=concurrency,
        requests=requests,
        errors=len(outcomes) - len(answered),
        frontend_cpu_ms=frontend * 1000 / requests,
        workers_cpu_ms=workers * 1000 / requests,
        req_per_s=len(answered) / wall if wall > 0 else 0.0,
        p50_ms=percentile([o.latency for o in answered], 50),
        p99_ms=percentile([o.latency for o in answered], 99),
        tokens=statistics.mean(o.tokens for o in answered) if answered else 0.0,
        frontend_busy=frontend / wall if wall > 0 else 0.0,
    )


def report_errors(system: System, outcomes: Sequence[Outcome]) -> None:
    """Print to stderr how many requests failed, by what (a status or an exception)."""
    kinds = collections.Counter(o.error for o in outcomes if o.error is not None)
    if kinds:
        print(f"{system.name}: failed requests by kind: {dict(kinds)}", file=sys.stderr)


def measure_on_one_core(
    system: System,
    others: Sequence[System],
    requests: int,
    round_: int,
    seed: int,
    wrk: str | None = None,
    concurrency: int = ONE_CORE_CONCURRENCY,
) -> Cell:
    """`measure` C=``concurrency`` non-stream with ``system``'s frontend alone on the first
    CPU this process may use and its workers, the client and the ``others`` (idle) on the
    rest; every affinity is restored after. The client is ``wrk`` (its path) when given, else
    this process's aiohttp client, which costs the other CPU about as much as the frontend
    costs its own: with it the frontend's core is rarely saturated."""
    everything = os.sched_getaffinity(0)
    first = min(everything)
    rest = everything - {first}
    idle = [p for other in others for p in (other.frontend, *other.workers)]
    pin([system.frontend], {first})
    pin([*system.workers, *idle], rest)
    # wrk inherits this affinity.
    os.sched_setaffinity(0, rest)
    try:
        before = cpu_busy_and_total(first)
        if wrk is None:
            cell = measure(system, "nonstream", concurrency, requests, round_, seed)
        else:
            cell = measure_with_wrk(system, wrk, concurrency, requests, round_, seed)
        after = cpu_busy_and_total(first)
    finally:
        os.sched_setaffinity(0, everything)
        pin([system.frontend, *system.workers, *idle], everything)
    total = after[1] - before[1]
    core_busy = (after[0] - before[0]) / total if total > 0 else None
    return attrs.evolve(cell, mode="one-core", core_busy=core_busy)


def cpu_busy_and_total(cpu: int) -> tuple[int, int]:
    """CPU ``cpu``'s busy and total clock ticks since boot, every process counted (idle and
    iowait are not busy), from /proc/stat."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(t) for t in line.split()[1:]]
                idle = ticks[3] + ticks[4]
                return sum(ticks) - idle, sum(ticks)
    raise RuntimeError(f"/proc/stat has no line for cpu{cpu}")


#: The wrk script that sends a file's bodies in turn and checks the answers.
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_bodies.lua"


def run_wrk(wrk: str, url: str, bodies: Path, requests: int, concurrency: int) -> dict[str, Any]:
    """Send the chat completions in ``bodies`` (one JSON a line, in turn) to ``url`` with
    ``wrk`` (one thread, ``concurrency`` keep-alive connections) until ``requests`` answers
    came back; return the script's summary (answered, failed, prompt_tokens, duration_us,
    p50_us, p99_us, socket_errors). Blocks until wrk exits.

    Raises:
        RuntimeError: wrk printed no summary (with its output).
    """
    command = [
        wrk, "-t1", f"-c{concurrency}", "-d3600s", "--timeout", "60s", "-s", str(WRK_SCRIPT),
        f"{url}/v1/chat/completions", "--", str(bodies), str(requests),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith('{"wrk"'):
            summary: dict[str, Any] = json.loads(line)["wrk"]
            return summary
    raise RuntimeError(
        f"wrk exited with {completed.returncode} without its summary:\n"
        f"{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
    )


def measure_with_wrk(
    system: System, wrk: str, concurrency: int, requests: int, round_: int, seed: int
) -> Cell:
    """`measure` (non-stream) with ``wrk`` as the client: the same bodies, the same
    concurrency, keep-alive connections, after a warm-up of ``concurrency`` requests."""
    rng = random.Random(f"{seed}-{round_}-nonstream-{concurrency}")
    warmup = [json.dumps(request_body(rng, -1 - i, stream=False)) for i in range(concurrency)]
    bodies = [json.dumps(request_body(rng, i, stream=False)) for i in range(requests)]
    with tempfile.TemporaryDirectory(prefix="bench-frontend-wrk-") as tmp:
        warmup_file, bodies_file = Path(tmp) / "warmup.jsonl", Path(tmp) / "bodies.jsonl"
        warmup_file.write_text("\n".join(warmup) + "\n")
        bodies_file.write_text("\n".join(bodies) + "\n")
        run_wrk(wrk, system.url, warmup_file, concurrency, concurrency)
        frontend_before = tree_cpu_seconds(system.frontend)
        workers_before = sum(tree_cpu_seconds(w) for w in system.workers)
        start = time.perf_counter()
        summary = run_wrk(wrk, system.url, bodies_file, requests, concurrency)
        wall = time.perf_counter() - start
        frontend = tree_cpu_seconds(system.frontend) - frontend_before
        workers = sum(tree_cpu_seconds(w) for w in system.workers) - workers_before
    answered = int(summary["answered"])
    errors = int(summary["failed"]) + int(summary["socket_errors"])
    if errors:
        print(
            f"{system.name}: {summary['failed']} answers were not 200s with choices, "
            f"{summary['socket_errors']} socket errors or timeouts (wrk)",
            file=sys.stderr,
        )
    seconds = int(summary["duration_us"]) / 1e6
    done = max(1, answered + int(summary["failed"]))
    return Cell(
        system=system.name,
        round=round_,
        mode="nonstream",
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        frontend_cpu_ms=frontend * 1000 / done,
        workers_cpu_ms=workers * 1000 / done,
        req_per_s=answered / seconds if seconds > 0 else 0.0,
        p50_ms=int(summary["p50_us"]) / 1000 if answered else None,
        p99_ms=int(summary["p99_us"]) / 1000 if answered else None,
        tokens=int(summary["prompt_tokens"]) / answered if answered else 0.0,
        frontend_busy=frontend / wall if wall > 0 else 0.0,
    )


# -- the report ------------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def spread(values: Sequence[float]) -> str:
    """The median, with [min-max] when there is more than one value."""
    if not values:
        return "-"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.2f}"
    return f"{middle:.2f} [{min(values):.2f}-{max(values):.2f}]"


def number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_of(
    cells: Sequence[Cell], field: str, mine: str = "interlock", theirs_name: str = "dynamo"
) -> float | None:
    """The median over rounds of system ``mine``'s ``field`` over ``theirs_name``'s, round by
    round (by default interlock's over Dynamo's)."""
    ratios = []
    for cell in cells:
        if cell.system != mine:
            continue
        for other in cells:
            if other.system == theirs_name and other.round == cell.round:
                theirs = getattr(other, field)
                if theirs:
                    ratios.append(getattr(cell, field) / theirs)
    return median(ratios)


def table(cells: Sequence[Cell], systems: Sequence[str]) -> list[str]:
    """The markdown table: one row per (C, mode), both systems side by side."""
    both = "dynamo" in systems
    head = ["C", "mode"]
    for name in systems:
        head += [f"{name} CPU ms/req", f"{name} req/s", f"{name} p50 / p99 ms"]
    if both:
        head.append("CPU ratio interlock / Dynamo")
    engines = OPENAI_SYSTEM in systems and "interlock" in systems
    if engines:
        head.append("CPU ratio HTTP engines / wire workers")
    head.append("errors")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(c.concurrency, c.mode) for c in cells}, key=lambda k: (k[1], k[0]))
    for concurrency, mode in keys:
        row = [str(concurrency), mode]
        group = [c for c in cells if (c.concurrency, c.mode) == (concurrency, mode)]
        for name in systems:
            mine = [c for c in group if c.system == name]
            p50 = median(c.p50_ms for c in mine)
            p99 = median(c.p99_ms for c in mine)
            row += [
                spread([c.frontend_cpu_ms for c in mine]),
                number(median(c.req_per_s for c in mine)),
                f"{number(p50, 1)} / {number(p99, 1)}",
            ]
        if both:
            row.append(number(ratio_of(group, "frontend_cpu_ms"), 2))
        if engines:
            row.append(number(ratio_of(group, "frontend_cpu_ms", OPENAI_SYSTEM, "interlock"), 2))
        row.append(str(sum(c.errors for c in group)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def details(cells: Sequence[Cell], systems: Sequence[str]) -> list[str]:
    """What else each cell measured: the workers' CPU, prompt tokens (both systems should
    count the same) or SSE data events per stream, and how busy the frontend kept its cores."""
    lines = [
        "| C | mode | system | workers CPU ms/req | prompt tokens (non-stream) or SSE events "
        "(stream) per request | frontend cores busy |"
    ]
    lines.append("|---|---|---|---|---|---|")
    keys = sorted({(c.concurrency, c.mode) for c in cells}, key=lambda k: (k[1], k[0]))
    for concurrency, mode in keys:
        for name in systems:
            mine = [
                c for c in cells if (c.concurrency, c.mode, c.system) == (concurrency, mode, name)
            ]
            if not mine:
                continue
            lines.append(
                f"| {concurrency} | {mode} | {name} | "
                f"{number(median(c.workers_cpu_ms for c in mine), 2)} | "
                f"{number(median(c.tokens for c in mine), 1)} | "
                f"{number(median(c.frontend_busy for c in mine), 2)} |"
            )
    return lines


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "-n", "--requests", type=int, default=2000, help="measured requests per cell (2000)"
    )
    parser.add_argument(
        "--concurrency", default="16,64,256", help="comma-separated concurrencies (16,64,256)"
    )
    parser.add_argument(
        "--modes", default="nonstream,stream", help="comma-separated: nonstream, stream (both)"
    )
    parser.add_argument("--router-mode", choices=sorted(DYNAMO_ROUTER_MODES), default="kv")
    parser.add_argument(
        "--tokenizer",
        default=str(QWEN3),
        help="the tokenizer folder, for both systems (the Qwen3 one next to the checkout); "
        "'builtin' measures interlock alone with its byte tokenizer",
    )
    dynamo = parser.add_mutually_exclusive_group()
    dynamo.add_argument(
        "--dynamo-python",
        type=Path,
        default=DYNAMO_PYTHON,
        help=f"the python of Dynamo's venv ({DYNAMO_PYTHON})",
    )
    dynamo.add_argument("--no-dynamo", action="store_true", help="measure interlock alone")
    parser.add_argument(
        "--one-core-requests",
        type=int,
        default=None,
        help="requests of the one-core figure per round (2x -n; 0 skips it)",
    )
    parser.add_argument(
        "--one-core-concurrency",
        type=int,
        default=ONE_CORE_CONCURRENCY,
        help=f"connections of the one-core figure (default {ONE_CORE_CONCURRENCY}; more keep a "
        "frontend's core busy while each request waits on the workers)",
    )
    parser.add_argument(
        "--wrk",
        default=shutil.which("wrk"),
        help="the wrk that drives the one-core figure (default: wrk on PATH, "
        f"{shutil.which('wrk')}); without it this process's aiohttp client does, which keeps "
        "the frontend's core from saturating",
    )
    add_interlock_workers_option(parser)
    parser.add_argument("--raw", type=Path, help="also write every cell as a JSON line here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 1 round, 40 requests, C=4,8, a 60-request one-core figure",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.concurrency = 1, 40, "4,8"
        if args.one_core_requests is None:
            args.one_core_requests = 60
    if args.one_core_requests is None:
        args.one_core_requests = 2 * args.requests
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: give integers such as 16,64,256")
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - {"nonstream", "stream"}
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; use nonstream, stream or both")
    if args.tokenizer != "builtin" and not Path(args.tokenizer).is_dir():
        parser.error(
            f"--tokenizer {args.tokenizer}: no such folder; point it at the Qwen3 tokenizer "
            "(shared/data/tokenizers/qwen3), or use 'builtin' (interlock alone)"
        )
    if args.wrk is not None and not os.access(args.wrk, os.X_OK):
        args.wrk_missing = f"{args.wrk} is not an executable"
        args.wrk = None
    elif args.wrk is None:
        args.wrk_missing = "no wrk on PATH (apt-get install wrk)"
    return args


def dynamo_usable(args: argparse.Namespace) -> str | None:
    """None when Dynamo can run; otherwise why it is skipped."""
    if args.no_dynamo:
        return "--no-dynamo"
    if args.tokenizer == "builtin":
        return "--tokenizer builtin (Dynamo needs a tokenizer folder)"
    if not args.dynamo_python.exists():
        return (
            f"{args.dynamo_python} not found; install it with "
            "`bash ../shared/peers/install_peers.sh dynamo` (or pass --dynamo-python)"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skip = dynamo_usable(args)
    if skip is not None:
        print(f"Dynamo: skipping it ({skip}); measuring interlock alone", flush=True)
    cores = len(os.sched_getaffinity(0))
    if args.one_core_requests and args.wrk is None:
        print(
            f"wrk: {args.wrk_missing}; the one-core figure's client is this process's aiohttp "
            "client instead, which needs about as much CPU as the frontend: the frontend's core "
            "will not saturate, so that figure understates what one core serves",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        directory = Path(tmp)
        processes = Processes(directory)
        try:
            systems = start_interlocks(processes, args)
            if skip is None:
                model_dir = make_dynamo_model_dir(Path(args.tokenizer), directory)
                systems.append(
                    start_dynamo(
                        processes, args.dynamo_python, model_dir, directory, args.router_mode
                    )
                )
            cells = run(args, systems, cores)
        finally:
            processes.stop_all()
    names = [s.name for s in systems]
    print()
    print(
        f"Frontend CPU ms per request, {WORKERS} zero-time workers, router mode "
        f"{args.router_mode}, {args.requests} requests a cell, median [min-max] of "
        f"{args.rounds} round(s); load average {os.getloadavg()[0]:.1f}"
    )
    print("\n".join(table([c for c in cells if c.mode != "one-core"], names)))
    print()
    print("\n".join(details([c for c in cells if c.mode != "one-core"], names)))
    one_core = [c for c in cells if c.mode == "one-core"]
    if one_core:
        print()
        client = "wrk" if args.wrk is not None else "aiohttp"
        print(
            f"Non-stream req/s on one core (C={args.one_core_concurrency}, the frontend pinned "
            f"to a CPU of its own, the workers and the client ({client}) on the others):"
        )
        for name in names:
            mine = [c for c in one_core if c.system == name]
            busy = median(c.frontend_busy for c in mine) or 0.0
            verdict = (
                "saturated"
                if busy >= SATURATED
                else "below ~95 %: the workers, the client or other processes held it back"
            )
            core = median(c.core_busy for c in mine)
            print(
                f"  {name}: {number(median(c.req_per_s for c in mine))} req/s, "
                f"{number(median(c.frontend_cpu_ms for c in mine), 2)} CPU ms/req, "
                f"frontend core {number(100 * busy)} % busy ({verdict}; with every process "
                f"on it {number(None if core is None else 100 * core)} %); workers "
                f"{number(median(c.workers_cpu_ms for c in mine), 2)} CPU ms/req, p50 / p99 "
                f"{number(median(c.p50_ms for c in mine), 1)} / "
                f"{number(median(c.p99_ms for c in mine), 1)} ms"
            )
        if len(names) > 1:
            print(f"  ratio interlock / Dynamo req/s: {number(ratio_of(one_core, 'req_per_s'), 2)}")
    elif args.one_core_requests and cores < 2:
        print(f"\nNon-stream req/s on one core: skipped, this process may use {cores} CPU")
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"\n{errors} requests failed (see the errors column)")
    return 1 if errors else 0


def run(args: argparse.Namespace, systems: Sequence[System], cores: int) -> list[Cell]:
    """Every cell of every round, the systems taking turns (the first alternating by round);
    each cell is printed to stderr as it ends and written to ``--raw``."""
    cells: list[Cell] = []
    raw = args.raw.open("w") if args.raw else None
    try:
        for round_ in range(1, args.rounds + 1):
            order = list(systems) if round_ % 2 else list(reversed(systems))
            plan: list[tuple[str, int]] = [
                (mode, c) for mode in args.modes for c in args.concurrency
            ]
            if args.one_core_requests and cores >= 2:
                plan.append(("one-core", args.one_core_concurrency))
            for mode, concurrency in plan:
                for system in order:
                    if mode == "one-core":
                        others = [s for s in systems if s is not system]
                        cell = measure_on_one_core(
                            system,
                            others,
                            args.one_core_requests,
                            round_,
                            args.seed,
                            args.wrk,
                            args.one_core_concurrency,
                        )
                    else:
                        cell = measure(system, mode, concurrency, args.requests, round_, args.seed)
                    cells.append(cell)
                    print(
                        f"round {round_} {system.name:9} {mode:9} C={concurrency:<4} "
                        f"{cell.frontend_cpu_ms:.2f} CPU ms/req {cell.req_per_s:.0f} req/s "
                        f"p50 {number(cell.p50_ms, 1)} p99 {number(cell.p99_ms, 1)} ms "
                        f"errors {cell.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if raw is not None:
                        raw.write(json.dumps(attrs.asdict(cell)) + "\n")
                        raw.flush()
    finally:
        if raw is not None:
            raw.close()
    return cells


if __name__ == "__main__":
    sys.exit(main())
