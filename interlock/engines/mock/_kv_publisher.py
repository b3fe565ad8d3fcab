"""`publish_vllm_kv_events`: a `MockEngine`'s KV events on a ZMQ feed exactly like vLLM's.

As vLLM 0.32 does (reference/vllm-cpu.md section 2, reference/engines.md section 1.2):

* a PUB socket that **connects** to the endpoint (it binds only when the address has ``*`` or
  ``::`` or is ``ipc://`` / ``inproc://``: vLLM's "bind stable, connect volatile" rule);
* 3 frames per message ``[topic, seq u64 big-endian, msgpack batch]``, ``seq`` from 0 per
  publisher, one batch per engine step that produced events (``AllBlocksCleared`` therefore
  goes out with the next step, as vLLM's does);
* ``BlockStored`` with the blocks' token ids, ``block_size``, ``medium "GPU"``, ``group_idx 0``
  and ``kv_cache_spec_kind "full_attention"``; ``BlockRemoved`` one hash per event;
* optionally a ROUTER bound at a replay endpoint that answers ``[id, b"", seq]`` with
  ``[id, b"", topic, seq, payload]`` per buffered batch from ``seq`` on, then
  ``[id, b"", b"", 0xFF*8, b""]``.

The block hashes are the mock's own (interlock's sequence hashes): opaque ids, as vLLM's are to
a consumer. ZMQ runs non-blocking under trio (reference/stack.md section 6): no threads.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import trio
import zmq

from ..._errors import ConfigError
from ...kv import KvCleared, KvRemoved, KvStored
from ...wire import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    VllmKvDecodeError,
    VllmKvEvent,
    encode_kv_batch,
    kv_message_frames,
    kv_topic,
    parse_replay_request,
    replay_end_frames,
    replay_reply_frames,
)
from .._zmq import recv_multipart
from ._engine import MockEngine

_logger = logging.getLogger("interlock.engines.mock.kv_events")


def _binds(endpoint: str) -> bool:
    """vLLM's rule: bind a stable address (wildcards, ipc, inproc), connect to the rest."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


class VllmKvPublisher:
    """The publishing side, attached to one engine. Built and run by `publish_vllm_kv_events`;
    read ``seq`` (batches sent so far), ``replay_endpoint`` (the bound address, with the port
    the OS chose for ``tcp://host:*``) and ``batches`` (what a replay can still answer)."""

    def __init__(
        self,
        engine: MockEngine,
        endpoint: str,
        *,
        topic: str | None = None,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
    ) -> None:
        if not engine.keep_block_tokens:
            raise ConfigError(
                f"worker {engine.instance_id}: vLLM's BlockStored events carry their tokens, so "
                "the engine must keep them; build it with MockEngine(..., keep_block_tokens=True)"
            )
        self.engine = engine
        self.endpoint = endpoint
        self.topic = topic.encode() if topic is not None else kv_topic(engine.instance_id)
        self.replay_endpoint = replay_endpoint
        self.data_parallel_rank = data_parallel_rank
        #: Batches sent so far (the next batch's seq).
        self.seq = 0
        #: ``(seq, payload)`` of the last ``buffer_steps`` batches, for replays.
        self.batches: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self._pending: list[VllmKvEvent] = []
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._router: zmq.Socket[Any] | None = None

    # -- engine side (synchronous, called by the engine) -----------------------------------

    def on_event(self, event: object) -> None:
        """Turn one engine event into vLLM events (read the stored blocks' tokens now, while
        the cache holds them)."""
        if isinstance(event, KvStored):
            cache = self.engine.kv_cache
            hashes = [block.block_hash for block in event.blocks]
            tokens: list[int] = []
            for h in hashes:
                tokens.extend(cache.block_tokens(h))
            # As vLLM sends them: a prompt's first block carries its cache salt.
            extra_keys: list[tuple[str] | None] = [None] * len(hashes)
            salt = cache.block_salt(hashes[0]) if event.parent_hash is None and hashes else None
            if salt is not None:
                extra_keys[0] = (salt,)
            self._pending.append(
                VllmBlockStored(
                    block_hashes=hashes,
                    parent_block_hash=event.parent_hash,
                    token_ids=tokens,
                    block_size=self.engine.block_size,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                    extra_keys=extra_keys,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        elif isinstance(event, KvRemoved):
            self._pending.extend(
                VllmBlockRemoved(block_hashes=(h,), medium="GPU", group_idx=0)
                for h in event.block_hashes
            )
        elif isinstance(event, KvCleared):
            self._pending.append(VllmAllBlocksCleared())

    def on_step(self) -> None:
        """An engine step ended: publish its events as one batch (PUB never blocks: past the
        high-water mark ZMQ drops the message, as it does for vLLM)."""
        if not self._pending:
            return
        batch = VllmKvBatch(
            ts=time.time(), events=self._pending, data_parallel_rank=self.data_parallel_rank
        )
        self._pending = []
        payload = encode_kv_batch(batch)
        seq = self.seq
        self.seq += 1
        self.batches.append((seq, payload))
        try:
            self._pub.send_multipart(kv_message_frames(self.topic, seq, payload), zmq.NOBLOCK)
        except zmq.Again:
            _logger.warning("KV event batch %d dropped: the subscriber is not keeping up", seq)

    # -- sockets ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (or bind) the PUB socket and bind the replay ROUTER.

        Raises:
            zmq.ZMQError: an endpoint is malformed or cannot be bound.
        """
        if _binds(self.endpoint):
            self._pub.bind(self.endpoint)
        else:
            self._pub.connect(self.endpoint)
        if self.replay_endpoint is not None:
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(self.replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._router = router

    def close(self) -> None:
        """Close the sockets (unsent messages are dropped) and the ZMQ context."""
        self._pub.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)
        self._context.term()

    async def serve_replays(self) -> None:
        """Answer replay requests until cancelled (returns at once without a replay endpoint)."""
        router = self._router
        while router is not None:
            frames = await recv_multipart(router)
            identity, rest = frames[0], frames[1:]
            try:
                start = parse_replay_request(rest)
            except VllmKvDecodeError as exc:
                _logger.warning("invalid replay request dropped: %s", exc)
                continue
            try:
                for seq, payload in list(self.batches):
                    if seq >= start:
                        router.send_multipart(
                            [identity, *replay_reply_frames(seq, payload, topic=self.topic)],
                            zmq.NOBLOCK,
                        )
                router.send_multipart([identity, *replay_end_frames()], zmq.NOBLOCK)
            except zmq.Again:
                _logger.warning("replay to a slow client cut short (its queue is full)")


async def publish_vllm_kv_events(
    engine: MockEngine,
    endpoint: str,
    *,
    topic: str | None = None,
    replay_endpoint: str | None = None,
    buffer_steps: int = 10_000,
    task_status: trio.TaskStatus[VllmKvPublisher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish ``engine``'s KV events as vLLM does until cancelled (see the module docstring).

    Use with ``publisher = await nursery.start(publish_vllm_kv_events, engine, endpoint)``:
    it returns once the sockets are open. ``topic`` defaults to ``kv@<worker id>``;
    ``replay_endpoint`` (e.g. ``tcp://127.0.0.1:*``) adds the replay ROUTER, whose bound
    address is ``publisher.replay_endpoint``. The engine must keep its blocks' tokens
    (``MockEngine(..., keep_block_tokens=True)``).

    Raises:
        ConfigError: the engine keeps no block tokens.
        zmq.ZMQError: an endpoint is malformed or cannot be bound.
    """
    publisher = VllmKvPublisher(
        engine,
        endpoint,
        topic=topic,
        replay_endpoint=replay_endpoint,
        buffer_steps=buffer_steps,
    )
    try:
        publisher.open()
        remove_event = engine.add_listener(publisher.on_event)
        remove_step = engine.add_step_listener(publisher.on_step)
        try:
            task_status.started(publisher)
            if publisher.replay_endpoint is not None:
                await publisher.serve_replays()
            else:
                await trio.sleep_forever()
        finally:
            remove_event()
            remove_step()
    finally:
        publisher.close()
