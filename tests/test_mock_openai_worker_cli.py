"""``interlock worker --openai-port``: one process serving its mock engine both over the worker
protocol (``--port``) and behind vLLM's HTTP surface, with vLLM-shaped KV events and faults from
the command line. End to end, in a real subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zmq
from test_mock_openai_kv_events import zmq_receive
from test_remote_workers import WORKER

from interlock.engines.mock import mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.engines.remote._cli import main as worker_main
from interlock.wire import (
    PreprocessedRequest,
    decode_kv_batch,
    parse_replay_reply,
    replay_request_frames,
)

TIMEOUT = 30


async def _json_line(process: trio.Process, log: Path) -> dict[str, Any]:
    assert process.stdout is not None
    line = b""
    with trio.fail_after(TIMEOUT):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise AssertionError(
                    f"the worker exited early:\n{await trio.Path(log).read_text()}"
                )
            line += chunk
    info: dict[str, Any] = json.loads(line)
    return info


async def test_the_worker_serves_vllms_surface_beside_the_worker_protocol(tmp_path: Path) -> None:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    log = tmp_path / "worker.log"
    argv = [
        *WORKER,
        "--id", "9",
        "--port", "0",
        "--openai-port", "0",
        "--zero-time",
        "--served-model-name", "tiny",
        "--kv-events-endpoint", sub.getsockopt_string(zmq.LAST_ENDPOINT),
        "--kv-events-replay", "tcp://127.0.0.1:*",
        "--fault", "eof:after=1,times=1",
    ]  # fmt: skip
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=stderr)
    try:
        info = await _json_line(process, log)
        assert info["worker_id"] == 9 and info["host"] == "127.0.0.1"
        assert info["openai_url"] == f"http://127.0.0.1:{info['openai_port']}"
        assert info["port"] != info["openai_port"]
        prompt = list(range(1, 41))
        request = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": True}
        async with httpx.AsyncClient(base_url=info["openai_url"], timeout=TIMEOUT) as client:
            # The command line's fault hits the first request only: a killed API server.
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", "/v1/completions", json=request) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_lines():
                        pass
            async with client.stream("POST", "/v1/completions", json=request) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            models = (await client.get("/v1/models")).json()
            assert models["data"][0]["id"] == "tiny"
            # The worker protocol serves the same engine.
            remote = RemoteEngine("127.0.0.1", info["port"], instance_id=9, role="agg")
            async with trio.open_nursery() as nursery:
                await nursery.start(remote.run)
                async with remote.open_stream(
                    PreprocessedRequest(token_ids=prompt, max_tokens=3)
                ) as stream:
                    tokens = [t async for output in stream for t in output.token_ids]
                nursery.cancel_scope.cancel()
            assert tokens == mock_continuation(prompt, 3)
            state = (await client.get("/mock/state")).json()
            assert state["requests_started"] == 3 and state["worker_id"] == 9
        # The KV events of all three, replayed from the start.
        dealer.connect(info["kv_events_replay"])
        dealer.send_multipart(replay_request_frames(0))
        stored = []
        while (reply := parse_replay_reply(await zmq_receive(dealer))) is not None:
            assert reply.topic == b"kv@9"
            stored.extend(decode_kv_batch(reply.payload).events)
        assert stored and stored[0].token_ids == tuple(prompt[:32])  # type: ignore[union-attr]
        process.terminate()
        with trio.fail_after(TIMEOUT):
            assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
            dealer.close(linger=0)
            sub.close(linger=0)
            context.term()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault", "reset"], "--fault belongs to the vLLM-compatible HTTP surface"),
        (["--openai-port", "0", "--fault", "teleport"], "unknown fault 'teleport'"),
        (["--openai-port", "0", "--kv-events-replay", "tcp://127.0.0.1:*"], "--kv-events-endpoint"),
    ],
)
def test_flags_that_do_not_fit_are_refused_with_what_to_change(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before anything listens, so the command runs in-process.
    assert worker_main(["--id", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_openai_port_in_use_is_a_one_line_error_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*WORKER, "--id", "1", "--port", "0", "--zero-time", "--openai-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:0 (and --openai-port {port})" in done.stderr
    assert "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
