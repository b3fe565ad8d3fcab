"""Old against new: the frontend CPU per request of `interlock serve` over 2 `interlock worker
--zero-time` processes, for several checkouts of interlock in one run, interleaved.

Each round starts, for each checkout in turn (the order alternates between rounds), two
workers and `interlock serve` with the Qwen3 tokenizer, then drives every cell (mode and
concurrency) with ../shared/peers/loadgen.py (chat completions of --max-tokens tokens whose
system prompt repeats its sentence --prefix-repeat times, 28 by default: bench_frontend.py's
~255-token prompts; a warm-up of 200 requests first) and reads the CPU the serve process
spent from /proc. It prints a JSON line per cell and round, then a table of medians and the
ratio of the last checkout to the first (order-balanced, below). A loaded machine moves
absolute figures; compare the ratios.

    git worktree add --detach /tmp/base main
    python benchmarks/ab_frontend.py --src base=/tmp/base --src new=. \
        --cells nonstream:16,nonstream:64,nonstream:256,stream:16,stream:64,stream:256 \
        --policy round_robin -n 1000 --rounds 2

``--engines http`` puts each checkout's ``interlock serve --engine ID=URL`` over the workers'
vLLM-compatible HTTP surface instead (``interlock worker --openai-port 0``, KV events over ZMQ
as vLLM publishes them under ``--policy kv``): the path a real vLLM takes.

The load generator needs aiohttp: ``--loadgen-python`` names a Python that has it (default:
the peers' tools venv, ``bash ../shared/peers/install_peers.sh tools``).

``--side-by-side``: the checkouts run at the same time instead of in turn, which a shared box
needs (its load moves a checkout's CPU per request by 10-30 % from one minute to the next, and
both checkouts alike when they run together): every checkout's serve is pinned to CPU 0, its
workers and a ``wrk`` client (``apt-get install wrk``; the same chat requests as loadgen.py's)
to CPU 1, and each cell drives them all at once for ``--seconds``. Each round starts the
checkouts' processes afresh and stops them at its end, and alternates (rotates, with more than
two) everything done one checkout after another: the order the clusters start and are pinned
in, the order the wrk clients launch in, the order their CPU is read in. With the processes
kept for the whole run and base always first, the serve listed first paid 5-12 % more CPU a
request in an A/A run. The ratio printed is order-balanced (the geometric mean of the median
ratio in the rounds each checkout went first), and the rounds' ratios are printed by who went
first, so what the order still does shows; give an even number of rounds:

    python benchmarks/ab_frontend.py --src base=/tmp/base --src new=. --side-by-side \
        --cells nonstream:64,nonstream:16,stream:16,stream:64 --rounds 4 --seconds 8

``--count-steps``: serve runs with a trio instrument that counts task steps and spawned tasks,
and each cell also prints them per request (the instrument's own cost, about a microsecond a
request, is paid by every checkout alike), with or without ``--side-by-side``.
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
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV_PY = sys.executable
TOOLS_PY = "/tmp/peers/tools/bin/python"
LOADGEN = str(HERE.parents[1] / "shared" / "peers" / "loadgen.py")
TOK = str(HERE.parents[1] / "shared" / "data" / "tokenizers" / "qwen3")
CLK = os.sysconf("SC_CLK_TCK")


def instrumented_serve(setup: str) -> str:
    """Code for ``python -c`` in place of ``-m interlock``: ``setup`` (which defines a trio
    instrument class ``Instrument`` and ``write_report(file)``), then interlock's CLI with an
    ``Instrument()`` in every ``trio.run``; on SIGUSR1 the process writes its report to
    $AB_REPORT_FILE (whole: written aside, then renamed), which `report` reads."""
    return (
        setup
        + """
import os, signal, sys, trio

_run = trio.run

def run(*args, **kwargs):
    kwargs["instruments"] = [*kwargs.get("instruments", ()), Instrument()]
    return _run(*args, **kwargs)

def dump(signum, frame):
    path = os.environ["AB_REPORT_FILE"]
    with open(path + ".tmp", "w") as f:
        write_report(f)
    os.replace(path + ".tmp", path)

trio.run = run
signal.signal(signal.SIGUSR1, dump)
from interlock.cli import main
sys.exit(main(sys.argv[1:]))
"""
    )


#: A serve that counts trio's task steps and spawns: its report is "steps spawned".
STEPS_SERVE = instrumented_serve(
    """
import trio

class Instrument(trio.abc.Instrument):
    steps = spawned = 0

    def before_task_step(self, task):
        Instrument.steps += 1

    def task_spawned(self, task):
        Instrument.spawned += 1

def write_report(f):
    f.write(f"{Instrument.steps} {Instrument.spawned}")
"""
)


def report(pid: int, path: str | os.PathLike[str]) -> str:
    """What a serve started with `instrumented_serve` code (`STEPS_SERVE`, bench_tail.py's
    ``TAIL_SERVE``) and $AB_REPORT_FILE ``path`` writes when sent SIGUSR1. Waits up to 10 s
    for the file.

    Raises:
        RuntimeError: the serve wrote nothing in that time.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve (pid {pid}) wrote no report to {path} after SIGUSR1")
        time.sleep(0.01)
    with open(path) as f:
        return f.read()


def task_steps(pid: int, path: str) -> tuple[int, int]:
    """The task steps and spawns of a serve started with `STEPS_SERVE` (``path``: its
    $AB_REPORT_FILE), so far."""
    steps, spawned = report(pid, path).split()
    return int(steps), int(spawned)


def pin(serve: int, workers: list[int]) -> None:
    """``serve`` (every thread) on CPU 0, ``workers`` on CPU 1, where the client goes too."""
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(serve)], check=True, capture_output=True)
    for w in workers:
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(w)], check=True, capture_output=True)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_below_ephemeral() -> int:
    """A free port below the kernel's ephemeral range, for an address a process binds only
    after others have bound port 0: a `free_port` there can be handed out again meanwhile (a
    worker took the KV events port of its own serve, which then did not come up).

    Raises:
        RuntimeError: no free port among 200 tried below the range.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for port in random.sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port below {low}; stop what holds them or widen the search")


@contextlib.contextmanager
def cluster(
    src: str,
    policy: str,
    extra: list[str],
    engines: str = "wire",
    steps_file: str | None = None,
    serve_code: str | None = None,
    serve_env: dict[str, str] | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """Start 2 workers and serve from checkout ``src`` (over the workers' wire protocol, or
    with ``engines="http"`` over their vLLM-compatible HTTP surface); yield serve's port and
    pid and the workers' pids; stop them all at the end. ``steps_file``: serve counts its task
    steps (`STEPS_SERVE`) and writes them there. ``serve_code``: serve runs as ``python -c``
    this (`instrumented_serve`), with ``serve_env`` added to its environment."""
    if steps_file is not None:
        serve_code = STEPS_SERVE
        serve_env = {**(serve_env or {}), "AB_REPORT_FILE": steps_file}
    env = dict(os.environ, PYTHONPATH=src)
    procs = []
    http = engines == "http"
    # vLLM publishes KV events to the one socket the frontend binds (router mode kv only).
    # Bound by serve only after the workers, which connect to it, have bound their port 0s.
    kv_bind = f"tcp://127.0.0.1:{port_below_ephemeral()}" if http and policy == "kv" else None
    try:
        ports = []
        for i in (1, 2):
            surface = []
            if http:
                # vLLM's CPU backend pages in blocks of 32 (reference/vllm-cpu.md).
                surface = ["--openai-port", "0", "--served-model-name", "tiny"]
                surface += ["--block-size", "32"]
                if kv_bind is not None:
                    surface += ["--kv-events-endpoint", kv_bind]
            p = subprocess.Popen(
                [
                    VENV_PY,
                    "-m",
                    "interlock",
                    "worker",
                    "--id",
                    str(i),
                    "--port",
                    "0",
                    "--tokenizer",
                    TOK,
                    "--zero-time",
                    "--log-level",
                    "warning",
                    *surface,
                ],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                cwd=src,
            )
            procs.append(p)
            announced = json.loads(p.stdout.readline())
            ports.append(announced["openai_url"] if http else announced["port"])
        port = free_port()
        rw = []
        for i, wp in zip((1, 2), ports, strict=True):
            if http:
                rw += ["--engine", f"{i}={wp}"]
            else:
                rw += ["--remote-worker", f"{i}=127.0.0.1:{wp}"]
        if http:
            rw += ["--kv-block-size", "32"]
            if kv_bind is not None:
                rw += ["--kv-events-bind", kv_bind]
        launch = ["-m", "interlock"] if serve_code is None else ["-c", serve_code]
        serve = subprocess.Popen(
            [
                VENV_PY,
                *launch,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model-name",
                "tiny",
                "--tokenizer",
                TOK,
                *rw,
                "--router-mode",
                policy,
                "--migration-limit",
                "3",
                *extra,
            ],
            env=dict(env, **(serve_env or {})),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=src,
        )
        procs.append(serve)
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                if len(json.loads(body).get("workers", [])) >= 2:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not come up")
            time.sleep(0.2)
        yield port, serve.pid, [p.pid for p in procs[:2]]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


#: loadgen.py's warm-up requests in `run_cell` (its --warmup): unmeasured by loadgen, but
#: served (and their CPU spent) inside the cell's measurement.
LOADGEN_WARMUP = 50


def run_cell(
    port: int,
    pid: int,
    wpids: list[int],
    mode: str,
    c: int,
    n: int,
    max_tokens: int,
    prefix_repeat: int = 28,
    steps_file: str | None = None,
) -> dict[str, Any]:
    """One cell: a warm-up, then ``n`` requests at concurrency ``c``; CPU per request."""
    args = [
        LOADGEN_PY[0],
        LOADGEN,
        "--url",
        f"http://127.0.0.1:{port}",
        "--model",
        "tiny",
        "-n",
        str(n),
        "-c",
        str(c),
        "--max-tokens",
        str(max_tokens),
        "--client",
        "aiohttp",
        "--warmup",
        str(LOADGEN_WARMUP),
        "--prefix-repeat",
        str(prefix_repeat),
    ]
    if mode == "stream":
        args.append("--stream")
    # warm-up run
    subprocess.run([*args[:6], "200", *args[7:]], capture_output=True, text=True, check=False)
    steps_before = task_steps(pid, steps_file) if steps_file else (0, 0)
    before = cpu_s(pid)
    wb = sum(cpu_s(w) for w in wpids)
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    after = cpu_s(pid)
    wa = sum(cpu_s(w) for w in wpids)
    steps_after = task_steps(pid, steps_file) if steps_file else (0, 0)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")]
    res = json.loads(line[-1]) if line else {"error": out.stderr[-500:]}
    # The load generator's warm-up requests are served inside the measurement too.
    served = n + LOADGEN_WARMUP
    cell = {
        "cpu_ms_per_req": 1000 * (after - before) / served,
        "worker_cpu_ms_per_req": 1000 * (wa - wb) / served,
        "req_per_s": res.get("req_per_s"),
        "errors": res.get("errors"),
    }
    if steps_file:
        cell["task_steps_per_req"] = (steps_after[0] - steps_before[0]) / served
        cell["tasks_spawned_per_req"] = (steps_after[1] - steps_before[1]) / served
    return cell


LOADGEN_PY = [TOOLS_PY]

#: wrk's requests in `side_by_side`: loadgen.py's chat completions (4 shared system prompts of
#: --prefix-repeat sentences, a numbered question, max_tokens), streamed when $AB_STREAM is 1.
WRK_SCRIPT = """
local counter = 0
local prefixes = {}
local repeats = tonumber(os.getenv("AB_PREFIX_REPEAT"))
for g = 0, 3 do
  prefixes[g] = "System prompt " .. g .. ": "
    .. string.rep("you are a helpful routing test assistant. ", repeats)
end
local tail = ',"max_tokens":' .. os.getenv("AB_MAX_TOKENS")
  .. (os.getenv("AB_STREAM") == "1" and ',"stream":true}' or '}')
request = function()
  counter = counter + 1
  local body = '{"model":"tiny","messages":[{"role":"system","content":"'
    .. prefixes[counter % 4] .. '"},{"role":"user","content":"question ' .. counter .. ' '
    .. math.random(0, 1000000) .. '"}]' .. tail
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "non2xx": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def in_turn(items: list[Any], r: int) -> list[Any]:
    """``items`` rotated by round ``r``: with two checkouts, each goes first every other round."""
    k = r % len(items)
    return items[k:] + items[:k]


def order_balanced(
    ratios: list[float], firsts: list[str], names: list[str]
) -> tuple[float, dict[str, list[float]]]:
    """The rounds' ``ratios`` (last checkout over first) by the checkout that went first in
    each (``firsts``), and the geometric mean of each order's median: a bias of going first (a
    factor on the first checkout's cost) cancels whatever the number of rounds in each order,
    where a plain median leans to the order with more rounds, or with the two middle ones."""
    split = {n: [x for x, f in zip(ratios, firsts, strict=True) if f == n] for n in names}
    return statistics.geometric_mean([statistics.median(v) for v in split.values() if v]), split


def side_by_side(
    srcs: list[list[str]],
    cells: list[tuple[str, int]],
    a: argparse.Namespace,
) -> dict[tuple[str, int], dict[str, list[dict[str, Any]]]]:
    """Every checkout's cluster at once (serves on CPU 0, workers and wrk on CPU 1), each cell
    driven on all of them together for ``a.seconds``; the cells' CPU per request by checkout.

    Each round starts fresh clusters and stops them at its end, and everything done one
    checkout after another (starting and pinning the clusters, launching the wrk clients,
    reading the CPU counters) goes in `in_turn` order: processes that live the whole run carry
    their own lasting bias (where they sit in memory, which serve wins the wake-ups on CPU 0)
    into every round, and the order gave the first-listed serve 5-12 % more CPU a request in
    an A/A run; alternated, it shows up in the rounds' spread instead of in the median."""
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        for r in range(a.rounds):
            order = in_turn(srcs, r)
            with contextlib.ExitStack() as stack:
                running = round_clusters(stack, order, a)
                for mode, c in cells:
                    drive(running, script.name, mode, c, 2, a)  # warm-up
                for mode, c in cells:
                    for name, res in drive(running, script.name, mode, c, a.seconds, a).items():
                        results.setdefault((mode, c), {}).setdefault(name, []).append(res)
                        print(
                            json.dumps({"round": r, "src": name, "mode": mode, "c": c, **res}),
                            flush=True,
                        )
    return results


#: A running checkout in `side_by_side`: serve's port and pid, the workers' pids, and the file
#: its task steps go to (--count-steps) or None.
Running = tuple[int, int, list[int], str | None]


def round_clusters(
    stack: contextlib.ExitStack, order: list[list[str]], a: argparse.Namespace
) -> dict[str, Running]:
    """The checkouts' clusters started and pinned in ``order`` (stopped when ``stack`` closes),
    by name, in that order."""
    running: dict[str, Running] = {}
    for i, (name, src) in enumerate(order):
        steps_file = f"/tmp/ab_frontend_steps.{os.getpid()}.{i}" if a.count_steps else None
        port, pid, wpids = stack.enter_context(
            cluster(src, a.policy, a.extra.split(), a.engines, steps_file)
        )
        pin(pid, wpids)
        running[name] = (port, pid, wpids, steps_file)
    return running


def drive(
    running: dict[str, Running],
    script: str,
    mode: str,
    c: int,
    seconds: float,
    a: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """One cell: a wrk client per checkout at once (launched in ``running``'s order) for
    ``seconds``; each checkout's CPU per request, throughput and wrk's latency."""
    env = dict(
        os.environ,
        AB_STREAM="1" if mode == "stream" else "0",
        AB_PREFIX_REPEAT=str(a.prefix_repeat),
        AB_MAX_TOKENS=str(a.max_tokens),
    )
    steps_before = {n: task_steps(pid, f) for n, (_, pid, _, f) in running.items() if f}
    before = {n: (cpu_s(pid), sum(map(cpu_s, wp))) for n, (_, pid, wp, _) in running.items()}
    wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{c}", f"-d{seconds:g}s", "--timeout", "60s"]
    clients = {
        n: subprocess.Popen(
            [*wrk, "-s", script, f"http://127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for n, (port, _, _, _) in running.items()
    }
    outputs = {n: p.communicate()[0] for n, p in clients.items()}
    cell = {}
    for n, (_, pid, wp, steps_file) in running.items():
        lines = [x for x in outputs[n].splitlines() if x.startswith("{")]
        done = json.loads(lines[-1]) if lines else {"requests": 0, "non2xx": -1}
        count = max(done["requests"], 1)
        cell[n] = {
            "cpu_ms_per_req": 1000 * (cpu_s(pid) - before[n][0]) / count,
            "worker_cpu_ms_per_req": 1000 * (sum(map(cpu_s, wp)) - before[n][1]) / count,
            "req_per_s": done["requests"] / seconds,
            "errors": done["non2xx"] + done.get("errors", 0),
            "p50_ms": done.get("p50_us", 0) / 1000,
            "p99_ms": done.get("p99_us", 0) / 1000,
            "load": os.getloadavg()[0],
        }
        if steps_file is not None:
            steps = task_steps(pid, steps_file)
            cell[n]["task_steps_per_req"] = (steps[0] - steps_before[n][0]) / count
            cell[n]["tasks_spawned_per_req"] = (steps[1] - steps_before[n][1]) / count
    return cell


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", required=True)
    ap.add_argument("--cells", default="nonstream:16,stream:16,stream:64,stream:256")
    ap.add_argument("--policy", default="round_robin")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--prefix-repeat",
        type=int,
        default=28,
        help="loadgen's system prompt repeats (28: ~255-token prompts, bench_frontend.py's)",
    )
    ap.add_argument("--extra", default="", help="more flags for interlock serve")
    ap.add_argument(
        "--engines",
        choices=("wire", "http"),
        default="wire",
        help="serve over the workers' wire protocol (--remote-worker) or their vLLM-compatible "
        "HTTP surface (--engine ID=URL, the path a real vLLM takes)",
    )
    ap.add_argument("--loadgen-python", default=TOOLS_PY)
    ap.add_argument(
        "--count-steps", action="store_true", help="also count trio task steps per request"
    )
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the checkouts at the same time, pinned, driven by wrk (see above)",
    )
    ap.add_argument("--seconds", type=float, default=8, help="a cell's length with --side-by-side")
    a = ap.parse_args()
    LOADGEN_PY[0] = a.loadgen_python
    srcs = [s.split("=", 1) for s in a.src]
    cells = [(m, int(c)) for m, c in (x.split(":") for x in a.cells.split(","))]
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    # The checkout that went first in each round (both ways of running go `in_turn`).
    firsts = [in_turn(srcs, r)[0][0] for r in range(a.rounds)]
    if a.side_by_side:
        results = side_by_side(srcs, cells, a)
    for r in range(0 if a.side_by_side else a.rounds):
        order = in_turn(srcs, r)
        for name, src in order:
            steps_file = f"/tmp/ab_frontend_steps.{os.getpid()}" if a.count_steps else None
            cluster_args = (src, a.policy, a.extra.split(), a.engines, steps_file)
            with cluster(*cluster_args) as (port, pid, wpids):
                for mode, c in cells:
                    res = run_cell(
                        port, pid, wpids, mode, c, a.n, a.max_tokens, a.prefix_repeat, steps_file
                    )
                    results.setdefault((mode, c), {}).setdefault(name, []).append(res)
                    print(
                        json.dumps({"round": r, "src": name, "mode": mode, "c": c, **res}),
                        flush=True,
                    )
    names = [n for n, _ in srcs]
    if a.side_by_side:
        print(
            f"\nside by side, pinned, wrk: engines={a.engines} policy={a.policy} "
            f"{a.seconds:g} s a cell, rounds={a.rounds} max_tokens={a.max_tokens}"
        )
    else:
        print(
            f"\nengines={a.engines} policy={a.policy} n={a.n} rounds={a.rounds} "
            f"max_tokens={a.max_tokens}"
        )
    print(
        "| mode | C | "
        + " | ".join(f"{n} ms/req" for n in names)
        + " | ratio "
        + f"{names[-1]}/{names[0]}, order-balanced [rounds' min-max] |"
    )
    print("|---|---|" + "---|" * len(names) + "---|")
    splits: dict[tuple[str, int], dict[str, list[float]]] = {}
    for (mode, c), by in results.items():
        meds = [statistics.median(x["cpu_ms_per_req"] for x in by[n]) for n in names]
        ratios = [
            b["cpu_ms_per_req"] / a_["cpu_ms_per_req"]
            for a_, b in zip(by[names[0]], by[names[-1]], strict=True)
        ]
        balanced, splits[(mode, c)] = order_balanced(ratios, firsts, names)
        print(
            f"| {mode} | {c} | "
            + " | ".join(f"{m:.3f}" for m in meds)
            + f" | {balanced:.3f} [{min(ratios):.3f}-{max(ratios):.3f}] |"
        )
    # A round whose checkout answered errors has a CPU per request of another workload (an
    # error costs less than an answer): its ratio says nothing of the change.
    for (mode, c), by in results.items():
        for n in names:
            bad = [f"round {r}: {x['errors']}" for r, x in enumerate(by[n]) if x["errors"]]
            if bad:
                print(f"({mode} C={c}: {n} answered errors, " + ", ".join(bad) + ")")
    if a.rounds % len(srcs):
        print(f"(--rounds {a.rounds}: not every checkout went first equally often)")
    print(f"\nratio {names[-1]}/{names[0]} by the checkout that went first (rounds' ratios)")
    for (mode, c), split in splits.items():
        print(
            f"{mode} C={c}: "
            + "; ".join(f"{n} first " + " ".join(f"{x:.3f}" for x in v) for n, v in split.items())
        )
    if a.side_by_side:
        # wrk's latency at the same time on the same core: the tail against the median per
        # checkout (p99/p50, median and range over rounds), and new's against base's.
        print(
            f"\nlatency p99/p50 (wrk), median [min-max] over rounds; ratio {names[-1]}/{names[0]}"
        )
        for (mode, c), by in results.items():
            tails = {n: [x["p99_ms"] / x["p50_ms"] for x in by[n] if x["p50_ms"]] for n in names}
            cells_ = [
                f"{n} {statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}] "
                f"(p50 {statistics.median(x['p50_ms'] for x in by[n]):.1f} ms)"
                for n, v in tails.items()
                if v
            ]
            ratios = [
                (b["p99_ms"] / b["p50_ms"]) / (a_["p99_ms"] / a_["p50_ms"])
                for a_, b in zip(by[names[0]], by[names[-1]], strict=True)
                if a_["p50_ms"] and b["p50_ms"]
            ]
            spread = (
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
                if ratios
                else "-"
            )
            print(f"{mode} C={c}: " + ", ".join(cells_) + f"; ratio {spread}")
        loads = [x["load"] for by in results.values() for v in by.values() for x in v]
        print(f"load average over the cells: {min(loads):.1f}-{max(loads):.1f}")
    if a.count_steps:
        print("\ntrio task steps per request (medians; tasks spawned per request)")
        for (mode, c), by in results.items():
            cells_ = [
                f"{n} {statistics.median(x['task_steps_per_req'] for x in by[n]):.2f} "
                f"({statistics.median(x['tasks_spawned_per_req'] for x in by[n]):.3f})"
                for n in names
            ]
            print(f"{mode} C={c}: " + ", ".join(cells_))


if __name__ == "__main__":
    main()
