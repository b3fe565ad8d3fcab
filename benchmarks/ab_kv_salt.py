"""Block hashing with and without a salt, against another revision's hashing, in one run.

Run from the repository root::

    python benchmarks/ab_kv_salt.py [--base main] [--rounds 7] [--repeats 15]

Loads ``interlock/kv/_hashing.py`` of ``--base`` (``git show``; the module imports nothing of
interlock's) beside this checkout's, and times, in alternating rounds, the unsalted hashing of
both (``compute_block_hashes`` over a list, ``iter_block_hashes`` over tokenizer output consumed
to the end) and this checkout's salted hashing (a LoRA adapter's / ``cache_salt`` request's).
Prints per prompt length the median of the rounds' medians, and two ratios measured in the same
run: this checkout's unsalted time over the base's (the contract's fast paths must not regress:
about 1.00) and salted over unsalted (what a salt costs: one more xxh3 of 16 bytes a prompt).
No assertions; the box is shared, so only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_kv import median_seconds  # noqa: E402

from interlock.kv import _hashing as ours  # noqa: E402

PROMPT_TOKENS = (1_024, 32_768, 100_000)
BLOCK_SIZE = 16


def load_base(
    rev: str, folder: Path, path: str = "interlock/kv/_hashing.py", name: str = "base_hashing"
) -> ModuleType:
    """The module at ``path`` as it is at ``rev``, imported as ``name`` (written to
    ``folder``); a dotted ``name`` inside interlock's package resolves relative imports."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered, so that pickle finds what the module names (its functions, its classes).
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cases(
    module: ModuleType, tokens: list[int], salt: int | None
) -> dict[str, Callable[[], object]]:
    trusted = module.trust_u32(tokens)
    extra = () if salt is None else (salt,)
    return {
        "compute": lambda: module.compute_block_hashes(tokens, BLOCK_SIZE, *extra),
        "iter": lambda: sum(1 for _ in module.iter_block_hashes(trusted, BLOCK_SIZE, *extra)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = random.Random(0)
    salt = ours.kv_salt("sql-adapter", "tenant-a")
    with tempfile.TemporaryDirectory() as folder:
        base = load_base(args.base, Path(folder))
        print(f"ms, median of {args.rounds} alternating rounds of {args.repeats}; base {args.base}")
        print(
            f"{'prompt':>7} {'path':>8} {'base':>8} {'ours':>8} {'salted':>8} {'ours/base':>9} "
            f"{'salt/ours':>9}"
        )
        for n in PROMPT_TOKENS:
            tokens = [rng.randrange(150_000) for _ in range(n)]
            variants = {
                "base": cases(base, tokens, None),
                "ours": cases(ours, tokens, None),
                "salted": cases(ours, tokens, salt),
            }
            assert variants["ours"]["compute"]() == variants["base"]["compute"]()
            for path in ("compute", "iter"):
                times: dict[str, list[float]] = {name: [] for name in variants}
                for round_ in range(args.rounds):
                    order = list(variants)
                    if round_ % 2:
                        order.reverse()
                    for name in order:
                        times[name].append(median_seconds(variants[name][path], args.repeats))
                m = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                print(
                    f"{n:>7} {path:>8} {m['base']:>8.3f} {m['ours']:>8.3f} {m['salted']:>8.3f} "
                    f"{m['ours'] / m['base']:>9.2f} {m['salted'] / m['ours']:>9.2f}"
                )


if __name__ == "__main__":
    main()
