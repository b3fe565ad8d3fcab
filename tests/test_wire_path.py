"""The worker wire path does only the work someone needs: outputs that wait for a busy reader
arrive joined, KV events nobody routes by are skipped undecoded, and a worker whose vocabulary
the handshake checked gets no range check per token.

Real ``interlock worker`` processes on 127.0.0.1 (zero-time mock engines); waits poll a
condition under ``trio.fail_after``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import frontend_parser, wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_remote_workers import TIMEOUT, prompt, start_worker, stop
from test_remote_workers_protocol import Events

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.engines.remote import RemoteEngine, WorkerAddress, serve_worker
from interlock.engines.remote._connection import FrameConnection
from interlock.http._cli import resolve
from interlock.kv import KV_EVENT_TYPES, KvStored, StoredBlock
from interlock.processing import ByteTokenizer, tokenizer_fingerprint
from interlock.wire import EngineOutput, FrameParser, PreprocessedRequest, Usage, encode_frame
from interlock.wire._frames import Broken, Hello, Output, Outputs, Ping, Start
from interlock.wire._output import MAX_JOINED_TOKENS, join_outputs, join_waiting

# -- joining outputs ---------------------------------------------------------------------------

steps = st.builds(
    EngineOutput,
    token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4).map(tuple),
    text=st.none() | st.text(max_size=5),
)


@given(steps=st.lists(steps, max_size=12), usage=st.booleans())
def test_joined_outputs_carry_the_same_tokens_text_and_end(
    steps: list[EngineOutput], usage: bool
) -> None:
    last = EngineOutput(
        token_ids=(7,),
        finish_reason="length",
        usage=Usage(prompt_tokens=3, completion_tokens=1) if usage else None,
    )
    stream = [*steps, last]
    joined: list[EngineOutput] = []
    groups: list[list[EngineOutput]] = []
    for output in stream:
        merged = join_outputs(joined[-1], output) if joined else None
        if merged is None:
            joined.append(output)
            groups.append([output])
        else:
            joined[-1] = merged
            groups[-1].append(output)
    assert [t for o in joined for t in o.token_ids] == [t for o in stream for t in o.token_ids]
    assert "".join(o.text or "" for o in joined) == "".join(o.text or "" for o in stream)
    assert joined[-1].finish_reason == "length" and joined[-1].usage == last.usage
    assert all(o.finish_reason is None for o in joined[:-1])
    # Text and no text never mix in one output: None stays distinguishable from "".
    for output, group in zip(joined, groups, strict=True):
        assert all((o.text is None) == (output.text is None) for o in group)


extras = st.sampled_from(
    [
        EngineOutput(token_ids=(9,), finish_reason="stop"),
        EngineOutput(token_ids=(8,), usage=Usage(prompt_tokens=2, completion_tokens=1)),
        EngineOutput(token_ids=(6,), chat_delta={"tool_calls": []}),
        EngineOutput(token_ids=(5,) * (MAX_JOINED_TOKENS - 1)),
    ]
)


@given(st.lists(steps | extras, min_size=1, max_size=14))
def test_joining_what_waits_at_once_is_joining_it_one_by_one(
    stream: list[EngineOutput],
) -> None:
    # A stream's reader takes what waits joined in one go (`join_waiting`), as arriving
    # outputs were joined one by one before (`join_outputs`).
    one_by_one = stream[0]
    taken = 1
    for output in stream[1:]:
        merged = join_outputs(one_by_one, output)
        if merged is None:
            break
        one_by_one = merged
        taken += 1
    waiting = collections.deque(stream[1:])
    assert join_waiting(stream[0], waiting) == one_by_one
    assert list(waiting) == stream[taken:]


def test_outputs_that_end_a_stream_or_carry_extras_are_never_joined() -> None:
    plain = EngineOutput(token_ids=(1,))
    final = EngineOutput(token_ids=(2,), finish_reason="stop")
    delta = EngineOutput(token_ids=(3,), chat_delta={"tool_calls": []})
    assert join_outputs(final, plain) is None
    assert join_outputs(plain, delta) is None and join_outputs(delta, plain) is None
    assert join_outputs(plain, EngineOutput(token_ids=(4,), text="x")) is None
    assert join_outputs(plain, final) == EngineOutput(token_ids=(1, 2), finish_reason="stop")
    # A reader stuck for long gets outputs of bounded size, not one that grows forever.
    full = EngineOutput(token_ids=(5,) * MAX_JOINED_TOKENS)
    assert join_outputs(full, plain) is None


async def test_outputs_waiting_for_a_busy_reader_arrive_joined(tmp_path: Path) -> None:
    worker = await start_worker(tmp_path, 1, "--zero-time")
    try:
        with trio.fail_after(TIMEOUT):
            engine = worker.engine()
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                tokens = prompt(1)
                request = PreprocessedRequest(token_ids=tokens, max_tokens=40)
                async with engine.open_stream(request) as stream:
                    # The reader is busy elsewhere until the worker sent everything.
                    await wait_until(lambda: not engine.open_streams)
                    outputs = [output async for output in stream]
                nursery.cancel_scope.cancel()
    finally:
        await stop(worker)
    assert [t for o in outputs for t in o.token_ids] == mock_continuation(tokens, 40)
    assert len(outputs) == 1 and outputs[0].finish_reason == "length"


# -- one frame for the outputs queued between two writes (version 3) -----------------------------


async def test_outputs_waiting_for_the_writer_go_as_one_frame_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    conn = FrameConnection(ours, "a frontend")
    conn.batch_outputs = True
    event = _stored(1)
    parser = FrameParser()
    frames: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, lambda message: None)
        # All queued before the writer runs: one write's worth.
        conn.send_output_nowait(1, EngineOutput(token_ids=(1,)))
        conn.send_output_nowait(2, EngineOutput(token_ids=(2,), text="b"))
        conn.send_output_nowait(1, EngineOutput(token_ids=(3,)))
        conn.send_nowait(event)
        final = EngineOutput(
            token_ids=(4,),
            finish_reason="length",
            usage=Usage(prompt_tokens=1, completion_tokens=2),
        )
        conn.send_output_nowait(1, final)
        while len(frames) < 3:
            frames += parser.feed(await theirs.receive_some())
        nursery.cancel_scope.cancel()
    # Stream 1's first two outputs are one; the event stays between the outputs around it.
    assert frames == [
        Outputs(
            outputs=(
                (1, EngineOutput(token_ids=(1, 3))),
                (2, EngineOutput(token_ids=(2,), text="b")),
            )
        ),
        event,
        Outputs(outputs=((1, final),)),
    ]


async def test_outputs_too_large_together_go_apart_and_an_oversized_one_breaks_its_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    conn = FrameConnection(ours, "a frontend", max_frame_size=600)
    conn.batch_outputs = True
    parser = FrameParser()
    frames: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, lambda message: None)
        conn.send_output_nowait(1, EngineOutput(token_ids=(1,), text="a" * 250))
        conn.send_output_nowait(2, EngineOutput(token_ids=(2,), text="b" * 250))
        conn.send_output_nowait(3, EngineOutput(token_ids=(3,), text="c" * 1000))
        while len(frames) < 3:
            frames += parser.feed(await theirs.receive_some())
        nursery.cancel_scope.cancel()
    assert frames[:2] == [
        Outputs(outputs=((1, EngineOutput(token_ids=(1,), text="a" * 250)),)),
        Outputs(outputs=((2, EngineOutput(token_ids=(2,), text="b" * 250)),)),
    ]
    assert type(frames[2]) is Broken and frames[2].stream == 3
    assert "600" in frames[2].message, frames[2].message


async def _raw_stream(address: WorkerAddress, versions: tuple[int, ...]) -> dict[str, Any]:
    """Speak to a worker as a frontend of ``versions``: start 8 streams of 16 tokens, read
    until each has ended; return the version chosen, the frame tags in order, and each
    stream's tokens."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    parser = FrameParser()
    frames: list[Any] = []
    async with stream:
        await stream.send_all(encode_frame(Hello(versions=versions)))
        requests = [
            Start(stream=n, request=PreprocessedRequest(token_ids=prompt(n), max_tokens=16))
            for n in range(8)
        ]
        await stream.send_all(b"".join(encode_frame(start) for start in requests))
        tokens: dict[int, list[int]] = {n: [] for n in range(8)}
        ended: set[int] = set()
        while len(ended) < 8:
            for frame in parser.feed(await stream.receive_some()):
                frames.append(frame)
                pairs = [(frame.stream, frame.output)] if type(frame) is Output else []
                pairs += frame.outputs if type(frame) is Outputs else []
                for n, output in pairs:
                    tokens[n] += output.token_ids
                    if output.finish_reason is not None:
                        ended.add(n)
    return {
        "version": frames[0].version,
        "tags": [type(frame).__name__ for frame in frames[1:]],
        "tokens": tokens,
    }


@pytest.mark.parametrize("versions", [(1, 2), (1, 2, 3)])
async def test_a_version_3_frontend_gets_outputs_in_few_frames_an_older_one_frame_each(
    versions: tuple[int, ...],
) -> None:
    engine = MockEngine(1, timing=MockTiming.zero())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_worker, engine)
            got = await _raw_stream(address, versions)
            nursery.cancel_scope.cancel()
    assert got["version"] == max(versions)
    assert got["tokens"] == {n: mock_continuation(prompt(n), 16) for n in range(8)}
    outputs = [tag for tag in got["tags"] if tag in ("Output", "Outputs")]
    if max(versions) < 3:
        assert outputs == ["Output"] * 8 * 16
    else:
        # One frame per write: 8 streams step together, so each write carries several.
        assert set(outputs) == {"Outputs"} and len(outputs) < 8 * 16


# -- KV events ---------------------------------------------------------------------------------


def _stored(event_id: int) -> KvStored:
    block = StoredBlock(block_hash=event_id, tokens_hash=event_id)
    return KvStored(worker_id=1, event_id=event_id, parent_hash=None, blocks=(block,))


@given(cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_parser_skips_frames_of_the_tags_it_is_told_undecoded(cuts: list[int]) -> None:
    messages: list[Any] = [
        Ping(token=1),
        _stored(1),
        Output(stream=2, output=EngineOutput(token_ids=(5,))),
        _stored(2),
        Ping(token=3),
    ]
    data = b"".join(encode_frame(m) for m in messages)
    parser = FrameParser(skip_tags=("kv_stored", "kv_removed", "kv_cleared"))
    received: list[Any] = []
    start = 0
    for cut in sorted({*cuts, len(data)}):
        received += parser.feed(data[start:cut])
        start = cut
    assert received == [m for m in messages if type(m) is not KvStored]
    assert parser.skipped == 2 and parser.buffered == 0


async def test_a_frontend_that_does_not_route_by_kv_skips_the_kv_events(tmp_path: Path) -> None:
    worker = await start_worker(tmp_path, 1, "--zero-time")
    try:
        with trio.fail_after(TIMEOUT):
            engine = worker.engine(decode_kv_events=False)
            events = Events(engine)
            config = PipelineConfig(router_mode="round_robin")
            async with build_pipeline(config, Components(workers=[engine])) as pipeline:
                tokens = prompt(2, 64)
                request = PreprocessedRequest(token_ids=tokens, max_tokens=8)
                got = [t async for o in pipeline.generate(request) for t in o.token_ids]
                snapshot = await engine.snapshot()
                link = engine._link
                assert link is not None
                skipped = link.conn.skipped
    finally:
        await stop(worker)
    assert got == mock_continuation(tokens, 8)
    # The worker stored the prompt's blocks and said so; the frontend never decoded it.
    assert snapshot.kv_blocks and skipped >= 1
    assert not [e for e in events.seen if isinstance(e, KV_EVENT_TYPES)]


@pytest.mark.parametrize(
    ("flags", "decoded"),
    [
        (["--router-mode", "round_robin"], False),
        (["--router-mode", "random"], False),
        (["--router-mode", "kv"], True),
        (["--router-mode", "kv", "--no-kv-events"], False),
    ],
)
def test_serve_decodes_kv_events_only_for_a_router_that_uses_them(
    flags: list[str], decoded: bool
) -> None:
    setup = resolve(frontend_parser().parse_args(["serve", "--remote-worker", "1=h:7001", *flags]))
    (engine,), _ = setup.engines()
    assert isinstance(engine, RemoteEngine) and engine.decode_kv_events is decoded
    assert setup.engine_context().decode_kv_events is decoded


# -- the per-token id check --------------------------------------------------------------------


async def test_a_worker_whose_vocabulary_fits_is_checked_once_at_the_handshake(
    tmp_path: Path,
) -> None:
    tokenizer = ByteTokenizer()
    worker = await start_worker(tmp_path, 1, "--zero-time", "--tokenizer", "builtin")
    checked: list[bool] = []
    try:
        with trio.fail_after(TIMEOUT):
            for size in (tokenizer.vocab_size, None):
                engine = worker.engine(tokenizer=tokenizer_fingerprint(tokenizer), vocab_size=size)
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine.run)
                    checked.append(engine.vocab_checked)
                    nursery.cancel_scope.cancel()
    finally:
        await stop(worker)
    # Without the frontend's vocabulary size there is nothing to have checked.
    assert checked == [True, False]
