"""``interlock serve`` and ``interlock route`` on the command line."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from helpers import frontend_parser

from interlock.http._cli import resolve_config

# Until interlock/cli.py registers the commands, run them through the same two functions.
_HARNESS = (
    "import argparse, sys\n"
    "from interlock.http import add_route_parser, add_serve_parser\n"
    "p = argparse.ArgumentParser(prog='interlock')\n"
    "s = p.add_subparsers(dest='command', required=True)\n"
    "add_serve_parser(s); add_route_parser(s)\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.run(a))\n"
)


def _command() -> list[str]:
    from interlock import cli

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli.build_parser().parse_args(["serve", "--zero-time"])
    except SystemExit:
        return [sys.executable, "-c", _HARNESS]
    return [sys.executable, "-m", "interlock"]


def _run(argv: list[str]) -> int:
    args = frontend_parser().parse_args(argv)
    return int(args.run(args))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routing", "query_only", "--migration-limit", "2"], "with migration_limit=2"),
        (["--migration-limit", "many"], "migration_limit='many' is not a valid int"),
        (["--router-mode", "kv-aware"], "router_mode='kv-aware' is not one of"),
        (["--router-mode", "direct"], "router_mode='direct' without direct_worker_id"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--tokenizer", "/nonexistent/tokenizer"], "no such file or directory"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)  # fmt: skip
def test_invalid_configuration_exits_non_zero_with_the_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_a_config_file_with_an_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('routing = "discover"\nmigraton_limit = 2\n')
    assert _run(["serve", "--config", str(path)]) == 2
    assert "did you mean 'migration_limit'?" in capsys.readouterr().err


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('router_mode = "random"\nmigration_limit = 1\nrouter_seed = 7\n')
    args = frontend_parser().parse_args(
        ["serve", "--config", str(path), "--migration-limit", "3", "--enforce-disagg"]
    )
    environ = {"INTERLOCK_MIGRATION_LIMIT": "2", "INTERLOCK_ROUTER_SEED": "9"}
    config = resolve_config(args, environ=environ)
    assert config.router_mode == "random"  # file
    assert config.router_seed == 9  # environment over file
    assert config.migration_limit == 3  # flag over environment
    assert config.enforce_disagg is True
    args = frontend_parser().parse_args(["serve", "--log-transitions", "t.jsonl"])
    assert resolve_config(args, environ={}).transition_log_path == "t.jsonl"


def test_every_knob_has_a_flag() -> None:
    from interlock._config import knob_names

    text = frontend_parser().parse_args(["serve"]).__dict__
    for name in knob_names():
        assert f"knob_{name}" in text, f"no flag for knob {name}"


async def _serve_process(*argv: str) -> tuple[trio.Process, str, list[str]]:
    process = await trio.lowlevel.open_process(
        [*_command(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"configuration:" not in buffer or not buffer.endswith(b"\n"):
            chunk = await process.stdout.receive_some(65536)
            assert chunk, f"serve exited early: {buffer.decode()}"
            buffer += chunk
    lines = buffer.decode().splitlines()
    url = lines[0].split("listening on ")[1].split(" ")[0]
    return process, url, lines


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_serve_prints_where_it_listens_serves_and_stops_on_a_signal(stop: int) -> None:
    process, url, banner = await _serve_process(
        "serve", "--port", "0", "--zero-time", "--workers", "3", "--model-name", "tiny"
    )
    try:
        assert url.startswith("http://127.0.0.1:")
        assert any("3 mock workers (ids 1-3)" in line for line in banner)
        assert any(line.strip().startswith("routing") and "'discover'" in line for line in banner)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            body: dict[str, Any] = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and answer.json()["model"] == "tiny"
        process.send_signal(stop)
        with trio.fail_after(30):
            code = await process.wait()
        assert code == 0
        assert process.stderr is not None
        assert b"stopping" in await process.stderr.receive_some(65536)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_cannot_bind_a_taken_port() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = await trio.run_process(
            [*_command(), "serve", "--port", str(port), "--zero-time"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    finally:
        listener.close()
    assert result.returncode == 1
    assert b"cannot listen on 127.0.0.1:" in result.stderr


def test_a_serving_process_leaves_what_it_loaded_out_of_garbage_collections() -> None:
    # In a process of its own: the settings are process-wide.
    script = (
        "import gc\n"
        "from interlock.http._cli import GC_YOUNG_THRESHOLD, tune_gc\n"
        "older = gc.get_threshold()[1:]\n"
        "tune_gc()\n"
        "assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older), gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
