"""The harness on stand-ins for vLLM (no vLLM needed): a killed leader's children are orphans
that survive it and ending the group ends them too; an engine that exits while starting fails
the start with its log; a dead engine is started again on its ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_tier import (
    EngineStartError,
    EngineTier,
    PortPicker,
    VllmEngine,
    group_members,
    kill_groups,
    start_in_group,
    wait_healthy,
)

# Stands in for a vLLM API server: answers GET /health with 200 on the port of its argument,
# after saying so in its log; or, given "fail", logs a reason and exits 3.
STAND_IN = """
import http.server, sys
if sys.argv[2] == "fail":
    print("ValueError: no KV cache memory left", flush=True)
    sys.exit(3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
print("serving", flush=True)
server.serve_forever()
"""

# A leader that maps a /dev/shm segment (as vLLM's processes do), starts a child which ignores
# SIGTERM (as a busy worker may, for a while), then writes the child's pid and the segment's
# name into the FIFO named by its argument, and sleeps.
TREE = """
import subprocess, sys, time
from multiprocessing import shared_memory
segment = shared_memory.SharedMemory(create=True, size=4096)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); "
    "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()  # its SIGTERM handler is in place
with open(sys.argv[1], "w") as fifo:
    fifo.write(f"{child.pid} {segment.name}")
time.sleep(600)
"""


def _start_tree(folder: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start TREE in its own group; block until it names its child; (leader, child pid, the
    leader's shared-memory file)."""
    folder.mkdir()
    fifo = folder / "child.pid"
    os.mkfifo(fifo)
    leader = start_in_group([sys.executable, "-c", TREE, str(fifo)], folder / "tree.log")
    with fifo.open() as reader:  # blocks until the leader opens it; EOF when it closes it
        report = reader.read()
    assert report, (folder / "tree.log").read_text()
    child, segment = report.split()
    return leader, int(child), Path("/dev/shm") / segment.lstrip("/")


def test_a_group_outlives_its_killed_leader_until_the_group_is_killed(tmp_path: Path) -> None:
    leader, child, _ = _start_tree(tmp_path / "tree")
    assert {leader.pid, child} <= set(group_members(leader.pid))
    leader.kill()
    leader.wait()
    assert child in group_members(leader.pid)  # the orphan lives on
    kill_groups([leader.pid])
    assert group_members(leader.pid) == []


def test_killing_a_group_removes_the_shared_memory_it_mapped(tmp_path: Path) -> None:
    leader, _, segment = _start_tree(tmp_path / "tree")
    assert segment.exists()
    kill_groups([leader.pid])
    leader.wait()
    assert not segment.exists()


def test_a_graceful_stop_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    first, first_child, _ = _start_tree(tmp_path / "a")
    second, second_child, _ = _start_tree(tmp_path / "b")
    assert first_child in group_members(first.pid)
    assert second_child in group_members(second.pid)
    kill_groups([first.pid, second.pid], grace=0.5)
    assert group_members(first.pid) == group_members(second.pid) == []
    assert first.wait() != 0 and second.wait() != 0


def test_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    picker = PortPicker()
    ports = [picker.pick() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(picker.low <= port < picker.high for port in ports)


def _stand_in(tmp_path: Path, ports: PortPicker, mode: str = "serve") -> VllmEngine:
    port = ports.pick()
    command = [sys.executable, "-c", STAND_IN, str(port), mode]
    log_path = tmp_path / f"stand-in-{port}.log"
    return VllmEngine(
        start_in_group(command, log_path),
        log_path,
        id=7,
        port=port,
        replay_port=ports.pick(),
        share_path=tmp_path,
        command=command,
        env=dict(os.environ),
    )


def test_an_engine_that_exits_while_starting_fails_the_start_with_its_log(
    tmp_path: Path,
) -> None:
    engine = _stand_in(tmp_path, PortPicker(), mode="fail")
    with pytest.raises(EngineStartError, match="exited with code 3") as failure:
        wait_healthy([engine], deadline=60)
    assert "ValueError: no KV cache memory left" in str(failure.value)
    assert str(engine.log_path) in str(failure.value)


def test_a_killed_engine_is_started_again_on_its_ports_and_stopped_with_the_tier(
    tmp_path: Path,
) -> None:
    ports = PortPicker()
    engine = _stand_in(tmp_path, ports)
    tier = EngineTier((engine,), ports.pick(), tmp_path, tmp_path, ports)
    try:
        wait_healthy([engine], deadline=60)
        assert tier.restart_unhealthy_engines() == []
        first = engine.pgid
        engine.kill()
        assert not engine.healthy()
        assert tier.restart_unhealthy_engines() == [7]
        assert engine.healthy()
        assert engine.pgid != first
        # The same log, appended to.
        assert engine.log_tail().splitlines().count("serving") == 2
    finally:
        tier.stop()
    assert group_members(engine.pgid) == []
