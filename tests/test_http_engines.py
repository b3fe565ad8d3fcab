"""`interlock serve --engine ID=URL[/ROLE] --kv-events-bind ENDPOINT`: the flags, their TOML
form, and the command end to end over `interlock worker --openai-port` processes (interlock's
mock engine behind vLLM's HTTP surface, publishing KV events over ZMQ as vLLM does). The same
command in front of real vLLM processes: tests/engines/test_serve_over_vllm.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from helpers import frontend_parser, stop_processes

from interlock import ConfigError
from interlock.http._cli import EngineAddress, resolve

TIMEOUT = 30.0


def setup_of(*argv: str):  # type: ignore[no-untyped-def]
    return resolve(frontend_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1=http://127.0.0.1:8101", EngineAddress(1, "http://127.0.0.1:8101", "agg")),
        ("2=http://vllm-2:8000/prefill", EngineAddress(2, "http://vllm-2:8000", "prefill")),
        ("3=https://gpu.lan/v/decode", EngineAddress(3, "https://gpu.lan/v", "decode")),
        ("4=http://[::1]:8000/", EngineAddress(4, "http://[::1]:8000", "agg")),
    ],
)
def test_the_engine_flag_grammar(text: str, expected: EngineAddress) -> None:
    parsed = EngineAddress.parse(text)
    assert parsed == expected
    assert EngineAddress.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--engine", "http://127.0.0.1:8101"], "no '=' between the engine id and its URL"),
        (["--engine", "x=http://127.0.0.1:8101"], "the engine id 'x' is not a whole number"),
        (["--engine", "1=127.0.0.1:8101"], "does not start with http:// or https://"),
        (
            ["--engine", "1=http://a:1", "--engine", "1=http://b:1"],
            "id 1 is taken by --engine 1=http://a:1/agg",
        ),
        (["--workers", "2", "--engine", "2=http://a:1"], "id 2 is taken by in-process mock"),
        (["--engine", "1=http://a:1", "--engine", "2=http://a:1"], "both point at http://a:1"),
        (["--engine", "1=http://a:1/prefill"], "nothing could serve the decode legs"),
        (["--engine", "1=http://a:1", "--kv-events-bind", "127.0.0.1:5557"], "ZMQ endpoint"),
        (["--engine", "1=http://a:1", "--kv-replay", "1=tcp://a:1"], "needs --kv-events-bind"),
        (
            [
                "--engine",
                "1=http://a:1",
                "--kv-events-bind",
                "tcp://a:1",
                "--kv-replay",
                "2=tcp://a:2",
            ],
            "no --engine has id 2",
        ),
    ],
)
def test_bad_engine_flags_are_refused_before_anything_starts(argv: list[str], why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        setup_of(*argv)
    assert why in str(caught.value)


def test_engines_mix_with_mock_and_remote_workers_by_role() -> None:
    setup = setup_of(
        "--workers",
        "1",
        "--remote-worker",
        "2=127.0.0.1:7002",
        "--engine",
        "3=http://127.0.0.1:8103",
        "--engine",
        "4=http://127.0.0.1:8104/prefill",
        "--kv-events-bind",
        "tcp://127.0.0.1:5557",
        "--kv-replay",
        "3=tcp://127.0.0.1:5563",
    )
    workers, prefill = setup.engines()
    assert [(w.instance_id, type(w).__name__) for w in workers] == [
        (1, "MockEngine"),
        (2, "RemoteEngine"),
        (3, "OpenAIEngine"),
    ]
    assert [(w.instance_id, w.role) for w in prefill] == [(4, "prefill")]
    # With a prefill engine, the mock worker serves decode legs.
    assert workers[0].role == "decode"
    assert setup.kv_replay == {3: "tcp://127.0.0.1:5563"}


def test_engines_default_the_mock_workers_to_none() -> None:
    assert setup_of("--engine", "1=http://127.0.0.1:8101").workers == 0


def test_the_toml_workers_table_holds_the_same_flags(tmp_path: Path) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text(
        'router_mode = "kv"\nkv_block_size = 32\n\n'
        "[workers]\n"
        'engines = ["1=http://127.0.0.1:8101", "2=http://127.0.0.1:8102/decode"]\n'
        'kv_events_bind = "tcp://127.0.0.1:5557"\n'
        'kv_replay = ["1=tcp://127.0.0.1:5561"]\n'
    )
    setup = setup_of("--config", str(config))
    assert setup.config.router_mode == "kv"
    assert [str(e) for e in setup.openai_engines] == [
        "1=http://127.0.0.1:8101/agg",
        "2=http://127.0.0.1:8102/decode",
    ]
    assert setup.kv_events_bind == "tcp://127.0.0.1:5557"
    assert setup.kv_replay == {1: "tcp://127.0.0.1:5561"}
    # A flag wins over the file, key by key.
    flagged = setup_of("--config", str(config), "--engine", "7=http://127.0.0.1:8107")
    assert [e.worker_id for e in flagged.openai_engines] == [7]
    assert flagged.kv_events_bind == "tcp://127.0.0.1:5557"
    # The file's replay endpoints were its own engines': not attached to another server.
    assert flagged.kv_replay == {}


def test_a_typo_in_the_workers_table_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text('[workers]\nengine = ["1=http://127.0.0.1:8101"]\n')
    with pytest.raises(ConfigError, match="unknown key 'engine' in \\[workers\\]; did you mean"):
        setup_of("--config", str(config))


# -- end to end ----------------------------------------------------------------------------


def _free_tcp_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


async def _start(argv: list[str], log: Path) -> tuple[trio.Process, str]:
    """Start ``python -m interlock ARGV``; return it with its first stdout line."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    text = b""
    with trio.fail_after(TIMEOUT):
        while b"\n" not in text:
            chunk = await process.stdout.receive_some(65536)
            assert chunk, f"{argv[0]} exited early:\n{log.read_text()}"  # noqa: ASYNC240
            text += chunk
    return process, text.decode().splitlines()[0]


@asynccontextmanager
async def serving_over_engines(tmp_path: Path, *serve_flags: str) -> AsyncIterator[str]:
    """Two `interlock worker --openai-port 0` engines publishing KV events to an endpoint that
    `interlock serve --engine ... --kv-events-bind` binds; yields serve's URL."""
    bind = _free_tcp_endpoint()
    processes: list[trio.Process] = []
    try:
        infos: dict[int, dict[str, Any]] = {}

        async def worker(worker_id: int) -> None:
            process, line = await _start(
                [
                    "worker",
                    "--id",
                    str(worker_id),
                    "--openai-port",
                    "0",
                    "--zero-time",
                    "--tokenizer",
                    "builtin",
                    "--kv-events-endpoint",
                    bind,
                    "--kv-events-replay",
                    "tcp://127.0.0.1:*",
                    "--log-level",
                    "warning",
                ],
                tmp_path / f"worker-{worker_id}.log",
            )
            processes.append(process)
            infos[worker_id] = json.loads(line)

        # The workers start side by side: one start-up's wait instead of two.
        async with trio.open_nursery() as nursery:
            for worker_id in (1, 2):
                nursery.start_soon(worker, worker_id)
        engines = [infos[worker_id] for worker_id in (1, 2)]
        argv = ["serve", "--port", "0", "--kv-events-bind", bind, *serve_flags]
        for info in engines:
            argv += ["--engine", f"{info['worker_id']}={info['openai_url']}"]
            if info.get("kv_events_replay"):
                argv += ["--kv-replay", f"{info['worker_id']}={info['kv_events_replay']}"]
        process, line = await _start(argv, tmp_path / "serve.log")
        processes.append(process)
        yield line.split("listening on ")[1].split(" ")[0]
    finally:
        await stop_processes(processes)


async def router_blocks(http: httpx.AsyncClient, worker: int) -> float:
    """The blocks serve's router indexes for ``worker`` (its ``/metrics``)."""
    metrics = (await http.get("/metrics")).text
    found = re.search(
        rf'^interlock_router_kv_blocks\{{worker_id="{worker}"\}} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


async def warm_up(http: httpx.AsyncClient) -> dict[int, float]:
    """Send workers 1 and 2 fresh prompts until serve's router has seen each one's KV events;
    the blocks indexed for each then. A worker's publisher connects to serve's
    --kv-events-bind on its own schedule (ZMQ reconnects), and what it publishes before then
    is lost."""
    baseline: dict[int, float] = {}
    with trio.fail_after(TIMEOUT):
        for worker in (1, 2):
            attempt = 0
            while await router_blocks(http, worker) == 0:
                attempt += 1
                warm = await http.post(
                    "/v1/completions",
                    json={
                        "model": "mock",
                        "prompt": f"warm-up {worker}.{attempt} " * 10,
                        "max_tokens": 1,
                        "nvext": {"backend_instance_id": worker},
                    },
                )
                assert warm.status_code == 200, warm.text
                with trio.move_on_after(1):
                    while await router_blocks(http, worker) == 0:  # noqa: ASYNC110 (polled)
                        await trio.sleep(0.05)
            baseline[worker] = await router_blocks(http, worker)
    return baseline


async def test_serve_routes_on_the_engines_kv_events_end_to_end(tmp_path: Path) -> None:
    flags = ["--router-mode", "kv", "--router-temperature", "0", "--model-name", "mock"]
    flags += ["--allow-request-worker-ids"]  # the warm-up below sends to each worker
    async with serving_over_engines(tmp_path, *flags) as url:
        system = "You are a railway signalling assistant. " * 30

        def ask(turn: int) -> tuple[int, int]:
            with openai.OpenAI(
                base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT
            ) as client:
                answer = client.chat.completions.create(
                    model="mock",
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question {turn}"},
                    ],
                    max_tokens=4,
                    extra_body={"nvext": {"extra_fields": ["worker_id"]}},
                )
                worker = answer.model_extra["nvext"]["worker_id"]["decode_worker_id"]
                details = answer.usage.prompt_tokens_details
                return worker, details.cached_tokens if details is not None else 0

        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            baseline = await warm_up(http)
            owner, _ = await trio.to_thread.run_sync(ask, 0)
            with trio.fail_after(TIMEOUT):
                while await router_blocks(http, owner) < baseline[owner] + 40:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        for turn in (1, 2, 3):
            worker, cached = await trio.to_thread.run_sync(ask, turn)
            assert worker == owner
            assert cached >= 40 * 16


async def test_a_cache_salt_reaches_the_engines_and_keys_their_blocks_end_to_end(
    tmp_path: Path,
) -> None:
    # interlock serve --engine over interlock workers serving vLLM's surface: the salt is
    # checked (400), sent to the engine (whose cache keeps a tenant's blocks to itself), and
    # its blocks come back in the engine's KV events under the salt, where only that tenant's
    # requests find them.
    flags = ["--router-mode", "kv", "--router-temperature", "0", "--model-name", "mock"]
    flags += ["--allow-request-worker-ids"]
    async with serving_over_engines(tmp_path, *flags) as url:
        system = "You are a railway signalling assistant. " * 30
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            baseline = await warm_up(http)

            async def ask(turn: int, salt: str | None, **nvext: Any) -> tuple[int, int]:
                body: dict[str, Any] = {
                    "model": "mock",
                    "prompt": f"{system} question {turn}",
                    "max_tokens": 2,
                    "nvext": {"extra_fields": ["worker_id"], **nvext},
                }
                if salt is not None:
                    body["cache_salt"] = salt
                answer = await http.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                data = answer.json()
                details = data["usage"].get("prompt_tokens_details") or {}
                worker = data["nvext"]["worker_id"]["decode_worker_id"]
                return worker, details.get("cached_tokens") or 0

            bad = await http.post(
                "/v1/completions", json={"model": "mock", "prompt": "x", "cache_salt": ""}
            )
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
            owner, _ = await ask(0, "tenant-a")
            with trio.fail_after(TIMEOUT):
                while await router_blocks(http, owner) < baseline[owner] + 40:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            # The same tokens without the salt, on the engine that holds them salted: its
            # cache does not share them.
            worker, cached = await ask(1, None, backend_instance_id=owner)
            assert worker == owner and cached == 0
            for turn in (2, 3):
                worker, cached = await ask(turn, "tenant-a")
                assert worker == owner
                assert cached >= 40 * 16
            _, cached = await ask(4, "tenant-b")
            assert cached == 0


def test_the_configuration_file_in_the_engines_docs_is_valid(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "engines.md"
    blocks = re.findall(r"^```toml\n(.*?)^```", page.read_text(), re.M | re.S)
    assert blocks, "docs/engines.md shows a configuration file"
    for number, block in enumerate(blocks):
        config = tmp_path / f"example-{number}.toml"
        config.write_text(block)
        setup = setup_of("--config", str(config))
        assert setup.openai_engines
        assert setup.kv_events_bind is not None
