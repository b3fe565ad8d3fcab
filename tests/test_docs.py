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
from interlock.http import HttpMetrics

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


def test_every_metric_family_served_is_in_the_operations_metrics_table() -> None:
    # docs/operations.md, "Metrics": "`GET /metrics` serves these families"; a family missing
    # from the table is one an operator cannot find (or alert on) from the docs.
    text = HttpMetrics().render().decode()
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    page = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name, kind in families
        if f"`{name}_total" not in table and f"`{name}`" not in table and f"`{name}{{" not in table
    ]
    assert not missing, f"/metrics families not in docs/operations.md's table: {missing}"
