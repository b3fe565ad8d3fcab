"""Where a saturated frontend's latency tail comes from: each request's time inside
``interlock serve``, split into the serve process's own CPU, its garbage collections, the time
it was ready to run but the kernel ran something else (preempted), and the time it idled
waiting for sockets (the workers' answers, the client's next request).

One ``interlock serve`` (pinned to CPU 0) over 2 ``interlock worker --zero-time`` processes
(CPU 1, with the ``wrk`` client: ``apt-get install wrk``), the same chat completions as
``ab_frontend.py --side-by-side`` at ``-c`` keep-alive connections for ``--seconds``. The serve
runs with a trio instrument that records every scheduler pass (its wall start and length, the
thread's CPU time in it, and the CPU time of the collections in it, from ``gc.callbacks``),
and writes its transition records to a JSONL file. Each request's life in the pipeline (from
``preprocessed`` to ``done``) is laid over the passes, and the requests are grouped by that
life's length: the median band, p90-p99 and the slowest 1 %. A cause that makes the tail
shows up as more of it in the slow bands than in the median one.

    python benchmarks/bench_tail.py                      # C=256, 20 s
    python benchmarks/bench_tail.py -c 64 --seconds 10 --src /path/to/other/checkout
    python benchmarks/bench_tail.py --unpinned            # every process on every CPU

The instrument's own cost (a few clock reads a pass) and the JSONL sink's are paid in every
band alike; compare bands, not absolute CPU figures (ab_frontend.py measures those). Counting
the objects an older generation's collection walks costs more (milliseconds for a large heap):
that count is taken out of its pass's wall and CPU, so it shows as idle, not as the serve's.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# A sibling: the cluster, its pinning and wrk's chat requests.
import ab_frontend

from interlock.statemachines import read_jsonl

#: The instrument `TAIL_SERVE` runs the serve with: it records the scheduler passes, and its
#: report is the passes since the last one (wall start, wall length, CPU, GC CPU; seconds) and
#: the collections, as JSON.
TAIL_INSTRUMENT = """
import gc, json, time, trio

wall, cpu = time.time, time.thread_time
passes = []
gcs = []  # (generation, CPU seconds, objects walked: None for the young generation)
gc_cpu = [0.0, 0.0, None]  # in this pass; when the running collection started; its objects
# The wall and CPU seconds of this pass spent counting objects (the instrument's, not the
# serve's: taken out of the pass).
counting = [0.0, 0.0]

def on_gc(phase, info):
    if phase == "start":
        # What an older generation's collection walks: its generation and the younger ones.
        # Counted before its clock starts, and its own wall and CPU (milliseconds for a large
        # heap) taken out of the pass, so the passes time the serve's work only; the young
        # generation's (every ~10,000 allocations) is not counted at all.
        generation = info["generation"]
        gc_cpu[2] = None
        if generation:
            began = (wall(), cpu())
            gc_cpu[2] = sum(len(gc.get_objects(g)) for g in range(generation + 1))
            counting[0] += wall() - began[0]
            counting[1] += cpu() - began[1]
        gc_cpu[1] = cpu()
    else:
        spent = cpu() - gc_cpu[1]
        gc_cpu[0] += spent
        gcs.append((info["generation"], spent, gc_cpu[2]))

gc.callbacks.append(on_gc)

class Instrument(trio.abc.Instrument):
    began = None

    def after_io_wait(self, timeout):
        self.began = (wall(), cpu())
        gc_cpu[0] = 0.0
        counting[:] = [0.0, 0.0]

    def before_io_wait(self, timeout):
        if self.began is not None:
            length = wall() - self.began[0] - counting[0]
            passes.append((self.began[0], length, cpu() - self.began[1] - counting[1], gc_cpu[0]))

def write_report(f):
    json.dump({"passes": passes, "collections": gcs}, f)
    passes.clear()
    gcs.clear()
"""
#: A serve that records its scheduler passes (`TAIL_INSTRUMENT`).
TAIL_SERVE = ab_frontend.instrumented_serve(TAIL_INSTRUMENT)

#: A collection: its generation, its CPU seconds, the objects it walked (None: not counted).
Collection = tuple[int, float, int | None]

#: A pass: wall start, wall length, the serve thread's CPU in it, the collections' CPU in it.
Pass = tuple[float, float, float, float]

PARTS = ("cpu", "gc", "preempted", "idle")


def split_life(passes: Sequence[Pass], starts: Sequence[float], begin: float, end: float) -> dict:
    """Seconds of [``begin``, ``end``] (wall) the serve spent in each of `PARTS`: a pass's CPU
    (without its collections), its collections, its wall time not on the CPU (preempted), and
    the time between passes (idle, waiting on sockets). A pass that overlaps the interval in
    part counts in proportion. ``starts``: the passes' wall starts, sorted (``passes`` in that
    order)."""
    parts = dict.fromkeys(PARTS, 0.0)
    busy = 0.0
    i = max(0, bisect.bisect_right(starts, begin) - 1)
    while i < len(passes) and passes[i][0] < end:
        start, length, cpu, gc_cpu = passes[i]
        overlap = min(end, start + length) - max(begin, start)
        if overlap > 0 and length > 0:
            share = overlap / length
            parts["gc"] += gc_cpu * share
            parts["cpu"] += max(0.0, cpu - gc_cpu) * share
            parts["preempted"] += max(0.0, length - cpu) * share
            busy += overlap
        i += 1
    parts["idle"] = max(0.0, (end - begin) - busy)
    return parts


def bands(passes: Sequence[Pass], lives: Sequence[tuple[float, float]]) -> list[tuple[str, dict]]:
    """The mean life and its mean split (`split_life`, milliseconds) of the median band
    (p45-p55), p90-p99 and the slowest 1 % of ``lives`` ((begin, end) wall pairs)."""
    ordered = sorted(passes)
    starts = [p[0] for p in ordered]
    by_length = sorted(lives, key=lambda life: life[1] - life[0])
    n = len(by_length)
    out = []
    for name, lo, hi in (("p45-p55", 0.45, 0.55), ("p90-p99", 0.90, 0.99), ("slowest 1%", 0.99, 1)):
        band = by_length[int(n * lo) : max(int(n * lo) + 1, int(n * hi))]
        totals = collections.Counter[str]()
        for begin, end in band:
            totals.update(split_life(ordered, starts, begin, end))
        row = {"life": 1000 * statistics.mean(end - begin for begin, end in band)}
        row.update({part: 1000 * totals[part] / len(band) for part in PARTS})
        out.append((name, row))
    return out


def lives_from_log(path: Path) -> list[tuple[float, float]]:
    """Each finished request's (preprocessed, done) wall times, from a JSONL transition log."""
    seen: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for record in read_jsonl(path):
        seen[record["request_id"]][record["dst"]] = record["wall"]
    return [(r["preprocessed"], r["done"]) for r in seen.values() if "done" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("-c", type=int, default=256, help="wrk's keep-alive connections (256)")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--policy", default="kv")
    ap.add_argument("--prefix-repeat", type=int, default=28)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--unpinned",
        action="store_true",
        help="leave the serve, workers and wrk to the kernel on every CPU (the two-core cells "
        "of bench_frontend.py) instead of the serve alone on CPU 0",
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tail-") as tmp_name:
        lives, passes, gcs, done, load = run(a, Path(tmp_name))
    report(a, lives, passes, gcs, done, load)


def run(
    a: argparse.Namespace, tmp: Path
) -> tuple[
    list[tuple[float, float]], list[Pass], list[Collection], dict, tuple[float, float, float]
]:
    """Serve, warm up, then drive ``a.seconds`` of wrk; the requests' lives, the passes, the
    garbage collections, wrk's summary and the load average at the start."""
    with contextlib.ExitStack() as stack:
        log, passes_file, script = tmp / "log.jsonl", tmp / "passes.json", tmp / "chat.lua"
        script.write_text(ab_frontend.WRK_SCRIPT)
        port, pid, wpids = stack.enter_context(
            ab_frontend.cluster(
                a.src,
                a.policy,
                ["--log-transitions", str(log)],
                serve_code=TAIL_SERVE,
                serve_env={"AB_REPORT_FILE": str(passes_file)},
            )
        )
        if not a.unpinned:
            ab_frontend.pin(pid, wpids)
        env = dict(
            os.environ,
            AB_STREAM="0",
            AB_PREFIX_REPEAT=str(a.prefix_repeat),
            AB_MAX_TOKENS=str(a.max_tokens),
        )
        wrk = ["wrk", "-t1", f"-c{a.c}", "--timeout", "60s", "-s"]
        if not a.unpinned:
            wrk = ["taskset", "-c", "1", *wrk]
        url = f"http://127.0.0.1:{port}"
        subprocess.run([*wrk, str(script), "-d2s", url], env=env, capture_output=True, check=True)
        ab_frontend.report(pid, passes_file)  # the warm-up's passes: dropped
        load = os.getloadavg()
        began = time.time()
        out = subprocess.run(
            [*wrk, str(script), f"-d{a.seconds:g}s", url],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        measured = json.loads(ab_frontend.report(pid, passes_file))
        passes = [tuple(p) for p in measured["passes"]]
        gcs = [tuple(c) for c in measured["collections"]]
        lines = [x for x in out.splitlines() if x.startswith("{")]
        done = json.loads(lines[-1])
    # After serve stopped: its sink has written every record.
    return [life for life in lives_from_log(log) if life[0] >= began], passes, gcs, done, load


def report(
    a: argparse.Namespace,
    lives: list[tuple[float, float]],
    passes: list[Pass],
    gcs: list[Collection],
    done: dict,
    load: tuple[float, float, float],
) -> None:
    print(
        f"interlock serve at C={a.c}, {'unpinned' if a.unpinned else 'alone on CPU 0'}, "
        f"{a.seconds:g} s, policy {a.policy}, load average "
        f"{load[0]:.1f}: {done['requests'] / a.seconds:.0f} req/s, {done['errors']} errors, "
        f"{done['non2xx']} non-2xx; wrk p50 {done['p50_us'] / 1000:.1f} ms, p99 "
        f"{done['p99_us'] / 1000:.1f} ms (p99/p50 {done['p99_us'] / max(done['p50_us'], 1):.2f})"
    )
    spans = sorted(end - begin for begin, end in lives)
    p50, p99 = spans[len(spans) // 2], spans[int(len(spans) * 0.99)]
    print(
        f"\n{len(lives)} requests' time in the pipeline (preprocessed -> done): p50 "
        f"{1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms (p99/p50 {p99 / p50:.2f}); mean ms:"
    )
    print("| band | life | " + " | ".join(PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for name, row in bands(passes, lives):
        print(
            f"| {name} | {row['life']:.1f} | " + " | ".join(f"{row[p]:.1f}" for p in PARTS) + " |"
        )
    wall = sum(p[1] for p in passes)
    cpu = sum(p[2] for p in passes)
    gc_cpu = sum(p[3] for p in passes)
    lengths = sorted(p[1] for p in passes)
    print(
        f"\nscheduler passes: {len(passes)}, p50 {1000 * lengths[len(lengths) // 2]:.2f} ms, "
        f"p99 {1000 * lengths[int(len(lengths) * 0.99)]:.1f} ms, longest "
        f"{1000 * lengths[-1]:.1f} ms; in them {cpu:.2f} s CPU ({gc_cpu:.2f} s collecting), "
        f"{wall - cpu:.2f} s preempted"
    )
    requests = max(done["requests"], 1)
    print(
        f"collections: {1e6 * sum(c[1] for c in gcs) / requests:.1f} us of CPU a request "
        f"({len(gcs)} collections, {done['requests']} requests)"
    )
    for generation, name in ((0, "young"), (1, "middle"), (2, "full")):
        mine = [c for c in gcs if c[0] == generation]
        if not mine:
            continue
        times = sorted(1000 * c[1] for c in mine)
        walked = sorted(c[2] for c in mine if c[2] is not None)
        objects = (
            f", objects walked median {walked[len(walked) // 2]:,} [{walked[0]:,}-{walked[-1]:,}]"
            if walked
            else ""
        )
        print(
            f"  {name}: {len(mine)}, CPU median {times[len(times) // 2]:.1f} ms, longest "
            f"{times[-1]:.1f} ms{objects}"
        )


if __name__ == "__main__":
    main()
