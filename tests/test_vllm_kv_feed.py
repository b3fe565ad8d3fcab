"""KvEventFeed and replays over real ZMQ sockets on loopback: vLLM-shaped publishers (a PUB that
connects to the bound feed, a ROUTER answering replays in either reply layout) drive the feed's
topic dispatch, its counters, and KvMirror's late start, gap and restart handling end to end.

ZMQ's slow joiner: a PUB's first messages are dropped until its connection is up, so each
publisher first resends a warm-up batch on a topic of its own until the feed has one; the
messages after it then arrive in order. Waits are on conditions; `fail_after` only bounds a hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import zmq

from interlock.engines.openai._kv_feed import (
    KvEventFeed,
    KvEventRelay,
    KvFeedBindError,
    KvReplayFailed,
    kv_topic,
    recv_multipart,
    replay_kv_batches,
)
from interlock.engines.openai._kv_mirror import KvMirror
from interlock.kv import KvCleared, KvEvent, KvIndexer, compute_block_hashes
from interlock.wire import (
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    encode_kv_batch,
    kv_message_frames,
    parse_replay_request,
    replay_end_frames,
    replay_reply_frames,
)

LOOPBACK = "tcp://127.0.0.1:0"
BLOCK = 4
HANG = 20  # seconds: only a guard against a hang, never a timing assertion


def block(h: int, parent: int | None, start: int) -> VllmKvBatch:
    stored = VllmBlockStored([h], parent, range(start, start + BLOCK), BLOCK)
    return VllmKvBatch(ts=1.0, events=[stored], data_parallel_rank=0)


class Changes:
    """Something tests wait on: `note()` after each change, `wait_until(predicate)` to wait."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def note(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()
            self._changed = trio.Event()


class Received(Changes):
    """A feed handler recording ``(seq, batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, VllmKvBatch]] = []

    def __call__(self, seq: int, batch: VllmKvBatch) -> None:
        self.batches.append((seq, batch))
        self.note()

    @property
    def seqs(self) -> list[int]:
        return [seq for seq, _ in self.batches]


class FakeVllm:
    """A vLLM engine's KV-event sockets: a PUB that connects to the feed with ``topic`` and a
    bound ROUTER answering replays from every batch published (delivered or not) as vLLM does,
    with (``topic_in_replay``, vLLM 0.26+) or without a topic frame."""

    _warmups = iter(range(10**6, 10**7))

    def __init__(self, feed: KvEventFeed, engine_id: int, *, topic_in_replay: bool = True) -> None:
        self.feed = feed
        self.topic = kv_topic(engine_id)
        self.topic_in_replay = topic_in_replay
        context = zmq.Context.instance()
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(feed.endpoint)
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(LOOPBACK)
        self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.history: list[tuple[int, bytes]] = []
        self.replays: list[int] = []

    def publish(self, batch: VllmKvBatch, *, deliver: bool = True, layout: Any = "map") -> int:
        seq = len(self.history)
        payload = encode_kv_batch(batch, layout=layout)
        self.history.append((seq, payload))
        if deliver:
            self.pub.send_multipart(kv_message_frames(self.topic, seq, payload))
        return seq

    def restart(self) -> None:
        self.history = []

    async def connected(self) -> None:
        """Resend a warm-up batch on a topic of its own until the feed has one."""
        warmup = next(self._warmups)
        got = Received()
        unsubscribe = self.feed.subscribe(warmup, got)
        payload = encode_kv_batch(VllmKvBatch(ts=0.0, events=()))
        try:
            while not got.batches:
                self.pub.send_multipart(kv_message_frames(kv_topic(warmup), 0, payload))
                with trio.move_on_after(0.05):
                    await got.wait_until(lambda: bool(got.batches))
        finally:
            unsubscribe()

    async def serve_replays(self) -> None:
        while True:
            identity, *request = await recv_multipart(self.router)
            start = parse_replay_request(request)
            self.replays.append(start)
            topic = self.topic if self.topic_in_replay else None
            for seq, payload in self.history:
                if seq >= start:
                    self.router.send_multipart(
                        [identity, *replay_reply_frames(seq, payload, topic=topic)]
                    )
            self.router.send_multipart(
                [identity, *replay_end_frames(topic_frame=self.topic_in_replay)]
            )

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


@asynccontextmanager
async def running_feed(endpoint: str = LOOPBACK) -> AsyncIterator[tuple[KvEventFeed, trio.Nursery]]:
    feed = KvEventFeed(endpoint)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(feed.run)
            assert bound == feed.endpoint and not bound.endswith(":0")
            yield feed, nursery
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def fake_vllm(feed: KvEventFeed, engine_id: int, **kwargs: Any) -> AsyncIterator[FakeVllm]:
    engine = FakeVllm(feed, engine_id, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.serve_replays)
            await engine.connected()
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        engine.close()


# -- the feed -----------------------------------------------------------------------------------


async def test_batches_reach_the_engine_subscribed_to_their_topic_in_order() -> None:
    async with running_feed() as (feed, _), fake_vllm(feed, 1) as one, fake_vllm(feed, 2) as two:
        got_one, got_two = Received(), Received()
        feed.subscribe(1, got_one)
        feed.subscribe(2, got_two)
        for n in range(5):
            one.publish(block(n, None, n))
            two.publish(block(100 + n, None, n), layout="array")
        await got_one.wait_until(lambda: len(got_one.batches) == 5)
        await got_two.wait_until(lambda: len(got_two.batches) == 5)
        assert got_one.seqs == got_two.seqs == [0, 1, 2, 3, 4]
        assert got_one.batches[3][1] == block(3, None, 3)
        assert got_two.batches[3][1] == block(103, None, 3)


async def test_unknown_topics_and_undecodable_messages_are_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_feed() as (feed, _), fake_vllm(feed, 1) as engine:
        got = Received()
        feed.subscribe(1, got)
        before = feed.stats
        stranger = kv_message_frames(b"kv@99", 0, encode_kv_batch(block(1, None, 0)))
        for _ in range(3):
            engine.pub.send_multipart(stranger)
        engine.pub.send_multipart([engine.topic, b"\x00" * 8, b"\xc1"])  # not msgpack
        engine.pub.send_multipart([engine.topic, b"\x00"])  # two frames
        engine.publish(block(1, None, 0))
        # One publisher's messages arrive in order: once this one is in, so are the others.
        await got.wait_until(lambda: bool(got.batches))
        stats = feed.stats
        assert stats.unknown_topic - before.unknown_topic == 3
        assert stats.undecodable - before.undecodable == 2
        assert stats.delivered - before.delivered == 1
        assert stats.messages - before.messages == 6
        assert caplog.text.count("'kv@99'") == 1, "an unknown topic is logged once"


async def test_unknown_event_types_are_counted() -> None:
    import msgpack  # type: ignore[import-untyped]

    async with running_feed() as (feed, _), fake_vllm(feed, 1) as engine:
        got = Received()
        feed.subscribe(1, got)
        payload = msgpack.packb([1.0, [{"type": "BlockMoved"}, ["Other"]], 0])
        engine.pub.send_multipart(kv_message_frames(engine.topic, 0, payload))
        await got.wait_until(lambda: bool(got.batches))
        assert got.batches[0][1].events == ()
        assert feed.stats.unknown_events == 2


async def test_unsubscribing_stops_delivery_and_ids_cannot_be_shared() -> None:
    async with running_feed() as (feed, _), fake_vllm(feed, 1) as engine:
        got, later = Received(), Received()
        unsubscribe = feed.subscribe(1, got)
        with pytest.raises(ValueError, match="already subscribed"):
            feed.subscribe(1, later)
        engine.publish(block(1, None, 0))
        await got.wait_until(lambda: bool(got.batches))
        unsubscribe()
        unsubscribe()
        feed.subscribe(1, later)
        engine.publish(block(2, None, 0))
        await later.wait_until(lambda: bool(later.batches))
        assert got.seqs == [0] and later.seqs == [1]


async def test_the_same_endpoint_can_be_bound_again_right_after_the_feed_stops() -> None:
    async with running_feed() as (feed, _):
        endpoint = feed.endpoint
    for _ in range(3):
        async with running_feed(endpoint) as (again, _), fake_vllm(again, 1) as engine:
            got = Received()
            again.subscribe(1, got)
            engine.publish(block(1, None, 0))
            await got.wait_until(lambda got=got: bool(got.batches))


async def test_a_bound_endpoint_is_refused_naming_it_and_the_option_to_change() -> None:
    async with running_feed() as (feed, _):
        endpoint = feed.endpoint
        with pytest.raises(KvFeedBindError) as caught:
            await KvEventFeed(endpoint).run()
    message = str(caught.value)
    assert endpoint in message and "already in use" in message
    assert "--kv-events-bind" in message
    with pytest.raises(KvFeedBindError, match="ZMQ endpoint such as"):
        await KvEventFeed("nonsense://x").run()


async def test_the_relay_of_several_processes_refuses_a_bound_endpoint_the_same_way() -> None:
    # `interlock serve --processes N --kv-events-bind` binds it in the supervisor's relay.
    async with running_feed() as (feed, _):
        endpoint = feed.endpoint
        with pytest.raises(KvFeedBindError) as caught:
            KvEventRelay(endpoint, "tcp://127.0.0.1:*")
    message = str(caught.value)
    assert endpoint in message and "already in use" in message


async def test_a_running_feed_cannot_run_twice() -> None:
    async with running_feed() as (feed, _):
        with pytest.raises(RuntimeError, match="already running"):
            await feed.run()


# -- replay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic_in_replay", [True, False], ids=["0.26+", "0.25"])
async def test_a_replay_returns_the_batches_from_the_start_seq_in_either_layout(
    topic_in_replay: bool,
) -> None:
    async with (
        running_feed() as (feed, _),
        fake_vllm(feed, 1, topic_in_replay=topic_in_replay) as engine,
    ):
        for n in range(4):
            engine.publish(block(n, None, n), deliver=False)
        got = await replay_kv_batches(engine.replay_endpoint, 2, timeout=HANG)
        assert got == [(2, block(2, None, 2)), (3, block(3, None, 3))]
        assert await replay_kv_batches(engine.replay_endpoint, 10, timeout=HANG) == []


async def test_a_replay_nobody_answers_fails_after_its_timeout() -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        router.bind(LOOPBACK)
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        with pytest.raises(KvReplayFailed, match="did not end within"):
            await replay_kv_batches(endpoint, 0, timeout=0.2)
    finally:
        router.close(linger=0)


async def test_a_malformed_replay_reply_fails_the_replay() -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        router.bind(LOOPBACK)
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)

        async def answer_badly() -> None:
            identity, *_ = await recv_multipart(router)
            router.send_multipart([identity, b"", b"\x00" * 8, b"\xc1"])

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_badly)
                with pytest.raises(KvReplayFailed, match="malformed reply"):
                    await replay_kv_batches(endpoint, 0, timeout=HANG)
    finally:
        router.close(linger=0)


# -- a mirror fed by the feed -------------------------------------------------------------------


class Published(Changes):
    """A mirror's published events, applied to a real index as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[KvEvent] = []
        self.index = KvIndexer()

    def __call__(self, event: KvEvent) -> None:
        self.events.append(event)
        self.index.apply(event)
        self.note()


@asynccontextmanager
async def mirrored(
    feed: KvEventFeed, nursery: trio.Nursery, engine: FakeVllm
) -> AsyncIterator[tuple[KvMirror, Published, Received]]:
    """A mirror of ``engine`` wired as an engine wires it; also yields the batches delivered."""
    published = Published()
    mirror = KvMirror(9, BLOCK, published, replay_endpoint=engine.replay_endpoint)
    await nursery.start(mirror.run)
    delivered = Received()

    def handler(seq: int, batch: VllmKvBatch) -> None:
        delivered(seq, batch)
        mirror.on_batch(seq, batch)

    unsubscribe = feed.subscribe(9, handler)
    yield mirror, published, delivered
    unsubscribe()


REPLY_LAYOUTS = pytest.mark.parametrize("topic_in_replay", [True, False], ids=["0.26+", "0.25"])


@REPLY_LAYOUTS
async def test_a_late_subscriber_replays_from_0(topic_in_replay: bool) -> None:
    async with (
        running_feed() as (feed, nursery),
        fake_vllm(feed, 9, topic_in_replay=topic_in_replay) as engine,
    ):
        # Published before interlock listened (vLLM's PUB drops them).
        engine.publish(block(10, None, 0), deliver=False)
        engine.publish(block(11, 10, 100), deliver=False)
        engine.publish(VllmKvBatch(ts=1.0, events=[VllmBlockRemoved([10])]), deliver=False)
        async with mirrored(feed, nursery, engine) as (mirror, published, _):
            engine.publish(block(12, 11, 200))
            await published.wait_until(lambda: set(mirror.blocks()) == {11, 12})
            assert engine.replays == [0]
            assert published.index.blocks_of(9) == {11, 12}
            assert mirror.stats.clears == 0


@REPLY_LAYOUTS
async def test_a_gap_is_replayed_from_the_first_missing_batch(topic_in_replay: bool) -> None:
    async with (
        running_feed() as (feed, nursery),
        fake_vllm(feed, 9, topic_in_replay=topic_in_replay) as engine,
        mirrored(feed, nursery, engine) as (mirror, published, delivered),
    ):
        engine.publish(block(10, None, 0))
        await delivered.wait_until(lambda: delivered.seqs == [0])
        engine.publish(block(11, 10, 100), deliver=False)
        engine.publish(block(12, 11, 200), deliver=False)
        engine.publish(block(13, 12, 300))
        engine.publish(block(14, 13, 400))
        await published.wait_until(lambda: len(mirror.blocks()) == 5)
        assert engine.replays == [1]
        assert [e.event_id for e in published.events] == list(range(len(published.events)))
        prompt = [t for start in range(0, 500, 100) for t in range(start, start + BLOCK)]
        matches = published.index.find_matches(compute_block_hashes(prompt, BLOCK))
        assert matches.scores == {9: 5}


@REPLY_LAYOUTS
async def test_seq_going_backwards_clears_the_engines_blocks(topic_in_replay: bool) -> None:
    async with (
        running_feed() as (feed, nursery),
        fake_vllm(feed, 9, topic_in_replay=topic_in_replay) as engine,
        mirrored(feed, nursery, engine) as (mirror, published, _),
    ):
        for n in range(3):
            engine.publish(block(10 + n, None, 100 * n))
        await published.wait_until(lambda: len(mirror.blocks()) == 3)
        engine.restart()
        engine.publish(block(20, None, 900))
        await published.wait_until(lambda: set(mirror.blocks()) == {20})
        assert isinstance(published.events[-2], KvCleared)
        assert engine.replays == []
        assert published.index.blocks_of(9) == {20}


async def test_a_batch_nested_past_the_recursion_limit_leaves_the_feed_running() -> None:
    # ~600 bytes of extra_keys nested 500 deep once ended the feed for every engine.
    event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    fields = b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in event.items())
    head = b"\x93" + msgpack.packb(1.0) + b"\x91\x89" + fields + msgpack.packb("extra_keys")
    nested = head + b"\x91" * 500 + b"\x00" + b"\x00"  # then data_parallel_rank 0
    too_deep = head + b"\x91" * 100_000 + b"\x00" + b"\x00"  # past msgpack's own limit
    async with running_feed() as (feed, _), fake_vllm(feed, 1) as engine:
        got = Received()
        feed.subscribe(1, got)
        before = feed.stats
        for seq, payload in enumerate((nested, too_deep)):
            engine.pub.send_multipart(kv_message_frames(engine.topic, seq, payload))
        engine.pub.send_multipart(
            kv_message_frames(engine.topic, 2, encode_kv_batch(block(2, None, 0)))
        )
        await got.wait_until(lambda: got.seqs == [0, 2])
        assert feed.stats.undecodable - before.undecodable == 1
        (stored,) = got.batches[0][1].events
        assert isinstance(stored, VllmBlockStored)
        assert stored.block_hashes == (1,)
        assert got.batches[1][1] == block(2, None, 0)
