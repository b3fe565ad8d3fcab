"""The project's own promises: the README's commands, CI running them, a clean lint, and the
public API staying what it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import interlock

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```bash\n(.*?)\n```", text, re.MULTILINE | re.DOTALL)[:2]


def test_readme_starts_with_the_run_and_test_commands() -> None:
    run, test = _readme_commands()
    assert "pip install -e ." in run
    assert "pytest" in test
    head = (ROOT / "README.md").read_text(encoding="utf-8")[:600]
    assert run in head and test in head, "the two commands must open the README"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_ruff_is_clean() -> None:
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    style = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert style.returncode == 0, style.stdout + style.stderr


def test_public_api_is_pinned() -> None:
    assert sorted(interlock.__all__) == sorted(
        [
            "COMBINATION_RULES",
            "ActorCrashed",
            "CombinationRule",
            "Components",
            "ConfigError",
            "EngineError",
            "IllegalTransition",
            "InterlockError",
            "NoWorkersAvailable",
            "Overloaded",
            "Pipeline",
            "PipelineClosed",
            "PipelineConfig",
            "PipelineStats",
            "PrefillFailed",
            "RequestError",
            "SelectionPolicyError",
            "WorkerGone",
            "WorkerRefused",
            "WorkerStalled",
            "__version__",
            "build_pipeline",
        ]
    )
    for name in interlock.__all__:
        assert hasattr(interlock, name)


def test_the_contract_names_import() -> None:
    from interlock import (  # noqa: F401
        Components,
        ConfigError,
        PipelineConfig,
        RequestError,
        build_pipeline,
    )
    from interlock.engines.mock import MockEngine  # noqa: F401
    from interlock.wire import (  # noqa: F401
        EngineOutput,
        PreprocessedRequest,
        RoutingDecision,
        RoutingHints,
    )


def test_the_package_is_typed() -> None:
    assert (ROOT / "interlock" / "py.typed").exists()
