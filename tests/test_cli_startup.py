"""The ``interlock`` command imports only what the command it runs needs: a worker process (the
suite starts hundreds) never imports the HTTP server, the log inspector, the replayer or httpx,
and each command parses exactly as it does in the whole parser."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from interlock import cli


def _help(parser_command: str | None, command: str) -> str:
    """``interlock COMMAND --help`` from ``cli.build_parser(parser_command)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.build_parser(parser_command).parse_args([command, "--help"])
    assert done.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("command", list(cli._COMMANDS))
def test_a_command_alone_parses_as_in_the_whole_parser(command: str) -> None:
    assert _help(command, command) == _help(None, command)


def test_the_whole_parser_lists_every_command_in_order() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "{serve,route,demo,config,docs,inspect,worker,register,replay}" in out.getvalue()


def test_an_unknown_command_is_refused_naming_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["servee"])
    assert done.value.code == 2
    assert "invalid choice: 'servee' (choose from 'serve', 'route'," in capsys.readouterr().err


def test_a_worker_imports_only_what_a_worker_needs() -> None:
    script = (
        "import sys\n"
        "from interlock import cli\n"
        "cli.build_parser('worker').parse_args(['worker', '--id', '1'])\n"
        "heavy = ('interlock.http', 'interlock.inspect', 'interlock.replay', 'httpx', 'pytest')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
