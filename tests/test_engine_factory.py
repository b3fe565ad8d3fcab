"""The one engine factory: a `WorkerRecord` names its engine kind, `engine_from_record` builds
that kind's engine with the frontend's `EngineContext`, and kinds are registered by name
(imported only when a record first names them)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from interlock import Components, ConfigError, PipelineConfig, build_pipeline
from interlock.engines import (
    BadRecord,
    Engine,
    EngineContext,
    UnknownEngineKind,
    WorkerRecord,
    _factory,
    engine_from_record,
    engine_kinds,
    register_engine_kind,
)
from interlock.engines.mock import MockEngine
from interlock.engines.openai import OpenAIEngine
from interlock.engines.remote import RemoteEngine
from interlock.processing import ByteTokenizer, tokenizer_fingerprint
from interlock.wire import PreprocessedRequest


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Each test registers kinds in a copy of the registry, so none leaks into another."""
    saved = dict(_factory._kinds)
    yield
    _factory._kinds.clear()
    _factory._kinds.update(saved)


# -- records ------------------------------------------------------------------------------------


def test_a_record_without_a_kind_is_an_interlock_worker_and_writes_as_before() -> None:
    old = '{"worker_id": 1, "host": "10.0.0.5", "port": 7001, "role": "agg", "block_size": 16}'
    record = WorkerRecord.from_json(old)
    assert record == WorkerRecord(worker_id=1, host="10.0.0.5", port=7001)
    assert record.kind == "remote" and record.url is None
    assert json.loads(record.to_json()) == json.loads(old)


def test_a_record_of_another_kind_carries_its_kind_and_url() -> None:
    record = WorkerRecord(worker_id=4, kind="openai", url="http://10.0.0.7:8000", role="decode")
    assert json.loads(record.to_json()) == {
        "worker_id": 4,
        "kind": "openai",
        "url": "http://10.0.0.7:8000",
        "role": "decode",
        "block_size": 16,
    }
    assert WorkerRecord.from_json(record.to_json()) == record
    assert record.address == "http://10.0.0.7:8000"
    # Fields a newer writer adds are ignored, not errors.
    assert WorkerRecord.from_json('{"worker_id": 1, "host": "h", "port": 1, "zone": "b"}').port == 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"host": "h", "port": 1}', "worker_id must be a int"),
        ('{"worker_id": 1, "host": "h"}', "port must be a int"),
        ('{"worker_id": 1, "url": ""}', "url must be a non-empty str"),
        ('{"worker_id": 1, "url": 5}', "url must be a non-empty str"),
        ('{"worker_id": 1, "url": "http://h:1", "port": 1}', "host must be a str"),
        ('{"worker_id": 1, "host": "h", "port": 1, "kind": 3}', "kind must be a str"),
        ('{"worker_id": 1, "host": "h", "port": 1, "kind": ""}', "kind must name"),
    ],
)
def test_a_record_with_a_field_missing_or_wrong_is_refused(text: str, why: str) -> None:
    with pytest.raises(BadRecord, match=why):
        WorkerRecord.from_json(text)


# -- the kinds interlock ships --------------------------------------------------------------------


def test_the_builtin_kinds_are_registered_without_importing_any() -> None:
    assert {"mock", "openai", "remote"} <= set(engine_kinds())
    code = (
        "import sys, interlock.engines, interlock.discovery\n"
        "print([m for m in sys.modules if m.startswith(('interlock.engines.remote', "
        "'interlock.engines.openai', 'interlock.engines._kinds'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_remote_record_builds_a_remote_engine_checked_against_the_frontend() -> None:
    tokenizer = ByteTokenizer()
    context = EngineContext(block_size=32, tokenizer=tokenizer, connect_timeout=3, max_backoff=0.5)
    record = WorkerRecord(worker_id=7, host="10.0.0.5", port=7007, role="prefill", block_size=16)
    engine = engine_from_record(record, context)
    assert isinstance(engine, RemoteEngine) and isinstance(engine, Engine)
    assert (engine.host, engine.port, engine.instance_id, engine.role) == (
        "10.0.0.5",
        7007,
        7,
        "prefill",
    )
    # The frontend's block size, not the record's: the handshake checks the worker's.
    assert engine.block_size == 32
    assert engine.tokenizer == tokenizer_fingerprint(tokenizer)
    assert engine.vocab_size == tokenizer.vocab_size
    assert (engine.connect_timeout, engine.max_backoff) == (3, 0.5)
    unchecked = engine_from_record(record, EngineContext())
    assert isinstance(unchecked, RemoteEngine)
    assert unchecked.tokenizer is None and unchecked.vocab_size is None


def test_a_remote_record_without_host_and_port_says_what_it_needs() -> None:
    for record in [
        WorkerRecord(worker_id=2, url="http://10.0.0.5:8000"),
        WorkerRecord.from_json('{"worker_id": 2}'),
    ]:
        with pytest.raises(BadRecord, match=r"kind 'remote'.*no host and port"):
            engine_from_record(record, EngineContext())


def test_an_openai_record_builds_an_http_engine_sharing_the_frontends_resources() -> None:
    tokenizer = ByteTokenizer()
    feed = object()  # what the frontend shares: opaque to the factory
    context = EngineContext(
        block_size=16,
        tokenizer=tokenizer,
        idle_timeout=7.5,
        resources={"kv_events": feed, "engine_api_key": "k"},
    )
    record = WorkerRecord(
        worker_id=3, kind="openai", url="http://10.0.0.7:8000/v1", kv_replay="tcp://e:5561"
    )
    engine = engine_from_record(record, context)
    assert isinstance(engine, OpenAIEngine)
    assert engine.base_url == "http://10.0.0.7:8000" and engine.instance_id == 3
    assert engine.tokenizer is tokenizer and engine.block_size == 16
    assert engine.kv_events is feed and engine.kv_replay_endpoint == "tcp://e:5561"
    assert engine.idle_timeout == 7.5 and engine.api_key == "k"
    by_address = WorkerRecord(worker_id=3, kind="openai", host="10.0.0.7", port=8000)
    by_address_engine = engine_from_record(by_address, EngineContext())
    assert isinstance(by_address_engine, OpenAIEngine)
    assert by_address_engine.base_url == "http://10.0.0.7:8000"
    assert by_address_engine.kv_events is None
    with pytest.raises(BadRecord, match="neither a url nor a host and port"):
        engine_from_record(WorkerRecord(worker_id=3, kind="openai"), EngineContext())


async def test_a_mock_record_builds_an_in_process_worker_that_serves(autojump_clock: Any) -> None:
    record = WorkerRecord(worker_id=5, kind="mock", role="agg")
    engine = engine_from_record(record, EngineContext(block_size=16))
    assert isinstance(engine, MockEngine) and engine.instance_id == 5
    with trio.fail_after(60):
        async with build_pipeline(PipelineConfig(), Components(workers=[])) as pipeline:
            await pipeline.add_worker(engine)
            request = PreprocessedRequest(token_ids=tuple(range(1, 40)), max_tokens=6)
            tokens = [t async for out in pipeline.generate(request) for t in out.token_ids]
    assert len(tokens) == 6


# -- registering kinds ----------------------------------------------------------------------------


def test_an_unknown_kind_is_a_config_error_naming_the_known_ones() -> None:
    record = WorkerRecord(worker_id=1, host="h", port=1, kind="sglang")
    with pytest.raises(UnknownEngineKind, match=r"'sglang'.*known: mock, openai, remote") as caught:
        engine_from_record(record, EngineContext())
    assert isinstance(caught.value, ConfigError)


def test_a_registered_builder_gets_the_record_and_the_context() -> None:
    seen: list[tuple[WorkerRecord, EngineContext]] = []

    def build(record: WorkerRecord, context: EngineContext) -> Engine:
        seen.append((record, context))
        return MockEngine(record.worker_id, block_size=context.block_size)

    register_engine_kind("sim", build)
    record = WorkerRecord(worker_id=9, kind="sim", url="sim://9")
    context = EngineContext(block_size=64)
    engine = engine_from_record(record, context)
    assert isinstance(engine, MockEngine) and engine.instance_id == 9
    assert seen == [(record, context)]
    assert "sim" in engine_kinds()


def test_a_kind_is_registered_once_unless_replaced_on_purpose() -> None:
    with pytest.raises(ValueError, match=r"'remote' is already registered.*replace=True"):
        register_engine_kind("remote", "somewhere:else")
    with pytest.raises(ValueError, match="needs a name"):
        register_engine_kind("", "somewhere:else")
    register_engine_kind("remote", "interlock.engines._kinds:build_mock", replace=True)
    engine = engine_from_record(WorkerRecord(worker_id=1, host="h", port=1), EngineContext())
    assert isinstance(engine, MockEngine)


def test_a_builder_named_by_a_string_is_imported_when_a_record_first_needs_it() -> None:
    register_engine_kind("nowhere", "interlock_no_such_module:build")  # not imported yet
    register_engine_kind("misnamed", "interlock.engines._kinds:build_nothing")
    record = WorkerRecord(worker_id=1, host="h", port=1, kind="nowhere")
    with pytest.raises(UnknownEngineKind, match="'nowhere' cannot be used: importing"):
        engine_from_record(record, EngineContext())
    misnamed = WorkerRecord(worker_id=1, host="h", port=1, kind="misnamed")
    with pytest.raises(UnknownEngineKind, match="has no 'build_nothing'"):
        engine_from_record(misnamed, EngineContext())


def test_the_context_derives_the_tokenizer_facts_once_and_shares_resources_read_only() -> None:
    tokenizer = ByteTokenizer()
    context = EngineContext(tokenizer=tokenizer, resources={"kv_events": 1})
    assert context.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert context.vocab_size == tokenizer.vocab_size
    with pytest.raises(TypeError):
        context.resources["kv_events"] = 2  # type: ignore[index]
    assert EngineContext().tokenizer_fingerprint is None and EngineContext().vocab_size is None
