"""Old against new: the frontend CPU per request of `interlock serve` over 2 `interlock worker
--zero-time` processes, for several checkouts of interlock in one run, interleaved.

Each round starts, for each checkout in turn (the order alternates between rounds), two
workers and `interlock serve` with the Qwen3 tokenizer, then drives every cell (mode and
concurrency) with ../shared/peers/loadgen.py (chat completions of --max-tokens tokens whose
system prompt repeats its sentence --prefix-repeat times, 28 by default: bench_frontend.py's
~255-token prompts; a warm-up of 200 requests first) and reads the CPU the serve process
spent from /proc. It prints a JSON line per cell and round, then a table of medians and the
median ratio of the last checkout to the first. A loaded machine moves absolute figures;
compare the ratios.

    git worktree add --detach /tmp/base main
    python benchmarks/ab_frontend.py --src base=/tmp/base --src new=. \
        --cells nonstream:16,nonstream:64,nonstream:256,stream:16,stream:64,stream:256 \
        --policy round_robin -n 1000 --rounds 2

``--engines http`` puts each checkout's ``interlock serve --engine ID=URL`` over the workers'
vLLM-compatible HTTP surface instead (``interlock worker --openai-port 0``, KV events over ZMQ
as vLLM publishes them under ``--policy kv``): the path a real vLLM takes.

The load generator needs aiohttp: ``--loadgen-python`` names a Python that has it (default:
the peers' tools venv, ``bash ../shared/peers/install_peers.sh tools``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
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


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cluster(
    src: str, policy: str, extra: list[str], engines: str = "wire"
) -> Iterator[tuple[int, int, list[int]]]:
    """Start 2 workers and serve from checkout ``src`` (over the workers' wire protocol, or
    with ``engines="http"`` over their vLLM-compatible HTTP surface); yield serve's port and
    pid and the workers' pids; stop them all at the end."""
    env = dict(os.environ, PYTHONPATH=src)
    procs = []
    http = engines == "http"
    # vLLM publishes KV events to the one socket the frontend binds (router mode kv only).
    kv_bind = f"tcp://127.0.0.1:{free_port()}" if http and policy == "kv" else None
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
        serve = subprocess.Popen(
            [
                VENV_PY,
                "-m",
                "interlock",
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
            env=env,
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


def run_cell(
    port: int,
    pid: int,
    wpids: list[int],
    mode: str,
    c: int,
    n: int,
    max_tokens: int,
    prefix_repeat: int = 28,
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
        "50",
        "--prefix-repeat",
        str(prefix_repeat),
    ]
    if mode == "stream":
        args.append("--stream")
    # warm-up run
    subprocess.run([*args[:6], "200", *args[7:]], capture_output=True, text=True, check=False)
    before = cpu_s(pid)
    wb = sum(cpu_s(w) for w in wpids)
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    after = cpu_s(pid)
    wa = sum(cpu_s(w) for w in wpids)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")]
    res = json.loads(line[-1]) if line else {"error": out.stderr[-500:]}
    return {
        "cpu_ms_per_req": 1000 * (after - before) / n,
        "worker_cpu_ms_per_req": 1000 * (wa - wb) / n,
        "req_per_s": res.get("req_per_s"),
        "errors": res.get("errors"),
    }


LOADGEN_PY = [TOOLS_PY]


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
    a = ap.parse_args()
    LOADGEN_PY[0] = a.loadgen_python
    srcs = [s.split("=", 1) for s in a.src]
    cells = [(m, int(c)) for m, c in (x.split(":") for x in a.cells.split(","))]
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in range(a.rounds):
        order = srcs if r % 2 == 0 else list(reversed(srcs))
        for name, src in order:
            with cluster(src, a.policy, a.extra.split(), a.engines) as (port, pid, wpids):
                for mode, c in cells:
                    res = run_cell(port, pid, wpids, mode, c, a.n, a.max_tokens, a.prefix_repeat)
                    results.setdefault((mode, c), {}).setdefault(name, []).append(res)
                    print(
                        json.dumps({"round": r, "src": name, "mode": mode, "c": c, **res}),
                        flush=True,
                    )
    names = [n for n, _ in srcs]
    print(
        f"\nengines={a.engines} policy={a.policy} n={a.n} rounds={a.rounds} "
        f"max_tokens={a.max_tokens}"
    )
    print(
        "| mode | C | "
        + " | ".join(f"{n} ms/req" for n in names)
        + " | ratio "
        + f"{names[-1]}/{names[0]} |"
    )
    print("|---|---|" + "---|" * len(names) + "---|")
    for (mode, c), by in results.items():
        meds = [statistics.median(x["cpu_ms_per_req"] for x in by[n]) for n in names]
        ratios = [
            b["cpu_ms_per_req"] / a_["cpu_ms_per_req"]
            for a_, b in zip(by[names[0]], by[names[-1]], strict=True)
        ]
        print(
            f"| {mode} | {c} | "
            + " | ".join(f"{m:.3f}" for m in meds)
            + f" | {statistics.median(ratios):.3f} |"
        )


if __name__ == "__main__":
    main()
