"""docs/inspecting.md shows what its own code prints: the walkthrough's output blocks are the
output of its python block, run the way tests/test_docs.py runs it (virtual time, a fresh
directory).

When the output changes on purpose (a new column, another timing model), rewrite the blocks:
``INTERLOCK_UPDATE_DOCS=1 pytest tests/test_inspect_docs.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

DOC = Path(__file__).resolve().parents[1] / "docs" / "inspecting.md"
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def _walkthrough(text: str) -> tuple[str, list[re.Match[str]]]:
    """The first python block, and the text blocks after it up to the next python block."""
    fences = list(_FENCE.finditer(text))
    first = next(i for i, f in enumerate(fences) if f.group(1) == "python")
    outputs = []
    for fence in fences[first + 1 :]:
        if fence.group(1) == "python":
            break
        if fence.group(1) == "text":
            outputs.append(fence)
    return fences[first].group(2), outputs


def _run(source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> str:
    real_run: Callable[..., Any] = trio.run

    def run_in_virtual_time(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("clock", trio.testing.MockClock(autojump_threshold=0))
        return real_run(fn, *args, **kwargs)

    monkeypatch.setattr(trio, "run", run_in_virtual_time)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(source, str(DOC), "exec"), {"__name__": "__main__"})
    return str(capsys.readouterr().out)


def _split(printed: str, blocks: list[str]) -> list[str]:
    """Cut ``printed`` where each block's first line (its heading) begins."""
    starts = [0]
    for block in blocks[1:]:
        heading = block.splitlines()[0][:12]
        found = printed.find("\n" + heading, starts[-1]) + 1
        assert found > 0, f"no output begins with {heading!r}; edit docs/inspecting.md by hand"
        starts.append(found)
    return [printed[a:b] for a, b in zip(starts, [*starts[1:], len(printed)], strict=True)]


def test_the_walkthrough_shows_the_output_of_its_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    text = DOC.read_text(encoding="utf-8")
    source, outputs = _walkthrough(text)
    assert len(outputs) == 3, "the walkthrough shows the summary, a timeline and a replay"
    shown = "".join(block.group(2) for block in outputs)
    printed = _run(source, monkeypatch, tmp_path, capsys)
    if printed != shown and os.environ.get("INTERLOCK_UPDATE_DOCS"):
        parts = _split(printed, [block.group(2) for block in outputs])
        for block, part in reversed(list(zip(outputs, parts, strict=True))):
            text = text[: block.start(2)] + part + text[block.end(2) :]
        DOC.write_text(text, encoding="utf-8")
        return
    assert printed == shown, (
        "docs/inspecting.md shows output its code no longer prints; if the change is meant, "
        "run INTERLOCK_UPDATE_DOCS=1 pytest tests/test_inspect_docs.py"
    )
