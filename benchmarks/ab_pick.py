"""Old against new: the trio-side CPU of one short pick (issue 14's critical path once the
ext_proc transport runs in the trio run), in process, for several checkouts in one run.

For each checkout, a child process (``PYTHONPATH`` that checkout) serves `ExtProcPicker` over
three HTTP mock workers with ``router_mode='kv'`` (tests/test_gateway_ext_proc.py's `picking`:
no network, no gRPC) and feeds it what Envoy sends for a short chat request ("hello",
``max_tokens`` 1): the request headers, the body, the response headers. It prints the process
CPU a pick cost over ``--picks`` picks (after a warm-up of 200), for each checkout and round,
then each checkout's median and the ratio of the last checkout to the first, order-balanced
(ab_frontend.py's: the checkouts take turns going first; give an even number of rounds).

    git worktree add --detach /tmp/base main
    python benchmarks/ab_pick.py --src base=/tmp/base --src new=. --rounds 4

``--profile``: instead, one child per checkout under cProfile, printing its top functions by
own time (cProfile inflates a pick's CPU ~2.6x, most for the smallest Python functions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# A sibling: the rotation of who goes first, and the ratio free of a bias of going first.
from ab_frontend import in_turn, order_balanced  # noqa: E402

BODY = b'{"model": "mock", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}'
WARM_UP = 200


async def pick_cpu_us(picks: int, *, warm_up: int = WARM_UP, profile: bool = False) -> float:
    """The process CPU (µs) one pick costs, over ``picks`` picks after ``warm_up`` more: the
    picker and test helpers of the checkout first on ``sys.path`` (`child` puts it there)."""
    import cProfile
    import pstats

    import test_gateway_ext_proc as t

    from interlock.gateway import DESTINATION_HEADER

    async with t.picking() as p:

        async def one(n: int) -> None:
            messages = [
                t.request_headers(extra=[("x-request-id", f"r{n}")]),
                t.request_body(BODY, end_of_stream=True),
                t.response_headers(200),
            ]
            answers = await t.exchange(p.picker, messages)
            # A refusal (an ImmediateResponse) must not pass for a cheap pick.
            assert DESTINATION_HEADER in t.set_headers(answers[0], "request_headers"), answers[0]

        for n in range(warm_up):
            await one(n)
        profiler = cProfile.Profile() if profile else None
        began = time.process_time()
        if profiler is not None:
            profiler.enable()
        for n in range(picks):
            await one(warm_up + n)
        if profiler is not None:
            profiler.disable()
        spent = time.process_time() - began
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    return spent / picks * 1e6


def child(tree: str, picks: int, profile: bool) -> None:
    import trio

    sys.path[:0] = [str(Path(tree) / "tests"), tree]
    import interlock

    # The checkout measured must be the one named, not one installed or first on the path.
    assert Path(interlock.__file__).is_relative_to(tree), (interlock.__file__, tree)
    us = trio.run(lambda: pick_cpu_us(picks, profile=profile))
    print(json.dumps({"us": us}))


def run_child(tree: str, picks: int, profile: bool = False) -> float:
    """A child's CPU per pick, in a fresh process with ``tree`` first on its path."""
    command = [sys.executable, __file__, "--child", tree, "--picks", str(picks)]
    if profile:
        command.append("--profile")
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the child of {tree} failed:\n{done.stderr[-3000:]}")
    if profile:
        print(done.stdout)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", default=[], help="name=checkout (two or more)")
    ap.add_argument("--picks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    # Each count divides a figure (CPU per pick, the rounds' geometric mean): refused at the
    # start, naming its flag, rather than a traceback at the end of the run.
    for flag in ("--picks", "--rounds"):
        if getattr(a, flag.removeprefix("--")) < 1:
            ap.error(f"{flag} {getattr(a, flag.removeprefix('--'))}: give 1 or more")
    if a.child is not None:
        child(a.child, a.picks, a.profile)
        return
    srcs = [s.split("=", 1) for s in a.src]
    if len(srcs) < 2 or any(len(s) != 2 for s in srcs):
        ap.error("give two checkouts or more: --src base=/tmp/base --src new=.")
    names = [name for name, _ in srcs]
    if a.profile:
        for name, tree in srcs:
            print(f"== {name} ({tree})")
            run_child(str(Path(tree).resolve()), a.picks, profile=True)
        return
    cpu: dict[str, list[float]] = {name: [] for name in names}
    ratios: list[float] = []
    firsts: list[str] = []
    for r in range(a.rounds):
        order = in_turn(srcs, r)
        row = {name: run_child(str(Path(tree).resolve()), a.picks) for name, tree in order}
        for name in names:
            cpu[name].append(row[name])
        ratios.append(row[names[-1]] / row[names[0]])
        firsts.append(order[0][0])
        print(
            f"round {r + 1} ({order[0][0]} first): "
            + ", ".join(f"{name} {row[name]:.1f}" for name in names)
            + f" µs/pick; {names[-1]}/{names[0]} {ratios[-1]:.3f}"
        )
    balanced, split = order_balanced(ratios, firsts, names)
    medians = ", ".join(f"{name} {statistics.median(cpu[name]):.1f}" for name in names)
    print(f"\nCPU a pick, median of {a.rounds} rounds of {a.picks:,} picks: {medians} µs")
    print(
        f"{names[-1]}/{names[0]}: {balanced:.3f} order-balanced "
        "("
        + ", ".join(f"{n} first: {' '.join(f'{x:.3f}' for x in v)}" for n, v in split.items() if v)
        + ")"
    )


if __name__ == "__main__":
    main()
