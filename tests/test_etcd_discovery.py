"""Worker discovery through a real etcd: the client, the worker's registration, the frontend's
watcher, and ``interlock worker/serve --etcd`` processes.

Each test starts its own ``etcd`` on free 127.0.0.1 ports with a data directory under
``tmp_path`` (skipped only when the binary is missing), and its own ``interlock worker``
processes. This is the real clock: leases are short (2 s, etcd's minimum), every wait is
bounded by ``trio.fail_after`` and polls its condition; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from helpers import frontend_parser, side_by_side
from test_http_cli import _command
from test_remote_workers import WORKER, WorkerProcess, generate, prompt, stop
from test_remote_workers import start_worker as start_remote_worker
from test_tokenizer_fingerprint import save_tiny_tokenizer

from interlock import (
    Components,
    ConfigError,
    NoWorkersAvailable,
    Pipeline,
    PipelineConfig,
    build_pipeline,
)
from interlock.discovery import (
    EtcdClient,
    EtcdError,
    Listing,
    WatchEvent,
    WorkerRecord,
    WorkerWatcher,
    serve_registration,
    watch_workers,
    worker_key,
)
from interlock.engines.mock import MockEngine
from interlock.engines.remote import RemoteEngine
from interlock.http._cli import _discovering, banner, resolve
from interlock.processing import ByteTokenizer, Tokenizer
from interlock.wire import PreprocessedRequest

TIMEOUT = 15
ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
PREFIX = "test"
#: Raft timings for these one-member clusters. At etcd's defaults (a heartbeat each 100 ms, a
#: 1 s election timeout) a restart waits about a second for the member to elect itself, and a
#: first start a third of one; with no other member there is nothing to lose by shorter ones.
#: They lower etcd's least lease TTL from 2 s to 1 s: no lease here asks for less. (An etcd
#: back this fast once caught the watcher watching from a revision the empty etcd had not
#: reached; it lists first now, and the tests after `FaultyClient` pin that down.)
ONE_MEMBER_RAFT = ("--heartbeat-interval=10", "--election-timeout=100")


def _free_port(other_than: int | None = None) -> int:
    """A free port on 127.0.0.1, other than ``other_than``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != other_than:
            return port


@attrs.define
class Etcd:
    """A real etcd process; `restart` stops it and starts it again on the same ports."""

    data_dir: Path
    client_port: int = attrs.field(factory=_free_port)
    #: Not the client's: two free ports asked for one after the other can be the same one.
    peer_port: int = attrs.field(
        default=attrs.Factory(lambda self: _free_port(other_than=self.client_port), takes_self=True)
    )
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.data_dir.parent / "etcd.log").open("ab")
        self.process = subprocess.Popen(
            [
                ETCD,
                "--name=test",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                *ONE_MEMBER_RAFT,
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert self.process.poll() is None, (self.data_dir.parent / "etcd.log").read_text()
            try:
                if httpx.post(f"{self.url}/v3/kv/range", json={"key": "eA=="}).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "etcd did not answer within the timeout"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def compact(self, revision: int) -> None:
        """Drop etcd's history before ``revision`` (as its --auto-compaction-retention does)."""
        response = httpx.post(f"{self.url}/v3/kv/compaction", json={"revision": str(revision)})
        assert response.status_code == 200, response.text

    def restart(self, *, lose_data: bool = False) -> None:
        self.stop()
        if lose_data:
            shutil.rmtree(self.data_dir)
        self.start()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")
    server = Etcd(tmp_path / "etcd-data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def wait_for(condition: Callable[[], bool], what: str, within: float = TIMEOUT) -> None:
    """Poll ``condition`` until true (another process changes it: no event to wait on); fail
    after ``within`` seconds saying ``what``."""
    try:
        with trio.fail_after(within):
            while not condition():  # noqa: ASYNC110
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def start_worker(
    tmp_path: Path, worker_id: int, etcd: Etcd, *flags: str, ttl: int = 2
) -> WorkerProcess:
    """An ``interlock worker --etcd`` process; returns once it is listening and registered."""
    return await start_remote_worker(
        tmp_path,
        worker_id,
        "--zero-time",
        "--tokenizer",
        "builtin",
        "--etcd",
        etcd.url,
        "--etcd-prefix",
        PREFIX,
        "--etcd-ttl",
        str(ttl),
        *flags,
    )


async def start_workers(tmp_path: Path, etcd: Etcd, *, into: list[WorkerProcess]) -> None:
    """Workers 1 and 2 (`start_worker`) started side by side; added to ``into`` in id order."""
    await side_by_side(*(partial(start_worker, tmp_path, i, etcd) for i in (1, 2)), into=into)


@asynccontextmanager
async def frontend(
    etcd: Etcd,
    *,
    connect_timeout: float = 3,
    tokenizer: Tokenizer | None = None,
    client: EtcdClient | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Pipeline, WorkerWatcher]]:
    """An in-process pipeline (no workers of its own) following the workers in ``etcd``
    (through ``client``, by default a new one; closed at the end); with ``tokenizer``, the
    watcher checks each worker's against it."""
    async with (
        build_pipeline(PipelineConfig(**config), Components(tokenizer=tokenizer)) as pipeline,
        client or EtcdClient(etcd.url) as client,
        trio.open_nursery() as nursery,
    ):
        watcher: WorkerWatcher = await nursery.start(
            lambda task_status: watch_workers(
                client,
                pipeline,
                prefix=PREFIX,
                connect_timeout=connect_timeout,
                # The mock workers here renew no lease: none comes back after etcd loses
                # its data, so the grace for them to register again is short.
                new_store_grace=0.5,
                task_status=task_status,
            )
        )
        watcher.backoff = 0.05
        watcher.max_backoff = 0.2
        yield pipeline, watcher
        nursery.cancel_scope.cancel()


async def answer(pipeline: Pipeline, n: int) -> int:
    """Run one request (the worker generates the builtin tokenizer's words: count them); the
    worker it ran on."""
    request = PreprocessedRequest(token_ids=prompt(n), max_tokens=5, request_id=f"r{n}")
    assert len(await generate(pipeline, request)) == 5
    starts = [r for r in pipeline.transition_log.records(f"r{n}") if r.trigger == "start_decode"]
    worker_id = starts[-1].worker_id
    assert worker_id is not None
    return worker_id


# -- the client --------------------------------------------------------------------------------


async def test_the_client_puts_gets_deletes_and_watches(etcd: Etcd) -> None:
    events: list[WatchEvent] = []
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client:
            await client.put("other/1", "outside the prefix")
            await client.put("p/a", "1")
            items, revision = await client.get_prefix("p/")
            assert [(i.key, i.value) for i in items] == [("p/a", b"1")]
            # The listing carries the term from the same answer's header as its revision
            # (a single-member etcd's first term is 2).
            listing = await client.list_prefix("p/")
            assert (listing.items, listing.revision) == (items, revision)
            assert listing.raft_term >= 2

            async def watch(task_status: trio.TaskStatus[None]) -> None:
                async with aclosing(client.watch_prefix("p/", start_revision=revision + 1)) as it:
                    task_status.started()
                    async for event in it:
                        events.append(event)

            async with trio.open_nursery() as nursery:
                await nursery.start(watch)
                await client.put("p/b", b"\x00\xff")
                await client.put("other/2", "not seen")
                assert await client.delete("p/a") == 1
                assert await client.delete("p/missing") == 0
                await wait_for(lambda: len(events) == 2, "two events")
                nursery.cancel_scope.cancel()
            items, _ = await client.get_prefix("p/")
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("put", "p/b", b"\x00\xff"),
        ("delete", "p/a", b""),
    ]
    assert [(i.key, i.value) for i in items] == [("p/b", b"\x00\xff")]


async def test_a_lease_holds_its_keys_until_revoked(etcd: Etcd) -> None:
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client:
            lease, ttl = await client.grant_lease(1)
            assert ttl >= 1
            await client.put("l/k", "v", lease=lease)
            assert await client.keepalive(lease) >= 1
            await client.revoke(lease)
            assert (await client.get_prefix("l/"))[0] == []
            assert await client.keepalive(lease) == 0
            await client.revoke(lease)  # already gone: no error
            with pytest.raises(EtcdError, match="put 'l/k' failed"):
                await client.put("l/k", "v", lease=lease)


async def test_an_unreachable_etcd_raises_an_error_naming_the_url_and_operation() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(url, timeout=2) as client:
            with pytest.raises(EtcdError) as caught:
                await client.get_prefix("x/")
            with pytest.raises(EtcdError, match="watch 'x/' failed"):
                async with aclosing(client.watch_prefix("x/")) as events:
                    async for _ in events:
                        pass
    assert caught.value.url == url and caught.value.operation == "range 'x/'"
    assert str(caught.value).startswith(f"etcd at {url}: range 'x/' failed: ConnectError")


@asynccontextmanager
async def answering(answer: object) -> AsyncIterator[EtcdClient]:
    """A client whose every request gets ``answer`` (as JSON, HTTP 200) from a gateway that
    is not etcd's: no etcd runs."""
    async with EtcdClient("http://127.0.0.1:2379") as client:
        await client._http.aclose()
        client._http = httpx.AsyncClient(
            base_url=client.url,
            transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)),
        )
        yield client


@pytest.mark.parametrize(
    "answer",
    [
        {"header": {"revision": "soon", "raft_term": "2"}, "kvs": []},
        {"header": {"revision": "5", "raft_term": "two"}, "kvs": []},
        {"header": None, "kvs": []},
        {"header": {"revision": "5", "raft_term": "2"}, "kvs": None},
        {"header": {"revision": "5", "raft_term": "2"}, "kvs": ["p/a"]},
    ],
    ids=["revision", "raft_term", "header", "kvs", "kv"],
)
async def test_a_listing_whose_answer_is_malformed_is_an_etcd_error(answer: Any) -> None:
    # `list_prefix` promises EtcdError for an answer it cannot read (it guards the keys);
    # the revision and raft term of the same answer's header must be no different: the
    # watcher retries an EtcdError, and anything else ends it (and the frontend with it).
    async with answering(answer) as client:
        with pytest.raises(EtcdError, match="range 'p/'"):
            await client.list_prefix("p/")


@pytest.mark.parametrize(
    "header", [{"revision": "5", "raft_term": "two"}, {"revision": "soon"}, "5"]
)
async def test_a_watch_created_with_a_malformed_header_is_an_etcd_error(header: Any) -> None:
    # The creation answer's revision and raft term are checked against the listing's; one
    # that is not a number must be an EtcdError (retried) like the listing's, not end the
    # watcher.
    async with (
        answering({"result": {"created": True, "header": header}}) as client,
        aclosing(client.watch_prefix("p/", start_revision=6, raft_term=2)) as events,
    ):
        with pytest.raises(EtcdError, match="watch 'p/' failed: unexpected answer: header"):
            async for _ in events:
                pass


_KEY = "cC8x"  # base64 of "p/1"
_EVENT = {"kv": {"key": _KEY, "value": "e30=", "mod_revision": "7"}}


@pytest.mark.parametrize(
    ("result", "part"),
    [
        ("p/1", "result 'p/1' is not an object"),
        ({"events": _EVENT}, "events {'kv'.* is not a list"),
        ({"events": [_EVENT, "p/1"]}, "event 'p/1' is not an object"),
        ({"events": [{"kv": "p/1"}]}, "kv 'p/1' is not an object"),
        ({"events": [{"type": "DELETE"}]}, "kv None is not an object"),
        ({"events": [{"kv": {"value": "e30="}}]}, "kv {'value'.*KeyError"),
        ({"events": [{"kv": {"key": 1}}]}, "kv {'key': 1}.*TypeError"),
        ({"events": [{"kv": {"key": "cC8"}}]}, "kv {'key': 'cC8'}.*padding"),
        ({"events": [{"kv": {"key": "p/1"}}]}, "kv {'key': 'p/1'}.*Error"),
        ({"events": [{"kv": {"key": _KEY, "value": "{}"}}]}, "kv {'key'.*Error"),
        ({"events": [{"kv": {"key": _KEY, "mod_revision": "soon"}}]}, "kv mod_revision 'soon'"),
        ({"events": [{"kv": {"key": _KEY, "mod_revision": None}}]}, "kv mod_revision None"),
    ],
    ids=[
        "result",
        "events",
        "event",
        "kv",
        "no_kv",
        "no_key",
        "key_type",
        "key_padding",
        "key_alphabet",
        "value",
        "mod_revision",
        "mod_revision_null",
    ],
)
async def test_a_watch_event_that_is_malformed_is_an_etcd_error(result: Any, part: str) -> None:
    # As a malformed listing: the watcher retries an EtcdError (lists again, then watches),
    # and anything else ends it and the frontend with it. A well-formed event in the same
    # message as a malformed one is not yielded either: the listing after the error has it.
    yielded = []
    async with (
        answering({"result": result}) as client,
        aclosing(client.watch_prefix("p/")) as events,
    ):
        with pytest.raises(EtcdError, match=f"watch 'p/' failed: unexpected answer: {part}"):
            async for event in events:
                yielded.append(event)
    assert yielded == []


async def test_a_delete_answered_with_a_count_that_is_not_a_number_is_an_etcd_error() -> None:
    async with answering({"deleted": "one"}) as client:
        with pytest.raises(
            EtcdError, match="delete 'p/1' failed: unexpected answer: deleted 'one'"
        ):
            await client.delete("p/1")


def test_a_worker_record_round_trips_and_bad_ones_say_why() -> None:
    record = WorkerRecord(worker_id=3, host="10.0.0.5", port=7003, role="prefill", block_size=32)
    assert WorkerRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json()) == {
        "worker_id": 3,
        "host": "10.0.0.5",
        "port": 7003,
        "role": "prefill",
        "block_size": 32,
    }
    for text, why in [
        ("nope", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"worker_id": "1", "host": "h", "port": 1}', "worker_id must be a int"),
        ('{"worker_id": 1, "host": "h", "port": 0}', "out of range"),
        ('{"worker_id": 1, "host": "h", "port": 1, "role": "x"}', "role must be one of"),
    ]:
        with pytest.raises(ValueError, match=why):
            WorkerRecord.from_json(text)


# -- the worker's registration -----------------------------------------------------------------


async def test_a_registration_comes_back_when_its_lease_is_lost_and_goes_when_stopped(
    etcd: Etcd,
) -> None:
    record = WorkerRecord(worker_id=7, host="127.0.0.1", port=7007)
    key = worker_key(PREFIX, 7)
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client, trio.open_nursery() as nursery:
            lease = await nursery.start(
                lambda task_status: serve_registration(
                    client, record, prefix=PREFIX, ttl=2, task_status=task_status
                )
            )
            items, _ = await client.get_prefix(key)
            assert [WorkerRecord.from_json(i.value) for i in items] == [record]
            await client.revoke(lease)  # as if etcd had lost it
            assert (await client.get_prefix(key))[0] == []
            while not (await client.get_prefix(key))[0]:  # noqa: ASYNC110 (in etcd)
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        async with EtcdClient(etcd.url) as client:
            assert (await client.get_prefix(key))[0] == []


# -- the frontend's watcher over real worker processes ------------------------------------------


async def test_a_worker_process_joins_serves_and_leaves_at_once_on_sigterm(
    etcd: Etcd, tmp_path: Path
) -> None:
    worker = None
    try:
        with trio.fail_after(TIMEOUT):
            async with frontend(etcd) as (pipeline, watcher):
                assert pipeline.workers == {}
                with pytest.raises(NoWorkersAvailable):
                    await answer(pipeline, 0)
                worker = await start_worker(tmp_path, 1, etcd, ttl=30)
                await wait_for(lambda: 1 in pipeline.workers, "worker 1 to join")
                engine = pipeline.engine(1)
                assert isinstance(engine, RemoteEngine) and engine.port == worker.port
                await pipeline.membership_settled()
                assert [await answer(pipeline, n) for n in range(3)] == [1, 1, 1]
                worker.process.send_signal(signal.SIGTERM)
                # The TTL is 30 s: only the revoked lease can remove it within the test's
                # deadline (TIMEOUT, half the TTL).
                await wait_for(lambda: pipeline.engine(1) is None, "worker 1 to leave")
                assert await worker.process.wait() == 0
                assert watcher.records == {} and not engine.connected
    finally:
        if worker is not None:
            await stop(worker)


async def test_a_killed_worker_leaves_when_its_lease_expires(etcd: Etcd, tmp_path: Path) -> None:
    workers: list[WorkerProcess] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with frontend(etcd) as (pipeline, _):
                await start_workers(tmp_path, etcd, into=workers)
                await wait_for(lambda: set(pipeline.workers) == {1, 2}, "workers 1 and 2")
                workers[0].process.kill()
                # Only the lease's expiry removes it: its RemoteEngine would reconnect forever.
                await wait_for(lambda: pipeline.engine(1) is None, "worker 1's lease to expire")
                await pipeline.membership_settled()
                assert {await answer(pipeline, n) for n in range(4)} == {2}
    finally:
        for worker in workers:
            await stop(worker)


async def test_two_serve_processes_find_the_same_workers_and_answer(
    etcd: Etcd, tmp_path: Path
) -> None:
    workers: list[WorkerProcess] = []
    serves: list[trio.Process] = []
    try:
        with trio.fail_after(TIMEOUT):
            await start_workers(tmp_path, etcd, into=workers)
            urls = []
            for n in range(2):
                argv = ["serve", "--port", "0", "--etcd", etcd.url, "--etcd-prefix", PREFIX]
                with (tmp_path / f"serve-{n}.log").open("wb") as stderr:
                    process = await trio.lowlevel.open_process(
                        [*_command(), *argv], stdout=subprocess.PIPE, stderr=stderr
                    )
                serves.append(process)
                assert process.stdout is not None
                text = b""
                while b"configuration:\n" not in text:
                    chunk = await process.stdout.receive_some(65536)
                    assert chunk, (tmp_path / f"serve-{n}.log").read_text()
                    text += chunk
                lines = text.decode().splitlines()
                assert any(f"workers under {PREFIX}/workers/ at {etcd.url}" in x for x in lines)
                urls.append(lines[0].split("listening on ")[1].split(" ")[0])
            for url in urls:
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                    health = (await client.get("/health")).json()
                    assert health["workers"] == [1, 2], health
                    reply = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": "mock",
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 4,
                        },
                    )
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["usage"]["completion_tokens"] == 4
            await stop(workers[1])
            for url in urls:
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                    while (await client.get("/health")).json()["workers"] != [1]:  # noqa: ASYNC110
                        await trio.sleep(0.05)
    finally:
        with trio.CancelScope(shield=True):
            for process in serves:
                process.kill()
                await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
            for worker in workers:
                await stop(worker)


async def test_bad_records_and_mismatched_workers_are_skipped(etcd: Etcd, tmp_path: Path) -> None:
    workers: list[WorkerProcess] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with EtcdClient(etcd.url) as client:
                await client.put(f"{PREFIX}/workers/9", "not json")
                await client.put(
                    f"{PREFIX}/workers/8", WorkerRecord(worker_id=5, host="h", port=1).to_json()
                )
                async with frontend(etcd, tokenizer=ByteTokenizer()) as (pipeline, watcher):
                    assert watcher.records == {}
                    workers.append(await start_worker(tmp_path, 3, etcd, "--block-size", "32"))
                    await wait_for(lambda: watcher.skipped == {3}, "worker 3 to be skipped")
                    # Another tokenizer than the frontend's bytes (the last --tokenizer wins).
                    other = save_tiny_tokenizer(tmp_path / "tiny.json", "river", "stone")
                    workers.append(await start_worker(tmp_path, 7, etcd, "--tokenizer", str(other)))
                    await wait_for(lambda: watcher.skipped == {3, 7}, "worker 7 to be skipped")
                    workers.append(await start_worker(tmp_path, 1, etcd))
                    await wait_for(lambda: 1 in pipeline.workers, "worker 1")
                    await client.put(f"{PREFIX}/workers/4", "{}")
                    await client.put(f"{PREFIX}/workers/10", "[]")
                    assert (await answer(pipeline, 1)) == 1
                    assert set(pipeline.workers) == {1}
                    assert pipeline.engine(3) is None  # its handshake says blocks of 32
                    assert pipeline.engine(7) is None  # and this one's another tokenizer
    finally:
        for worker in workers:
            await stop(worker)


async def test_a_record_names_its_engine_kind_and_the_watcher_builds_it_through_the_factory(
    etcd: Etcd,
) -> None:
    def put(worker_id: int, **fields: Any) -> Any:
        record = WorkerRecord(worker_id=worker_id, **fields)
        return client.put(worker_key(PREFIX, worker_id), record.to_json())

    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client:
            await put(2, kind="mock")  # simulated in the frontend: no process, no address
            await put(3, kind="sglang", url="http://127.0.0.1:1")  # no such kind
            await put(4)  # an interlock worker's record without host and port
            async with frontend(etcd) as (pipeline, watcher):
                assert set(pipeline.workers) == {2}
                assert isinstance(pipeline.engine(2), MockEngine)
                assert watcher.skipped == {3, 4}
                assert (await answer(pipeline, 1)) == 2
                await put(3, kind="mock", role="agg")
                await wait_for(lambda: 3 in pipeline.workers, "worker 3, of a known kind now")
                assert watcher.skipped == {4}
                await client.delete(worker_key(PREFIX, 2))
                await wait_for(lambda: 2 not in pipeline.workers, "worker 2 to leave")
                await client.delete(worker_key(PREFIX, 4))
                await wait_for(lambda: watcher.skipped == set(), "worker 4's record to go")
                assert set(pipeline.workers) == {3}


async def test_a_registered_worker_that_cannot_be_reached_yet_joins_once_it_can(
    etcd: Etcd, tmp_path: Path
) -> None:
    # A port nothing listens on yet: the record says the worker is there, the network says no.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers: list[WorkerProcess] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with EtcdClient(etcd.url) as client:
                await client.put(
                    f"{PREFIX}/workers/6",
                    WorkerRecord(worker_id=6, host="127.0.0.1", port=port).to_json(),
                )
                async with frontend(etcd, connect_timeout=0.3) as (pipeline, watcher):
                    assert watcher.skipped == {6}  # the listing did not wait for it
                    assert 6 not in pipeline.workers
                    workers.append(
                        await start_remote_worker(
                            tmp_path, 6, "--zero-time", "--tokenizer", "builtin", port=port
                        )
                    )
                    # The engine joins the pipeline a moment before the watcher forgets the skip.
                    await wait_for(
                        lambda: 6 in pipeline.workers and not watcher.skipped,
                        "worker 6, once reachable",
                    )
                    assert watcher.skipped == set()
                    assert (await answer(pipeline, 3)) == 6
    finally:
        for worker in workers:
            await stop(worker)


async def test_a_worker_restarted_on_another_port_replaces_its_engine(
    etcd: Etcd, tmp_path: Path
) -> None:
    workers: list[WorkerProcess] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with frontend(etcd) as (pipeline, _):
                workers.append(await start_worker(tmp_path, 1, etcd))
                await wait_for(lambda: 1 in pipeline.workers, "worker 1")
                first = pipeline.engine(1)
                workers[0].process.kill()  # its record stays until the TTL ...
                workers.append(await start_worker(tmp_path, 1, etcd))  # ... or a new one
                await wait_for(
                    lambda: (
                        getattr(pipeline.engine(1), "port", None) == workers[1].port
                        and 1 in pipeline.workers
                    ),
                    "the new worker 1",
                )
                assert first is not None and not first.connected  # type: ignore[attr-defined]
                await pipeline.membership_settled()
                assert (await answer(pipeline, 2)) == 1
    finally:
        for worker in workers:
            await stop(worker)


async def test_after_etcd_restarts_empty_workers_register_again_and_frontends_follow(
    etcd: Etcd, tmp_path: Path
) -> None:
    workers: list[WorkerProcess] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with frontend(etcd) as (pipeline, watcher):
                await start_workers(tmp_path, etcd, into=workers)
                await wait_for(lambda: set(pipeline.workers) == {1, 2}, "workers 1 and 2")
                listings = watcher.listings
                etcd.stop()
                await stop(workers[1])  # it cannot revoke its lease: etcd is down ...
                assert pipeline.engine(2) is not None  # the watcher cannot know yet
                etcd.restart(lose_data=True)  # ... and etcd comes back without any record
                await wait_for(lambda: watcher.listings > listings, "the watcher to list again")
                # Worker 1's keepalive finds its lease gone: it registers again; worker 2,
                # gone meanwhile, is removed.
                await wait_for(lambda: set(watcher.records) == {1}, "only worker 1 in etcd")
                await wait_for(lambda: pipeline.engine(2) is None, "worker 2 to be removed")
                await wait_for(lambda: set(pipeline.workers) == {1}, "only worker 1 routable")
                await pipeline.membership_settled()
                assert (await answer(pipeline, 3)) == 1
    finally:
        for worker in workers:
            await stop(worker)


class FaultyClient(EtcdClient):
    """A real client to a real etcd, with faults a test sets off at the moment it chooses:
    its next ``failing_listings`` listings fail as if etcd had not answered, and
    ``after_listing`` (once) runs right after a listing got its answer, before the caller
    sees it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failing_listings = 0
        self.failed_listings = 0
        self.after_listing: Callable[[], Awaitable[None]] | None = None

    async def list_prefix(self, prefix: str) -> Listing:
        if self.failing_listings:
            self.failing_listings -= 1
            self.failed_listings += 1
            raise EtcdError(self.url, f"range {prefix!r}", "ReadError: a fault the test set off")
        answer = await super().list_prefix(prefix)
        hook, self.after_listing = self.after_listing, None
        if hook is not None:
            await hook()
        return answer


async def _put_mock_worker(client: EtcdClient, worker_id: int) -> None:
    # A record of the mock kind: the frontend simulates the worker, so no process is needed.
    record = WorkerRecord(worker_id=worker_id, kind="mock")
    await client.put(worker_key(PREFIX, worker_id), record.to_json())


async def _worker_2_at_revision_30(etcd: Etcd) -> FaultyClient:
    """A `FaultyClient` to ``etcd``, once etcd holds mock worker 2's record and is at
    revision 30 (keys put outside the workers' prefix): far ahead of the revision it will
    be at after a restart without its data."""
    client = FaultyClient(etcd.url)
    await _put_mock_worker(client, 2)
    while await client.put("elsewhere", "x") < 30:
        pass
    return client


async def test_a_watch_from_a_revision_etcd_has_not_reached_fails_instead_of_waiting(
    etcd: Etcd,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with EtcdClient(etcd.url) as client:
            _, revision = await client.get_prefix("p/")
            with pytest.raises(EtcdError, match=f"etcd is at revision {revision}, behind"):
                async with aclosing(client.watch_prefix("p/", start_revision=revision + 9)) as it:
                    async for _ in it:
                        pass
            # From the next revision (the usual case) it waits for changes.
            async with aclosing(client.watch_prefix("p/", start_revision=revision + 1)) as it:
                await client.put("p/a", "1")
                assert (await anext(it)).key == "p/a"


async def test_a_listing_that_fails_after_etcd_restarted_empty_is_retried_before_watching(
    etcd: Etcd, caplog: pytest.LogCaptureFixture
) -> None:
    # The watcher must not watch from the revision it knew: etcd, empty, has not reached it
    # and would wait for it silently, while the workers register again below it.
    with trio.fail_after(TIMEOUT):
        client = await _worker_2_at_revision_30(etcd)
        async with frontend(etcd, client=client) as (pipeline, _):
            await _put_mock_worker(client, 4)  # seen once the watch is on: it is
            await wait_for(lambda: set(pipeline.workers) == {2, 4}, "worker 4, watched")
            client.failing_listings = 1  # the first listing after the restart fails
            etcd.restart(lose_data=True)
            await _put_mock_worker(client, 3)  # registered again, at revision 2
            await wait_for(lambda: set(pipeline.workers) == {3}, "worker 3 only")
            assert client.failed_listings == 1
    assert caplog.text.count("cannot list the workers") == 1
    assert "watching again only once a listing succeeds" in caplog.text
    assert "etcd's revision went back from 31 to" in caplog.text
    # It never watched from its old revision (the watch would have refused, but later).
    assert "behind the watch's start revision" not in caplog.text


async def test_a_watch_on_an_etcd_that_restarted_empty_after_the_listing_lists_again(
    etcd: Etcd, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        client = await _worker_2_at_revision_30(etcd)

        async def restart_empty() -> None:
            # Between the first listing and its watch.
            etcd.restart(lose_data=True)

        client.after_listing = restart_empty
        async with frontend(etcd, client=client) as (pipeline, _):
            await wait_for(lambda: not pipeline.workers, "worker 2, not in etcd now, to leave")
            await _put_mock_worker(client, 3)
            await wait_for(lambda: set(pipeline.workers) == {3}, "worker 3")
    assert "etcd is at revision 1, behind the watch's start revision 31" in caplog.text
    assert "etcd's revision went back from 30 to 1" in caplog.text


async def test_a_watch_cancelled_by_a_compaction_lists_again(
    etcd: Etcd, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        client = FaultyClient(etcd.url)

        async def register_3_and_compact() -> None:
            # Between the first listing and its watch: a change the watch must not miss,
            # then a compaction of the history it would start from.
            await _put_mock_worker(client, 3)
            etcd.compact(await client.put("elsewhere", "x"))

        client.after_listing = register_3_and_compact
        async with frontend(etcd, client=client) as (pipeline, watcher):
            await wait_for(
                lambda: watcher.listings == 2 and 3 in pipeline.workers,
                "worker 3, seen by the second listing",
            )
    assert "etcd cancelled the watch: compacted to revision" in caplog.text


async def test_a_watch_on_an_etcd_that_restarted_empty_and_caught_up_after_the_listing_lists_again(
    etcd: Etcd,
) -> None:
    # As test_a_watch_on_an_etcd_that_restarted_empty_after_the_listing_lists_again, but
    # the new store is back at the listed revision (30) when the watch starts: the watch's
    # creation header shows no revision behind, so the watcher watches from 31 on a store
    # whose revisions 1-30 it never listed. etcd's cluster and member ids stay the same; its
    # raft term goes back (3 -> 2) and would tell. A new etcd is at term 2 and an empty
    # restart starts again at 2, so etcd restarts once with its data first (term 3), as one
    # that has run for a while has: without that the term does not go back, and nothing in
    # etcd's answers tells the new store from the old.
    with trio.fail_after(TIMEOUT):
        etcd.restart()
        client = await _worker_2_at_revision_30(etcd)

        async def restart_empty_and_catch_up() -> None:
            etcd.restart(lose_data=True)
            await _put_mock_worker(client, 3)  # registered again, at revision 2
            while await client.put("elsewhere", "x") < 30:
                pass

        client.after_listing = restart_empty_and_catch_up
        async with frontend(etcd, client=client) as (pipeline, _):
            await wait_for(lambda: set(pipeline.workers) == {3}, "worker 3 only", within=5)


# -- the commands --------------------------------------------------------------------------------


def test_serve_with_etcd_may_start_without_workers_and_shows_the_source() -> None:
    args = frontend_parser().parse_args(["serve", "--etcd", "http://etcd:2379"])
    setup = resolve(args)
    assert setup.workers == 0 and setup.remote_workers == ()
    assert setup.etcd_url == "http://etcd:2379" and setup.etcd_prefix == "interlock"
    text = banner(setup, "http://127.0.0.1:8000")
    assert "etcd         workers under interlock/workers/ at http://etcd:2379" in text
    assert "found none yet" in text
    with_mocks = resolve(
        frontend_parser().parse_args(["serve", "--etcd", "http://e", "--workers", "2"])
    )
    assert with_mocks.workers == 2
    router = resolve(
        frontend_parser().parse_args(["route", "--etcd", "http://e", "--etcd-prefix", "p"])
    )
    assert router.workers == 0 and router.etcd_prefix == "p"


def test_a_bad_etcd_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = frontend_parser().parse_args(["serve", "--etcd", "etcd:2379"])
    assert args.run(args) == 2
    assert "--etcd 'etcd:2379' is not a URL" in capsys.readouterr().err


def test_serve_exits_with_status_1_when_etcd_cannot_be_reached(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    args = frontend_parser().parse_args(["serve", "--port", "0", "--etcd", url])
    assert args.run(args) == 1
    err = capsys.readouterr().err
    assert f"cannot list the workers in etcd (--etcd): etcd at {url}" in err, err


async def test_a_worker_exits_with_status_1_when_etcd_cannot_be_reached(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    argv = [*WORKER, "--id", "1", "--zero-time", "--etcd", url]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert b"interlock worker: cannot register in etcd: etcd at " + url.encode() in result.stderr
    assert result.stdout == b""


async def test_serve_gives_its_etcd_watcher_the_new_store_grace_it_is_given(etcd: Etcd) -> None:
    """``--etcd-new-store-grace``: how long a frontend keeps the workers an etcd that lost
    its data has no record of (workers whose --etcd-ttl is longer need more than the 10 s
    default to register again)."""
    argv = ["serve", "--etcd", etcd.url, "--etcd-prefix", PREFIX]
    assert resolve(frontend_parser().parse_args(argv)).etcd_new_store_grace == 10
    setup = resolve(frontend_parser().parse_args([*argv, "--etcd-new-store-grace", "45"]))
    async with (
        build_pipeline(PipelineConfig(), Components(workers=[])) as pipeline,
        _discovering(setup, pipeline) as watcher,
    ):
        assert watcher is not None and watcher.new_store_grace == 45
    with pytest.raises(ConfigError, match="--etcd-new-store-grace needs --etcd URL"):
        resolve(frontend_parser().parse_args(["serve", "--etcd-new-store-grace", "5"]))
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            frontend_parser().parse_args([*argv, "--etcd-new-store-grace", bad])
