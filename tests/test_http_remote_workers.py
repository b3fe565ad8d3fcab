"""``interlock serve --remote-worker``: the HTTP frontend over ``interlock worker`` processes.

The flag's grammar and every error message are checked without processes. The rest starts real
processes on 127.0.0.1 with the real clock: two workers (``--tokenizer builtin``, so that the
frontend's default byte tokenizer decodes their tokens), then ``interlock serve`` over them,
and talks to it with the official ``openai`` client and httpx. Every wait is bounded by
``trio.fail_after``; every process is killed in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from helpers import frontend_parser
from test_http_cli import _command, _run
from test_remote_workers import WorkerProcess, start_worker, stop

from interlock import ConfigError
from interlock.engines.mock import MOCK_TEXT, MockEngine, mock_token_pool
from interlock.engines.remote import RemoteEngine
from interlock.engines.remote._cli import add_arguments, build_engine
from interlock.http import _cli as serve_cli
from interlock.http._cli import REMOTE_WORKER_FORM, RemoteWorkerAddress, banner, resolve
from interlock.processing import ByteTokenizer, TokenizerError

TIMEOUT = 20

# -- the flag, without processes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1=127.0.0.1:7001", RemoteWorkerAddress(1, "127.0.0.1", 7001, "agg")),
        ("0=localhost:1/agg", RemoteWorkerAddress(0, "localhost", 1, "agg")),
        ("3=worker-3.lan:65535/prefill", RemoteWorkerAddress(3, "worker-3.lan", 65535, "prefill")),
        ("12=[::1]:7002/decode", RemoteWorkerAddress(12, "::1", 7002, "decode")),
    ],
)  # fmt: skip
def test_the_flag_grammar(text: str, expected: RemoteWorkerAddress) -> None:
    parsed = RemoteWorkerAddress.parse(text)
    assert parsed == expected
    assert RemoteWorkerAddress.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.1:7001", "no '=' between the worker id and the address"),
        ("one=127.0.0.1:7001", "the worker id 'one' is not a whole number"),
        ("-1=127.0.0.1:7001", "the worker id '-1' is not a whole number"),
        ("=127.0.0.1:7001", "the worker id '' is not a whole number"),
        ("1=127.0.0.1", "no ':PORT' in the address '127.0.0.1'"),
        ("1=[::1]", "no ':PORT' in the address '[::1]'"),
        ("1=:7001", "no host before ':7001'"),
        ("1=::1:7001", "an IPv6 host goes in brackets: 1=[::1]:7001"),
        ("1=127.0.0.1:7001/teacher", "the role 'teacher' is not agg, prefill or decode"),
        ("1=127.0.0.1:7001/", "the role '' is not agg, prefill or decode"),
    ],
)  # fmt: skip
def test_a_malformed_item_is_quoted_with_the_form(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RemoteWorkerAddress.parse(text)
    message = str(caught.value)
    assert message.startswith(f"--remote-worker {text!r}: {why}")
    assert REMOTE_WORKER_FORM in message and "e.g. 1=127.0.0.1:7001" in message


@pytest.mark.parametrize("port", ["0", "65536", "http", "", "7001 "])
def test_a_bad_port_names_the_flag(port: str) -> None:
    text = f"1=127.0.0.1:{port}"
    with pytest.raises(ConfigError, match="is not a whole number 1-65535") as caught:
        RemoteWorkerAddress.parse(text)
    assert str(caught.value).startswith(f"--remote-worker {text!r}: the port {port!r}")


_TAKEN = "is taken by in-process mock"
_BAD_REMOTE_WORKERS = [
    (
        ["--workers", "4", "--remote-worker", "1=h:7001"],
        f"--remote-worker '1=h:7001': worker id 1 {_TAKEN} worker 1 (--workers 4",
    ),
    (
        ["--workers", "2", "--remote-worker", "2=h:7001"],
        f"worker id 2 {_TAKEN} worker 2 (--workers 2 and --prefill-workers 0 take ids 1-2)",
    ),
    (
        ["--workers", "2", "--prefill-workers", "1", "--remote-worker", "3=h:7001"],
        f"worker id 3 {_TAKEN} prefill worker 3 (--workers 2 and --prefill-workers 1 take "
        "ids 1-2, prefill workers ids 3-3); start the remote worker with another --id",
    ),
    (
        ["--remote-worker", "1=h:7001", "--remote-worker", "1=h:7002"],
        "--remote-worker '1=h:7001' and '1=h:7002' both have worker id 1; every worker needs "
        "its own id",
    ),
    (
        ["--remote-worker", "1=h:7001", "--remote-worker", "2=h:7001/prefill"],
        "--remote-worker '1=h:7001' and '2=h:7001/prefill' both point at h:7001",
    ),
    (
        ["--remote-worker", "1=h:7001/prefill"],
        "every --remote-worker is a prefill worker and --workers is 0",
    ),
    (["--workers", "0"], "--workers must be at least 1 (or give --remote-worker ID=HOST:PORT)"),
    (["--workers", "-1", "--remote-worker", "1=h:7001"], "--workers must be at least 0, got -1"),
    (["--remote-worker", "1=h:0"], "--remote-worker '1=h:0': the port '0' is not a whole number"),
    (
        ["--remote-worker", "1=h:7001/teacher"],
        f"the role 'teacher' is not agg, prefill or decode; the form is {REMOTE_WORKER_FORM}",
    ),
]


@pytest.mark.parametrize(("argv", "message"), _BAD_REMOTE_WORKERS)
def test_bad_remote_workers_are_refused_before_anything_starts(
    argv: list[str], message: str
) -> None:
    for command in ("serve", "route"):
        with pytest.raises(ConfigError) as caught:
            resolve(frontend_parser().parse_args([command, *argv]))
        assert message in str(caught.value)


@pytest.mark.parametrize("command", ["serve", "route"])
def test_a_bad_remote_worker_exits_with_status_2(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run([command, "--remote-worker", "1=127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"interlock {command}: invalid configuration: --remote-worker ")


def test_workers_default_to_4_alone_and_to_0_with_remote_workers() -> None:
    assert resolve(frontend_parser().parse_args(["serve"])).workers == 4
    setup = resolve(frontend_parser().parse_args(["serve", "--remote-worker", "1=h:7001"]))
    assert setup.workers == 0
    assert setup.remote_workers == (RemoteWorkerAddress(1, "h", 7001),)


def test_the_engines_mix_mock_and_remote_workers_by_role() -> None:
    argv = ["serve", "--workers", "2", "--kv-block-size", "32", "--zero-time"]
    argv += ["--remote-worker", "7=10.0.0.7:7007/prefill", "--remote-worker", "5=h5:7005/decode"]
    argv += ["--remote-worker", "0=[::1]:7000"]
    setup = resolve(frontend_parser().parse_args(argv))
    workers, prefill = setup.engines()
    assert [(type(e), e.instance_id, e.role) for e in workers] == [
        (MockEngine, 1, "decode"),  # a prefill worker exists, so the mocks serve decode legs
        (MockEngine, 2, "decode"),
        (RemoteEngine, 5, "decode"),
        (RemoteEngine, 0, "agg"),
    ]
    assert [(type(e), e.instance_id, e.role) for e in prefill] == [(RemoteEngine, 7, "prefill")]
    remote = [e for e in (*workers, *prefill) if isinstance(e, RemoteEngine)]
    assert [(e.host, e.port) for e in remote] == [("h5", 7005), ("::1", 7000), ("10.0.0.7", 7007)]
    # The handshake checks each worker's --block-size against the frontend's kv_block_size.
    assert {e.block_size for e in remote} == {32}
    text = banner(setup, "http://127.0.0.1:1")
    assert "2 mock workers (ids 1-2); zero-time steps" in text
    assert "remote       worker 7 at 10.0.0.7:7007 (prefill), connected" in text
    assert "worker 0 at [::1]:7000 (agg), connected" in text


def test_each_remote_worker_gets_the_connect_timeout_and_it_must_be_positive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--remote-worker", "1=h:7001", "--remote-worker", "2=h:7002/prefill"]
    assert resolve(frontend_parser().parse_args(argv)).worker_connect_timeout == 10
    setup = resolve(frontend_parser().parse_args([*argv, "--worker-connect-timeout", "2.5"]))
    workers, prefill = setup.engines()
    assert [e.connect_timeout for e in (*workers, *prefill) if isinstance(e, RemoteEngine)] == [
        2.5,
        2.5,
    ]
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exited:
            frontend_parser().parse_args([*argv, "--worker-connect-timeout", bad])
        assert exited.value.code == 2
        assert (
            f"argument --worker-connect-timeout: must be a positive number, got {bad!r}"
            in capsys.readouterr().err
        )


def test_the_mock_text_lives_in_the_mock_package() -> None:
    assert serve_cli.mock_token_pool is mock_token_pool and serve_cli.MOCK_TEXT is MOCK_TEXT


def _worker_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--id", "1", *argv])


def test_the_worker_generates_the_words_of_its_tokenizer() -> None:
    tokenizer = ByteTokenizer()
    engine = build_engine(_worker_args("--tokenizer", "builtin"))
    assert engine.token_pool == tuple(mock_token_pool(tokenizer))
    assert engine.vocab_size == tokenizer.vocab_size and engine.tokenizer is not None
    plain = build_engine(_worker_args())
    assert plain.token_pool is None and plain.vocab_size == 32_000 and plain.tokenizer is None
    with pytest.raises(TokenizerError, match="no such file or directory"):
        build_engine(_worker_args("--tokenizer", "/nonexistent/tokenizer"))


@pytest.mark.parametrize("command", ["serve", "route"])
def test_serve_and_route_take_the_builtin_tokenizer_as_the_worker_does(
    command: str, tmp_path: Path
) -> None:
    # One spelling for the byte tokenizer on every command: `--tokenizer builtin` is the
    # frontend's default, named (a worker started with it matches the frontend).
    default = resolve(frontend_parser().parse_args([command])).preprocessor
    named = resolve(frontend_parser().parse_args([command, "--tokenizer", "builtin"]))
    assert type(named.preprocessor.tokenizer) is ByteTokenizer
    assert named.preprocessor.source == default.source
    assert named.preprocessor.chat_template == default.chat_template
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    argv = [command, "--tokenizer", "builtin", "--chat-template", str(template)]
    templated = resolve(frontend_parser().parse_args(argv)).preprocessor
    assert templated.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    # A directory named builtin is still reachable as a path.
    with pytest.raises(TokenizerError, match="no such file or directory"):
        resolve(frontend_parser().parse_args([command, "--tokenizer", "./builtin"]))


# -- real processes ----------------------------------------------------------------------------


@attrs.define
class Serve:
    """An ``interlock serve`` process, where it listens, and its stderr."""

    process: trio.Process
    url: str
    banner: list[str]
    log: Path

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT)


@asynccontextmanager
async def serving_over(
    tmp_path: Path, worker_flags: list[str], *serve_flags: str
) -> AsyncIterator[tuple[Serve, dict[int, WorkerProcess]]]:
    """Workers 1 and 2 with ``worker_flags``, and ``interlock serve`` over them; everything
    stopped (killed if need be) at the end."""
    workers: dict[int, WorkerProcess] = {}
    process: trio.Process | None = None

    async def one(worker_id: int) -> None:
        workers[worker_id] = await start_worker(tmp_path, worker_id, *worker_flags)

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for worker_id in (1, 2):
                    nursery.start_soon(one, worker_id)
            remote = [f"{w}=127.0.0.1:{workers[w].port}" for w in (1, 2)]
            argv = ["serve", "--port", "0", *serve_flags]
            for item in remote:
                argv += ["--remote-worker", item]
            log = tmp_path / "serve.log"
            with log.open("wb") as stderr:
                process = await trio.lowlevel.open_process(
                    [*_command(), *argv], stdout=subprocess.PIPE, stderr=stderr
                )
            assert process.stdout is not None
            text = b""
            while b"configuration:\n" not in text:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, f"serve exited early:\n{text.decode()}\n{log.read_text()}"
                text += chunk
        lines = text.decode().splitlines()
        url = lines[0].split("listening on ")[1].split(" ")[0]
        yield Serve(process, url, lines, log), workers
    finally:
        with trio.CancelScope(shield=True):
            if process is not None:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
            for worker in workers.values():
                await stop(worker)


CHAT: dict[str, Any] = {
    "model": "mock",
    "messages": [{"role": "user", "content": "Tell me about the river."}],
}


async def _worker_of_stream(client: httpx.AsyncClient) -> int:
    """The one worker /metrics shows routing decisions for."""
    metrics = (await client.get("/metrics")).text
    routed = re.findall(
        r'^interlock_worker_routed_requests_total\{[^}]*worker_id="(\d+)"[^}]*\} ([0-9.]+)$',
        metrics,
        re.MULTILINE,
    )
    ids = {int(worker_id) for worker_id, count in routed if float(count) > 0}
    assert len(ids) == 1, metrics
    return ids.pop()


async def test_serve_answers_over_two_remote_workers_and_spreads_the_requests(
    tmp_path: Path,
) -> None:
    flags = ["--zero-time", "--tokenizer", "builtin", "--log-level", "warning"]
    async with serving_over(tmp_path, flags, "--router-mode", "round_robin") as (serve, workers):
        assert not any("mock workers" in line for line in serve.banner)
        for worker_id in (1, 2):
            port = workers[worker_id].port
            assert any(f"worker {worker_id} at 127.0.0.1:{port} (agg)" in x for x in serve.banner)

        def with_the_openai_client() -> tuple[Any, str, Any]:
            with openai.OpenAI(
                base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT
            ) as client:
                extra = {"ignore_eos": True}
                whole = client.chat.completions.create(**CHAT, max_tokens=12, extra_body=extra)
                streamed = ""
                for chunk in client.chat.completions.create(
                    **CHAT, max_tokens=12, stream=True, extra_body=extra
                ):
                    if chunk.choices:
                        streamed += chunk.choices[0].delta.content or ""
                return whole, streamed, client.models.list()

        with trio.fail_after(TIMEOUT):
            whole, streamed, models = await trio.to_thread.run_sync(with_the_openai_client)
            answer = whole.choices[0].message.content
            assert answer and whole.choices[0].finish_reason == "length"
            assert whole.usage is not None and whole.usage.completion_tokens == 12
            # The workers drew from the frontend tokenizer's words, so the text decodes to them.
            assert set(answer) <= set(MOCK_TEXT), answer
            assert streamed == answer  # the mock is deterministic, wherever it runs
            assert [m.id for m in models.data] == ["mock"]

            async with serve.client() as client:
                served_by = []
                for n in range(4):
                    body = CHAT | {
                        "messages": [{"role": "user", "content": f"Question number {n}?"}],
                        "max_tokens": 3,
                        "nvext": {"extra_fields": ["worker_id"]},
                    }
                    reply = (await client.post("/v1/chat/completions", json=body)).json()
                    served_by.append(reply["nvext"]["worker_id"]["decode_worker_id"])
                health = (await client.get("/health")).json()
                metrics = (await client.get("/metrics")).text
            assert sorted(served_by) == [1, 1, 2, 2]  # round robin over both
            assert health["status"] == "healthy" and health["workers"] == [1, 2]
            for worker_id in (1, 2):
                assert f'worker_id="{worker_id}"' in metrics

            # The worker processes themselves ran the requests: their caches hold the prompts.
            async with trio.open_nursery() as nursery:
                for worker_id in (1, 2):
                    engine = workers[worker_id].engine()
                    await nursery.start(engine.run)
                    snapshot = await engine.snapshot()
                    assert snapshot.worker_id == worker_id and snapshot.kv_blocks
                nursery.cancel_scope.cancel()

            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


async def test_a_killed_remote_worker_is_migrated_from_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    # Timed workers, so the stream is still running when its worker dies.
    flags = ["--speedup", "2", "--tokenizer", "builtin", "--log-level", "warning"]
    serve_flags = ("--migration-limit", "1", "--router-mode", "round_robin")
    body = CHAT | {
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with serving_over(tmp_path, flags, *serve_flags) as (serve, workers):
        with trio.fail_after(TIMEOUT):
            async with serve.client() as client:
                text = ""
                events: list[dict[str, Any]] = []
                killed = None
                async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                    assert stream.status_code == 200
                    async for line in stream.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line.removeprefix("data: "))
                        events.append(event)
                        assert "error" not in event, event
                        if event["choices"]:
                            text += event["choices"][0]["delta"].get("content") or ""
                        if killed is None and len(events) == 3:
                            killed = await _worker_of_stream(client)
                            workers[killed].process.kill()  # SIGKILL: no goodbye, no last frame
                assert killed is not None
                finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
                assert [e["choices"][0]["finish_reason"] for e in finals] == ["length"]
                assert events[-1]["usage"]["completion_tokens"] == 150

                # Every token arrived once: the survivor, asked the same, answers the same.
                again = await client.post(
                    "/v1/chat/completions", json=body | {"stream": False, "stream_options": None}
                )
                assert again.json()["choices"][0]["message"]["content"] == text
                metrics = (await client.get("/metrics")).text
                assert re.search(r"^interlock_migrations_total 1\.0$", metrics, re.M), metrics

                # The dead worker left routing; requests go on without it.
                survivor = 3 - killed
                health = (await client.get("/health")).json()
                assert health["workers"] == [survivor]
                for n in range(3):
                    short = CHAT | {"max_tokens": 2, "nvext": {"extra_fields": ["worker_id"]}}
                    reply = (await client.post("/v1/chat/completions", json=short)).json()
                    assert reply["nvext"]["worker_id"]["decode_worker_id"] == survivor, (n, reply)
    assert f"lost worker {killed}" in serve.log.read_text()


async def test_a_worker_without_the_frontend_tokenizer_stops_serve_before_it_listens(
    tmp_path: Path,
) -> None:
    # No --tokenizer: the worker generates ids below 32000, the frontend's bytes have 259.
    worker = await start_worker(tmp_path, 1, "--zero-time", "--log-level", "warning")
    try:
        with trio.fail_after(TIMEOUT):
            argv = ["serve", "--port", "0", "--remote-worker", f"1=127.0.0.1:{worker.port}"]
            done = await trio.run_process(
                [*_command(), *argv], capture_stdout=True, capture_stderr=True, check=False
            )
    finally:
        await stop(worker)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert b"listening on" not in done.stdout
    assert "interlock serve: wrong remote worker: the worker at 127.0.0.1:" in err
    assert "has no tokenizer and generates token ids up to 31999" in err
    assert "this frontend's tokenizer is builtin:259:" in err
    assert "start the worker with --tokenizer builtin" in err
    assert "here: this frontend's tokenizer is <built-in byte tokenizer>" in err
    assert "start it with `interlock worker --tokenizer builtin`" in err
    assert "--block-size" not in err  # the hint is about the tokenizer, not the block size
