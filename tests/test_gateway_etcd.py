"""A gateway's picker over workers it finds in etcd: ``interlock worker --openai-port --etcd``
registers its HTTP surface's URL in its record, and ``interlock route --ext-proc-port --etcd``
names that surface as the worker's endpoint. Real processes throughout: a real etcd, real
``interlock worker``s, a real ``interlock route``, driven over ext_proc by grpcio's stub in
lockstep as Envoy drives it, each request then forwarded to the endpoint picked as Envoy's
ORIGINAL_DST cluster would."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import attrs
import pytest
import trio
from helpers import stop_processes
from test_etcd_discovery import PREFIX, Etcd, etcd  # noqa: F401 (the fixture)
from test_gateway_process import TIMEOUT, Picker, _start, chat, proxy_one

from interlock.discovery import EtcdClient, WorkerRecord
from interlock.engines import EngineContext, engine_from_record
from interlock.engines.mock import MockEngine
from interlock.engines.remote import RemoteEngine
from interlock.engines.remote._cli import _Registration
from interlock.engines.remote._server import WorkerAddress
from interlock.gateway._endpoints import endpoint_of

WORKER_FLAGS = ["--zero-time", "--tokenizer", "builtin", "--log-level", "warning"]


async def test_route_picks_the_http_surfaces_of_workers_found_in_etcd(
    etcd: Etcd,  # noqa: F811
    tmp_path: Path,
) -> None:
    registry = ["--etcd", etcd.url, "--etcd-prefix", PREFIX, "--etcd-ttl", "30"]
    processes: list[trio.Process] = []
    try:
        engines: dict[int, str] = {}
        for worker_id in (1, 2):
            process, text = await _start(
                ["worker", "--id", str(worker_id), "--openai-port", "0", *WORKER_FLAGS, *registry],
                tmp_path / f"worker-{worker_id}.log",
                until="openai_url",
            )
            processes.append(process)
            engines[worker_id] = json.loads(text.splitlines()[0])["openai_url"].removeprefix(
                "http://"
            )
        # A worker without an HTTP surface: registered, but no gateway can send it requests.
        process, text = await _start(
            ["worker", "--id", "3", *WORKER_FLAGS, *registry],
            tmp_path / "worker-3.log",
            until="worker_id",
        )
        processes.append(process)
        plain = json.loads(text.splitlines()[0])

        # Each record names where the worker protocol listens and, with --openai-port, the
        # HTTP surface's URL on the same host.
        async with EtcdClient(etcd.url) as client:
            stored, _ = await client.get_prefix(f"{PREFIX}/workers/")
        records = {r.worker_id: r for r in (WorkerRecord.from_json(kv.value) for kv in stored)}
        assert {w: r.url for w, r in records.items()} == {
            1: f"http://{engines[1]}",
            2: f"http://{engines[2]}",
            3: None,
        }
        assert (records[3].host, records[3].port) == ("127.0.0.1", plain["port"])

        process, banner = await _start(
            [
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
                *registry[:4],
            ],
            tmp_path / "route.log",
            until="ext_proc",
        )
        processes.append(process)
        url = re.search(r"listening on (\S+)", banner)
        found = re.search(r"ext_proc\s+(\S+) .*gRPC health on (\S+)", banner)
        assert url is not None and found is not None, banner
        picker = Picker(url.group(1), found.group(1), found.group(2), engines, process)
        endpoints = set(engines.values())

        def run() -> set[str]:
            served = set()
            for index in range(8):
                endpoint, _, body = proxy_one(picker, chat(f"request {index} " * (index + 1)))
                assert endpoint in endpoints, f"{endpoint} is not an HTTP surface: {endpoints}"
                assert json.loads(body)["object"] == "chat.completion"
                served.add(endpoint)
            for worker_id in (2, 1):
                endpoint = engines[worker_id]
                picked, echoed, _ = proxy_one(
                    picker, chat("pick me"), {"test-epp-endpoint-selection": endpoint}
                )
                assert picked == endpoint
                assert echoed == {"x-conformance-test-served-endpoint": endpoint}
            return served

        with trio.fail_after(4 * TIMEOUT):
            served = await trio.to_thread.run_sync(run)
        assert served <= endpoints
        log = (tmp_path / "route.log").read_text()
        assert "worker 3 has no HTTP endpoint" in log, log
    finally:
        await stop_processes(processes)


def test_a_remote_record_with_a_url_builds_an_engine_the_picker_can_name() -> None:
    record = WorkerRecord(
        worker_id=4, host="10.0.0.4", port=7001, block_size=16, url="http://10.0.0.4:8004"
    )
    # An older record (no url) reads as before; a newer one round-trips its url.
    assert WorkerRecord.from_json(record.to_json()) == record
    assert "url" not in json.loads(attrs.evolve(record, url=None).to_json())
    engine = engine_from_record(record, EngineContext())
    assert isinstance(engine, RemoteEngine)
    assert (engine.host, engine.port, engine.http_url) == ("10.0.0.4", 7001, record.url)
    assert endpoint_of(engine) == "10.0.0.4:8004"
    # Its address (in logs) is where the frontend connects: the worker protocol, not the URL.
    assert record.address == "10.0.0.4:7001"
    url_only = WorkerRecord(worker_id=5, kind="openai", url="http://10.0.0.5:8000")
    assert url_only.address == "http://10.0.0.5:8000"
    without = engine_from_record(attrs.evolve(record, url=None), EngineContext())
    assert endpoint_of(without) is None


@pytest.mark.parametrize(
    ("listen", "advertise", "url"),
    [
        ("0.0.0.0", "10.0.0.9", "http://10.0.0.9:8001"),  # --advertise-host wins
        ("10.0.0.5", None, "http://10.0.0.5:8001"),  # else --host
        ("::1", None, "http://[::1]:8001"),
        ("::", "[fd00::9]", "http://[fd00::9]:8001"),  # already in brackets: kept
        ("0.0.0.0", None, f"http://{socket.gethostname()}:8001"),  # a wildcard: the machine
    ],
)
def test_the_record_names_the_http_surface_on_the_advertised_host(
    listen: str, advertise: str | None, url: str
) -> None:
    registration = _Registration(
        client=None,  # type: ignore[arg-type]  # record() reaches no etcd
        prefix=PREFIX,
        ttl=10,
        advertise_host=advertise,
        block_size=16,
    )
    engine = MockEngine(3)
    record = registration.record(engine, WorkerAddress(listen, 7001), openai_port=8001)
    assert record.url == url
    assert record.port == 7001 and record.host in url
    assert registration.record(engine, WorkerAddress(listen, 7001)).url is None


async def test_a_worker_on_a_wildcard_host_without_advertise_host_warns_that_envoy_needs_an_ip(
    etcd: Etcd,  # noqa: F811
    tmp_path: Path,
) -> None:
    registry = ["--etcd", etcd.url, "--etcd-prefix", PREFIX, "--etcd-ttl", "30"]
    common = ["worker", "--host", "0.0.0.0", "--port", "0", "--openai-port", "0", *WORKER_FLAGS]
    processes: list[trio.Process] = []
    try:
        for worker_id, extra in ((1, []), (2, ["--advertise-host", "127.0.0.1"])):
            process, _ = await _start(
                [*common, "--id", str(worker_id), *extra, *registry],
                tmp_path / f"worker-{worker_id}.log",
                until="openai_url",
            )
            processes.append(process)
        # The warning is logged before the worker prints its line.
        warned = (tmp_path / "worker-1.log").read_text()
        assert "--advertise-host" in warned and "ORIGINAL_DST" in warned, warned
        assert socket.gethostname() in warned
        assert "ORIGINAL_DST" not in (tmp_path / "worker-2.log").read_text()
        # Not refused: both registered.
        async with EtcdClient(etcd.url) as client:
            stored, _ = await client.get_prefix(f"{PREFIX}/workers/")
        records = {r.worker_id: r for r in (WorkerRecord.from_json(kv.value) for kv in stored)}
        assert records[1].url is not None and socket.gethostname() in records[1].url
        assert records[2].url is not None and records[2].url.startswith("http://127.0.0.1:")
    finally:
        await stop_processes(processes)
