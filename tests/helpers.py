"""Small helpers shared by the behaviour tests."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest
import trio

from interlock import Pipeline
from interlock.http import Preprocessor, add_route_parser, add_serve_parser
from interlock.processing import HFTokenizer
from interlock.wire import EngineOutput, PreprocessedRequest

T = TypeVar("T")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/``name``.py, imported as the module ``name`` (benchmarks are scripts, not a
    package); registered in ``sys.modules``, where attrs classes look their module up. The
    benchmarks' folder is on the path while it loads: a benchmark may import a sibling (as
    bench_frontend.py imports bench_engines)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


async def run_request(
    pipeline: Pipeline, request: PreprocessedRequest
) -> tuple[list[int], EngineOutput]:
    """Run ``request`` to its end; return every token received and the final output."""
    tokens: list[int] = []
    final: EngineOutput | None = None
    async for output in pipeline.generate(request):
        assert final is None, "an output arrived after the final one"
        tokens.extend(output.token_ids)
        if output.finish_reason is not None:
            final = output
    assert final is not None, "the stream ended without a final output"
    return tokens, final


#: Qwen3's tokenizer files, in the shared folder beside the checkout.
QWEN3_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "qwen3"


@cache
def qwen3() -> Preprocessor:
    """`Preprocessor.load` of `QWEN3_DIR`, loaded once per run for the tests that only use it
    (a load takes about a second); skips the test where the files are not there."""
    if not (QWEN3_DIR / "tokenizer.json.gz").is_file():
        pytest.skip(f"Qwen3 tokenizer files not found at {QWEN3_DIR}")
    return Preprocessor.load(QWEN3_DIR)


def qwen3_tokenizer() -> HFTokenizer:
    """`qwen3`'s tokenizer."""
    tokenizer = qwen3().tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


def prompt(n: int = 32, start: int = 1) -> list[int]:
    return list(range(start, start + n))


def frontend_parser() -> argparse.ArgumentParser:
    """The ``interlock serve`` and ``interlock route`` commands, on a parser of their own."""
    parser = argparse.ArgumentParser(prog="interlock")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_route_parser(commands)
    return parser


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Return once ``condition()`` holds, checking every 10 ms (of trio time); fail the test
    with `trio.TooSlowError` after ``within`` seconds. For state another task or process
    changes without an event to wait on (a server's counters, a pipeline's membership)."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (no event to wait on: polling is the point)
            await trio.sleep(0.01)


async def stop_processes(processes: list[trio.Process]) -> None:
    """Stop ``processes``, the last started first: SIGTERM (they drain), SIGKILL after 10
    seconds; close their stdout pipes. Shielded, so a failing test still cleans up."""
    with trio.CancelScope(shield=True):
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def side_by_side(*starts: Callable[[], Awaitable[T]], into: list[T]) -> None:
    """Await every one of ``starts`` at once and extend ``into`` with their results, in the
    order given. Processes started side by side wait for one start-up, not one each; a result
    whose sibling failed is added too, so the caller's clean-up stops every process started.
    """
    results: dict[int, T] = {}

    async def one(index: int, start: Callable[[], Awaitable[T]]) -> None:
        results[index] = await start()

    try:
        async with trio.open_nursery() as nursery:
            for index, start in enumerate(starts):
                nursery.start_soon(one, index, start)
    finally:
        into.extend(results[index] for index in sorted(results))
