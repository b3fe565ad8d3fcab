"""The mock publishes its KV events as vLLM 0.32 does (reference/vllm-cpu.md section 2): a PUB
that connects to the subscriber's bound endpoint, ``[topic, seq, msgpack batch]`` frames, one
batch per engine step, ``BlockStored`` with its tokens (decode-time blocks too), one hash per
``BlockRemoved``, a lazy ``AllBlocksCleared``, and a replay ROUTER. Received here by real ZMQ
sockets and decoded with the shared codec (`interlock.wire.decode_kv_batch`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import zmq
from hypothesis import given
from hypothesis import strategies as st

from interlock.engines.mock import (
    MockEngine,
    MockOpenAIServer,
    MockTiming,
    VllmKvPublisher,
    mock_continuation,
    serve_mock_openai,
)
from interlock.kv import compute_block_hashes, compute_sequence_hashes
from interlock.wire import (
    REPLAY_END_SEQ,
    PreprocessedRequest,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    decode_kv_batch,
    parse_kv_message,
    parse_replay_reply,
    replay_request_frames,
)

TIMEOUT = 20


async def zmq_receive(sock: zmq.Socket[Any]) -> list[bytes]:
    """The next message, without blocking trio (reference/stack.md section 6)."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                frames: list[bytes] = sock.recv_multipart(zmq.NOBLOCK)
                return frames
            except zmq.Again:
                pass
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                continue
            await trio.lowlevel.wait_readable(sock.getsockopt(zmq.FD))


class Feed:
    """A bound SUB socket (as interlock's frontend binds one) and the mock publishing to it."""

    def __init__(self, server: MockOpenAIServer, client: httpx.AsyncClient, sub: Any) -> None:
        self.server = server
        self.client = client
        self.sub = sub
        self._warm = 0

    @property
    def publisher(self) -> VllmKvPublisher:
        assert self.server.kv_publisher is not None
        return self.server.kv_publisher

    async def next_batch(self) -> tuple[int, VllmKvBatch, bytes]:
        message = parse_kv_message(await zmq_receive(self.sub))
        assert message.topic == b"kv@1"
        return message.seq, decode_kv_batch(message.payload), message.payload

    async def warm_up(self) -> int:
        """Send fresh prompts until a batch arrives (ZMQ drops what a PUB sends before its
        connection is up, as vLLM's late subscribers see); return the next seq expected."""
        while True:
            self._warm += 1
            prompt = [9000 + self._warm] * self.server.engine.block_size
            await self.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            return parse_kv_message(frames).seq + 1

    async def complete(self, prompt: Sequence[int], max_tokens: int) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/completions",
            json={"prompt": list(prompt), "max_tokens": max_tokens, "return_token_ids": True},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@asynccontextmanager
async def kv_feed(**engine_options: Any) -> AsyncIterator[Feed]:
    options: dict[str, Any] = {"timing": MockTiming.zero(), "block_size": 16} | engine_options
    engine = MockEngine(1, keep_block_tokens=True, **options)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        async with trio.open_nursery() as nursery:
            server: MockOpenAIServer = await nursery.start(
                functools.partial(
                    serve_mock_openai,
                    engine,
                    kv_events_endpoint=endpoint,
                    kv_events_replay="tcp://127.0.0.1:*",
                )
            )
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
                feed = Feed(server, client, sub)
                yield feed
            nursery.cancel_scope.cancel()
    finally:
        sub.close(linger=0)
        context.term()


async def test_stored_blocks_carry_their_tokens_in_vllms_frames() -> None:
    prompt = list(range(500, 540))  # 2 full blocks of 16 and 8 tokens more
    async with kv_feed() as feed:
        seq = await feed.warm_up()
        body = await feed.complete(prompt, 30)
        generated = body["choices"][0]["token_ids"]
        batches = [await feed.next_batch() for _ in range(3)]
    assert [s for s, _, _ in batches] == [seq, seq + 1, seq + 2]
    events = [event for _, batch, _ in batches for event in batch.events]
    assert all(isinstance(e, VllmBlockStored) for e in events)
    first, third, fourth = events
    assert first.parent_block_hash is None and first.token_ids == tuple(prompt[:32])
    assert len(first.block_hashes) == 2 and first.block_size == 16
    assert first.medium == "GPU" and first.group_idx == 0 and first.lora_id is None
    assert first.kv_cache_spec_kind == "full_attention" and first.extra_keys == (None, None)
    # Blocks filled while decoding are announced too, parented on the block before.
    assert third.parent_block_hash == first.block_hashes[-1]
    assert third.token_ids == tuple(prompt[32:] + generated[:8])
    assert fourth.parent_block_hash == third.block_hashes[0]
    assert fourth.token_ids == tuple(generated[8:24])
    for _, batch, _ in batches:
        assert batch.data_parallel_rank == 0 and batch.ts > 0


async def test_a_repeated_prefix_is_not_announced_again() -> None:
    shared = list(range(700, 748))  # 3 blocks
    async with kv_feed() as feed:
        await feed.warm_up()
        await feed.complete([*shared, 1, 2, 3], 1)
        _, first, _ = await feed.next_batch()
        await feed.complete([*shared, *range(800, 816), 4], 1)
        _, second, _ = await feed.next_batch()
    (stored,) = first.events
    assert isinstance(stored, VllmBlockStored) and len(stored.block_hashes) == 3
    (extra,) = second.events
    assert isinstance(extra, VllmBlockStored)
    assert extra.parent_block_hash == stored.block_hashes[-1]
    assert extra.token_ids == tuple(range(800, 816))


async def test_evictions_are_one_hash_per_event_before_the_new_blocks() -> None:
    async with kv_feed(num_gpu_blocks=6, block_size=4) as feed:
        await feed.warm_up()
        await feed.complete(list(range(100, 116)), 1)  # 4 full blocks
        await feed.next_batch()
        await feed.complete(list(range(200, 216)), 1)  # needs the slots of 3 or more
        _, batch, _ = await feed.next_batch()
    removed = [e for e in batch.events if isinstance(e, VllmBlockRemoved)]
    assert removed and all(len(e.block_hashes) == 1 for e in removed)
    kinds = [type(e) for e in batch.events]
    assert kinds == [VllmBlockRemoved] * len(removed) + [VllmBlockStored]


async def test_a_clear_goes_out_with_the_next_step() -> None:
    async with kv_feed() as feed:
        await feed.warm_up()
        feed.server.engine.kv_cache.clear()
        before = feed.publisher.seq
        await feed.complete(list(range(300, 316)), 1)
        seq, batch, _ = await feed.next_batch()
    assert seq == before
    assert [type(e) for e in batch.events] == [VllmAllBlocksCleared, VllmBlockStored]


async def test_replay_answers_every_buffered_batch_then_the_end_marker() -> None:
    async with kv_feed() as feed:
        await feed.warm_up()
        await feed.complete(list(range(10, 42)), 1)
        live_seq, _, live_payload = await feed.next_batch()
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            assert feed.publisher.replay_endpoint is not None
            dealer.connect(feed.publisher.replay_endpoint)
            dealer.send_multipart(replay_request_frames(0))
            replies = []
            while True:
                frames = await zmq_receive(dealer)
                reply = parse_replay_reply(frames)
                if reply is None:
                    assert frames == [b"", b"", REPLAY_END_SEQ.to_bytes(8, "big"), b""]
                    break
                assert len(frames) == 4  # vLLM 0.26+: the topic frame included
                replies.append(reply)
            # The engine may have published more batches since `live_seq` (its scheduler runs
            # on): ask beyond any it can have.
            dealer.send_multipart(replay_request_frames(replies[-1].seq + 1_000))
            beyond = await zmq_receive(dealer)
        finally:
            dealer.close(linger=0)
            context.term()
    # Every buffered batch, in order, from the first: the live one and any published since.
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert len(replies) > live_seq
    assert all(r.topic == b"kv@1" for r in replies)
    assert replies[live_seq].payload == live_payload
    assert parse_replay_reply(beyond) is None


@given(
    prompts=st.lists(
        st.tuples(
            st.lists(st.integers(1, 3), min_size=1, max_size=30),
            st.integers(1, 12),
        ),
        min_size=1,
        max_size=12,
    ),
    blocks=st.integers(16, 40),
)
async def test_the_published_events_rebuild_the_cache_and_hash_their_tokens(
    autojump_clock: trio.testing.MockClock,
    prompts: list[tuple[list[int], int]],
    blocks: int,
) -> None:
    """Whatever the requests: every BlockStored's tokens hash (interlock's contract hash) to
    its block ids under its parent; seqs count from 0; and applying every batch in order
    leaves exactly the blocks the cache holds."""
    block_size = 4
    engine = MockEngine(
        2, block_size=block_size, num_gpu_blocks=blocks, keep_block_tokens=True, max_num_seqs=4
    )
    # Unconnected sockets: the batches are read from the replay buffer.
    publisher = VllmKvPublisher(engine, "tcp://127.0.0.1:1")
    engine.add_listener(publisher.on_event)
    engine.add_step_listener(publisher.on_step)

    async def run(prompt: list[int], max_tokens: int) -> None:
        request = PreprocessedRequest(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
        async with engine.open_stream(request) as stream:
            tokens = [t async for output in stream for t in output.token_ids]
        assert tokens == mock_continuation(prompt, max_tokens)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            async with trio.open_nursery() as requests:
                for index, (prompt, max_tokens) in enumerate(prompts):
                    requests.start_soon(run, prompt, max_tokens)
                    await trio.sleep(0.001 * index)
            # Stopping the engine drops its cache (a dead process's): read it first.
            final = engine.kv_cache.cached_blocks()
            nursery.cancel_scope.cancel()
    finally:
        publisher.close()
    held: set[int] = set()
    assert [seq for seq, _ in publisher.batches] == list(range(publisher.seq))
    for _, payload in publisher.batches:
        for event in decode_kv_batch(payload).events:
            if isinstance(event, VllmBlockStored):
                local = compute_block_hashes(list(event.token_ids), block_size)
                assert len(local) == len(event.block_hashes)
                parent = event.parent_block_hash
                chain = (
                    compute_sequence_hashes(local)
                    if parent is None
                    else compute_sequence_hashes([parent, *local])[1:]
                )
                assert tuple(chain) == event.block_hashes
                held.update(event.block_hashes)
            elif isinstance(event, VllmBlockRemoved):
                assert len(event.block_hashes) == 1
                held.difference_update(event.block_hashes)
            else:
                held.clear()
    assert held == final
