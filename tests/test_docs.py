"""Every Python example in README.md and docs/ runs, and the generated pages are current."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from interlock._docs import GENERATED

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _examples() -> list[Any]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for number, match in enumerate(_BLOCK.finditer(text), start=1):
            line = text.count("\n", 0, match.start()) + 2
            found.append(
                pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}#{number}")
            )
    return found


@pytest.mark.parametrize("source", _examples())
def test_example_runs(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    # Examples call trio.run like any program would; here they run in virtual time, so a mock
    # cluster's simulated seconds cost nothing and the output is the same on every machine.
    real_run: Callable[..., Any] = trio.run

    def run_in_virtual_time(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("clock", trio.testing.MockClock(autojump_threshold=0))
        return real_run(fn, *args, **kwargs)

    monkeypatch.setattr(trio, "run", run_in_virtual_time)
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "<docs example>", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_page_is_current(name: str) -> None:
    committed = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert committed == GENERATED[name](), (
        f"docs/{name} is stale: run `python -m interlock docs --write docs/`"
    )
