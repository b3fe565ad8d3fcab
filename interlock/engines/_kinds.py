"""The builders of the engine kinds interlock ships, one per kind, named by `_factory`'s
registry as strings. Each imports its kind when first called, so that importing the factory
imports no kind: nothing imports this module but the factory, by name."""

from __future__ import annotations

from typing import Any

from ._factory import EngineContext
from ._protocol import Engine
from ._record import BadRecord, WorkerRecord


def build_remote(record: WorkerRecord, context: EngineContext) -> Engine:
    """``"remote"``: a `RemoteEngine` for the ``interlock worker`` at the record's ``host``
    and ``port``, which checks the worker's block size and tokenizer against the context's,
    with the context's heartbeat, worker secret and worker TLS, decoding KV events only when
    the context's ``decode_kv_events`` says the router uses them. The record's ``url`` (the
    worker's ``--openai-port`` surface) becomes the engine's ``http_url``.

    Raises:
        BadRecord: the record has no ``host`` or ``port``.
        ValueError: a value `RemoteEngine` refuses.
    """
    from .remote import RemoteEngine

    if not record.host or not record.port:
        raise BadRecord(
            f"worker {record.worker_id} is of kind 'remote' (an interlock worker) but its "
            f"record has no host and port ({record.address!r}); register it with both"
        )
    return RemoteEngine(
        record.host,
        record.port,
        instance_id=record.worker_id,
        role=record.role,
        block_size=context.block_size,
        tokenizer=context.tokenizer_fingerprint,
        vocab_size=context.vocab_size,
        connect_timeout=context.connect_timeout,
        max_backoff=context.max_backoff,
        heartbeat_interval=context.heartbeat_interval,
        heartbeat_timeout=context.heartbeat_timeout,
        worker_secret=context.worker_secret,
        tls=context.worker_tls,
        decode_kv_events=context.decode_kv_events,
        http_url=record.url,
    )


def build_openai(record: WorkerRecord, context: EngineContext) -> Engine:
    """``"openai"``: an `OpenAIEngine` for the OpenAI-compatible server at the record's
    ``url`` (else ``http://host:port``), checked against the context's block size and
    tokenizer, fed KV events by the context's ``"kv_events"`` resource when there is one (replayed
    from the record's ``kv_replay``), with the ``"engine_api_key"`` resource as its API key.

    Raises:
        BadRecord: the record has neither ``url`` nor ``host`` and ``port``.
        ValueError: a value `OpenAIEngine` refuses.
    """
    from .openai import OpenAIEngine

    url = record.url
    if url is None:
        if not record.host or not record.port:
            raise BadRecord(
                f"worker {record.worker_id} is of kind 'openai' but its record has neither a "
                "url nor a host and port; register its root URL, e.g. http://10.0.0.5:8000"
            )
        url = f"http://{record.host}:{record.port}"
    return OpenAIEngine(
        url,
        instance_id=record.worker_id,
        role=record.role,
        block_size=context.block_size,
        tokenizer=context.tokenizer,
        api_key=context.resources.get("engine_api_key"),
        kv_events=context.resources.get("kv_events"),
        kv_replay_endpoint=record.kv_replay,
        connect_timeout=context.connect_timeout,
        idle_timeout=context.idle_timeout,
    )


def build_mock(record: WorkerRecord, context: EngineContext) -> Engine:
    """``"mock"``: an in-process `MockEngine` standing in for the worker (simulations,
    tests), with the context's block size; with a tokenizer, it draws its tokens from the
    tokenizer's words (as ``interlock serve``'s in-process workers do)."""
    from .mock import MockEngine, mock_token_pool

    text: dict[str, Any] = {}
    if context.tokenizer is not None:
        text = {
            "token_pool": mock_token_pool(context.tokenizer),
            "vocab_size": context.tokenizer.vocab_size,
            "tokenizer": context.tokenizer,
        }
    return MockEngine(record.worker_id, record.role, block_size=context.block_size, **text)
