"""``interlock route --ext-proc-port`` for real: a route process over ``interlock worker
--openai-port`` engines, driven by grpcio's ``ExternalProcessorStub`` in lockstep as Envoy
drives it (grpcio being the implementation Envoy interoperates with), and its gRPC health
checked with grpcio-health-checking. The test forwards each request to the endpoint picked
itself, as Envoy's ORIGINAL_DST cluster would."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx
import trio
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from helpers import stop_processes

TIMEOUT = 30.0


def _free_tcp_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


async def _start(argv: list[str], log: Path, *, until: str) -> tuple[trio.Process, str]:
    """Start ``python -m interlock ARGV``; return it with its stdout up to the line holding
    ``until``."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "interlock", *argv], stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    text = b""
    with trio.fail_after(TIMEOUT):
        while until.encode() not in text or not text.endswith(b"\n"):
            chunk = await process.stdout.receive_some(65536)
            assert chunk, f"{argv[0]} exited early:\n{log.read_text()}"  # noqa: ASYNC240
            text += chunk
    return process, text.decode()


@attrs.frozen
class Picker:
    url: str
    ext_proc: str
    health: str
    #: Each engine's ``host:port``, by worker id.
    engines: dict[int, str]
    route: trio.Process


@asynccontextmanager
async def picking(tmp_path: Path) -> AsyncIterator[Picker]:
    """Two ``interlock worker --openai-port 0`` engines publishing KV events to the route's
    ``--kv-events-bind``, and ``interlock route --ext-proc-port 0 --ext-proc-health-port 0``
    over them (the contract's command line, with free ports)."""
    bind = _free_tcp_endpoint()
    processes: list[trio.Process] = []
    try:
        engines: dict[int, str] = {}
        argv = [
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ext-proc-port",
            "0",
            "--ext-proc-health-port",
            "0",
            "--model-name",
            "mock",
            "--router-mode",
            "kv",
            "--kv-events-bind",
            bind,
        ]
        infos: dict[int, dict[str, Any]] = {}

        async def worker(worker_id: int) -> None:
            process, text = await _start(
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
                    "--log-level",
                    "warning",
                ],
                tmp_path / f"worker-{worker_id}.log",
                until="openai_url",
            )
            processes.append(process)
            infos[worker_id] = json.loads(text.splitlines()[0])

        # The workers start side by side: one start-up's wait instead of two.
        async with trio.open_nursery() as nursery:
            for worker_id in (1, 2):
                nursery.start_soon(worker, worker_id)
        for worker_id, info in sorted(infos.items()):
            engines[worker_id] = info["openai_url"].removeprefix("http://")
            argv += ["--engine", f"{worker_id}={info['openai_url']}"]
        process, banner = await _start(argv, tmp_path / "route.log", until="ext_proc")
        processes.append(process)
        url = re.search(r"listening on (\S+)", banner)
        found = re.search(r"ext_proc\s+(\S+) .*gRPC health on (\S+)", banner)
        assert url is not None and found is not None, banner
        yield Picker(url.group(1), found.group(1), found.group(2), engines, process)
    finally:
        await stop_processes(processes)


class Lockstep:
    """An ext_proc stream as Envoy drives it: send a message, wait for what it calls for."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue[ProcessingRequest | None] = queue.Queue()
        self._responses = ExternalProcessorStub(channel).Process(self._requests(), timeout=60)

    def _requests(self) -> Iterator[ProcessingRequest]:
        while (message := self._outbox.get()) is not None:
            yield message

    def send(self, message: ProcessingRequest) -> None:
        self._outbox.put(message)

    def receive(self) -> ProcessingResponse:
        return next(self._responses)

    def cancel(self) -> None:
        """Drop the stream, as Envoy does when its client goes away."""
        self._responses.cancel()

    def close(self) -> list[ProcessingResponse]:
        self._outbox.put(None)
        return list(self._responses)


def _headers(**values: str) -> HeaderMap:
    return HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])


def _set(response: ProcessingResponse, phase: str) -> dict[str, str]:
    mutation = getattr(response, phase).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def proxy_one(
    picker: Picker, body: bytes, extra: dict[str, str] | None = None
) -> tuple[str, dict[str, str], bytes]:
    """One chat request through the picker, forwarded to the endpoint it picked as Envoy does:
    (the endpoint, the response headers the picker set, the response body passed back)."""
    with grpc.insecure_channel(picker.ext_proc) as channel:
        stream = Lockstep(channel)
        request_headers = {":method": "POST", ":path": "/v1/chat/completions", **(extra or {})}
        stream.send(
            ProcessingRequest(request_headers=HttpHeaders(headers=_headers(**request_headers)))
        )
        half = len(body) // 2
        stream.send(ProcessingRequest(request_body=HttpBody(body=body[:half])))
        stream.send(ProcessingRequest(request_body=HttpBody(body=body[half:], end_of_stream=True)))
        picked = stream.receive()
        assert picked.WhichOneof("response") == "request_headers", picked
        set_headers = _set(picked, "request_headers")
        destination = set_headers["x-gateway-destination-endpoint"]
        lb = picked.dynamic_metadata.fields["envoy.lb"].struct_value
        assert lb.fields["x-gateway-destination-endpoint"].string_value == destination
        sent_back = b""
        while True:
            part = stream.receive().request_body.response.body_mutation.streamed_response
            sent_back += part.body
            if part.end_of_stream:
                break
        assert sent_back == body
        endpoint = destination.split(",")[0]
        upstream = httpx.post(
            f"http://{endpoint}/v1/chat/completions",
            content=sent_back,
            headers={"content-type": "application/json"},
            timeout=TIMEOUT,
        )
        status = str(upstream.status_code)
        stream.send(
            ProcessingRequest(response_headers=HttpHeaders(headers=_headers(**{":status": status})))
        )
        answered = _set(stream.receive(), "response_headers")
        stream.send(
            ProcessingRequest(response_body=HttpBody(body=upstream.content, end_of_stream=True))
        )
        passed = stream.receive().response_body.response.body_mutation.streamed_response
        assert passed.end_of_stream
        assert stream.close() == []
        return endpoint, answered, passed.body


def chat(text: str) -> bytes:
    return json.dumps(
        {"model": "mock", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    ).encode()


async def test_route_picks_over_ext_proc_for_real_with_kv_affinity(tmp_path: Path) -> None:
    async with picking(tmp_path) as picker:
        endpoints = set(picker.engines.values())
        prompt = "A long shared prefix about railway interlocking. " * 40

        def run() -> None:
            first, answered, body = proxy_one(picker, chat(prompt + "first"))
            assert first in endpoints
            assert answered == {}, "no conformance selection header: nothing echoed"
            assert json.loads(body)["object"] == "chat.completion"
            # The engine's KV events reach the router: the same prefix goes back there.
            for attempt in range(100):
                again, _, _ = proxy_one(picker, chat(prompt + f"again {attempt}"))
                if again == first:
                    return
            raise AssertionError(f"the shared prefix never went back to {first}")

        await trio.to_thread.run_sync(run)
        # Every pick's booking was freed at its response's end; the picks were counted.
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            metrics = (await client.get(picker.url + "/metrics")).text
        assert re.search(
            r'interlock_http_requests_total\{endpoint="ext_proc",status="200"\}', metrics
        )


async def test_the_selection_header_routes_and_is_echoed_and_health_serves(
    tmp_path: Path,
) -> None:
    async with picking(tmp_path) as picker:

        def run() -> None:
            for worker_id in (2, 1, 2):
                endpoint = picker.engines[worker_id]
                served, answered, _ = proxy_one(
                    picker, chat("pick me"), {"test-epp-endpoint-selection": endpoint}
                )
                assert served == endpoint
                assert answered == {"x-conformance-test-served-endpoint": endpoint}
            for address in (picker.ext_proc, picker.health):
                with grpc.insecure_channel(address) as channel:
                    health = HealthStub(channel)
                    for service in (
                        "liveness",
                        "readiness",
                        "envoy.service.ext_proc.v3.ExternalProcessor",
                    ):
                        answer: Any = health.Check(HealthCheckRequest(service=service), timeout=10)
                        assert answer.status == HealthCheckResponse.SERVING, service
                    try:
                        health.Check(HealthCheckRequest(service="nope"), timeout=10)
                    except grpc.RpcError as error:
                        assert error.code() == grpc.StatusCode.NOT_FOUND
                    else:
                        raise AssertionError("an unknown service answered")

        await trio.to_thread.run_sync(run)


async def test_route_refuses_ext_proc_over_workers_without_http(tmp_path: Path) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "interlock", "route", "--ext-proc-port", "0", "--workers", "2"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "in-process mock worker" in message and "--engine ID=URL" in message


async def test_a_stream_the_gateway_drops_frees_its_booking(tmp_path: Path) -> None:
    async with picking(tmp_path) as picker, httpx.AsyncClient(timeout=TIMEOUT) as client:

        async def booked() -> int:
            answer = await client.post(picker.url + "/v1/route", json={"prompt": "load?"})
            assert answer.status_code == 200, answer.text
            return sum(
                c["active_requests"]
                for leg in answer.json()["selections"]
                for c in leg["candidates"]
            )

        def open_and_drop() -> None:
            with grpc.insecure_channel(picker.ext_proc) as channel:
                stream = Lockstep(channel)
                headers = _headers(**{":method": "POST", ":path": "/v1/chat/completions"})
                stream.send(ProcessingRequest(request_headers=HttpHeaders(headers=headers)))
                stream.send(
                    ProcessingRequest(request_body=HttpBody(body=chat("hold"), end_of_stream=True))
                )
                assert stream.receive().WhichOneof("response") == "request_headers"
                stream.receive()  # the body
                status = _headers(**{":status": "200"})
                stream.send(ProcessingRequest(response_headers=HttpHeaders(headers=status)))
                stream.receive()
                assert picker_has_load()
                stream.cancel()

        token = trio.lowlevel.current_trio_token()

        def picker_has_load() -> bool:
            return trio.from_thread.run(booked, trio_token=token) == 1

        await trio.to_thread.run_sync(open_and_drop)
        with trio.fail_after(TIMEOUT):
            while await booked():  # noqa: ASYNC110 (another process's state: polling is the point)
                await trio.sleep(0.05)


async def test_one_gateway_connection_carries_more_than_a_thousand_streams(
    tmp_path: Path,
) -> None:
    # Envoy sends every request's stream over the few connections it keeps to the picker: the
    # server must not close one after a fixed number of streams (Hypercorn's default: 1,000),
    # which cuts the stream in flight.
    async with picking(tmp_path) as picker:

        def run() -> int:
            headers = _headers(**{":method": "GET", ":path": "/v1/models"})
            picked = 0
            with grpc.insecure_channel(picker.ext_proc) as channel:
                for _ in range(1100):
                    stream = Lockstep(channel)
                    stream.send(
                        ProcessingRequest(
                            request_headers=HttpHeaders(headers=headers, end_of_stream=True)
                        )
                    )
                    answer = stream.receive()
                    assert answer.WhichOneof("response") == "request_headers", answer
                    assert stream.close() == []
                    picked += 1
            return picked

        assert await trio.to_thread.run_sync(run) == 1100


async def test_a_drain_turns_health_off_lets_the_open_stream_finish_then_exits(
    tmp_path: Path,
) -> None:
    # SIGTERM: readiness turns NOT_SERVING at once (Envoy stops sending new streams), the
    # stream in flight still gets its answers, and when it ends the process exits cleanly
    # (the gRPC server's thread stopped with it).
    async with picking(tmp_path) as picker:
        channel = grpc.insecure_channel(picker.ext_proc)
        try:
            stream = Lockstep(channel)
            headers = _headers(**{":method": "POST", ":path": "/v1/chat/completions"})
            stream.send(ProcessingRequest(request_headers=HttpHeaders(headers=headers)))
            stream.send(
                ProcessingRequest(request_body=HttpBody(body=chat("drain"), end_of_stream=True))
            )
            picked = await trio.to_thread.run_sync(stream.receive)
            assert picked.WhichOneof("response") == "request_headers", picked
            await trio.to_thread.run_sync(stream.receive)  # the body
            picker.route.send_signal(signal.SIGTERM)

            def readiness() -> int:
                with grpc.insecure_channel(picker.health) as health:
                    request = HealthCheckRequest(service="readiness")
                    status: int = HealthStub(health).Check(request, timeout=TIMEOUT).status
                    return status

            serving = HealthCheckResponse.SERVING
            with trio.fail_after(TIMEOUT):
                # Another process's state: polling is the point.
                while await trio.to_thread.run_sync(readiness) == serving:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert await trio.to_thread.run_sync(readiness) == HealthCheckResponse.NOT_SERVING
            status = _headers(**{":status": "200"})
            stream.send(ProcessingRequest(response_headers=HttpHeaders(headers=status)))
            answer = await trio.to_thread.run_sync(stream.receive)
            assert answer.WhichOneof("response") == "response_headers", answer
            assert await trio.to_thread.run_sync(stream.close) == []
            with trio.fail_after(TIMEOUT):
                assert await picker.route.wait() == 0
        finally:
            channel.close()
