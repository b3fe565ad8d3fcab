"""Every example in docs/http.md and docs/route-api.md runs against a served instance.

The ``python`` blocks run in tests/test_docs.py (in virtual time). The blocks here need a real
server: ``py`` blocks (the ``openai`` client) run in a thread, ``bash`` blocks run in bash with
``localhost:8000`` / ``localhost:8001`` pointing at the server; blocks that start a server
(``interlock serve``, ``interlock route --port``) are the ones not run, since they serve forever.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio
from test_http_cli import _command
from test_http_harness import serving

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "http.md", ROOT / "docs" / "route-api.md"]
_BLOCK = re.compile(r"^```(py|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(kind: str, *pages: Path) -> list[str]:
    found = []
    for page in pages or PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            if match.group(1) != kind:
                continue
            source = match.group(2)
            if kind == "bash" and ("interlock serve" in source or "route --port" in source):
                continue
            found.append(source)
    return found


def _point_at(source: str, url: str) -> str:
    return source.replace("http://localhost:8000", url).replace("http://localhost:8001", url)


@pytest.mark.parametrize("source", _blocks("py"))
async def test_py_example_runs(source: str) -> None:
    async with serving(route_api=True) as served:
        code = compile(_point_at(source, served.url), "<docs example>", "exec")
        await trio.to_thread.run_sync(exec, code, {"__name__": "__main__"})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
async def test_bash_examples_run(page: Path) -> None:
    # A page's blocks run in order against one server: later ones may use earlier ones'
    # results (a booking, then its release).
    command = _command()
    if command[1] == "-c":  # `interlock` runs this checkout's command line
        function = 'interlock() { "$INTERLOCK_PY" -c "$INTERLOCK_CODE" "$@"; }\n'
        env = {**os.environ, "INTERLOCK_PY": command[0], "INTERLOCK_CODE": command[2]}
    else:
        function = 'interlock() { "$INTERLOCK_PY" -m interlock "$@"; }\n'
        env = {**os.environ, "INTERLOCK_PY": command[0]}
    async with serving(route_api=True) as served:
        for source in _blocks("bash", page):
            script = function + "set -e\n" + _point_at(source, served.url)
            result = await trio.run_process(
                ["bash", "-c", script],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
            output = result.stdout.decode()
            assert result.returncode == 0, result.stderr.decode() + output
            assert output.strip(), f"the example printed nothing:\n{source}"
            assert '"error"' not in output, f"{source}\n{output}"


def test_the_pages_have_examples() -> None:
    assert len(_blocks("py")) >= 1
    assert len(_blocks("bash")) >= 4
