"""`MockEngine`: an in-process worker with a batch scheduler, the reference timing model,
deterministic tokens, and fault injection. Runs under `trio.testing.MockClock`."""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import trio

from ..._errors import WorkerGone, WorkerRefused
from ...processing import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from ...wire import (
    EngineOutput,
    PrefillResult,
    PreprocessedRequest,
    Usage,
    WorkerJoined,
    WorkerLeft,
)
from .._protocol import ROLES, ActiveSequence, EventListener, Role, WorkerSnapshot
from ._timing import MockTiming

_MASK32 = 0xFFFF_FFFF


def mock_next_token(
    prev_token: int, position: int, *, engine_seed: int = 0, request_seed: int = 0, vocab: int
) -> int:
    """The token a mock engine generates at ``position`` after ``prev_token``."""
    x = (
        prev_token * 0x9E3779B1
        + position * 0x85EBCA77
        + engine_seed * 0xC2B2AE3D
        + request_seed * 0x27D4EB2F
    ) & _MASK32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _MASK32
    x ^= x >> 13
    return x % vocab


def mock_continuation(
    prompt: tuple[int, ...] | list[int],
    n: int,
    *,
    engine_seed: int = 0,
    request_seed: int = 0,
    vocab: int = 32_000,
) -> list[int]:
    """The ``n`` tokens a mock engine generates for ``prompt`` when nothing stops it: what a
    test compares a stream against, whatever workers and migrations it went through."""
    tokens: list[int] = []
    prev = prompt[-1]
    for i in range(n):
        prev = mock_next_token(
            prev, len(prompt) + i, engine_seed=engine_seed, request_seed=request_seed, vocab=vocab
        )
        tokens.append(prev)
    return tokens


def mock_token_text(token_id: int) -> str:
    """The text the mock engine returns for a token when asked to detokenize."""
    return f" t{token_id}"


class _Broken:
    """Queued into a stream when its worker crashes."""


_BROKEN = _Broken()


class _Sequence:
    __slots__ = (
        "cancelled",
        "detok",
        "finished",
        "generated",
        "max_new",
        "new_tokens",
        "prefill_done",
        "prev_token",
        "prompt_len",
        "receive",
        "request",
        "request_id",
        "seed",
        "send",
        "stop_text",
        "stops",
    )

    def __init__(self, request: PreprocessedRequest, request_id: str, stops: frozenset[int]):
        self.request = request
        self.request_id = request_id
        self.prompt_len = len(request.token_ids)
        self.prev_token = request.token_ids[-1]
        self.generated = 0
        self.max_new = request.max_tokens
        # A decode leg receives the prompt's KV from its prefill worker: nothing to compute.
        self.new_tokens = 0 if request.prefill_result is not None else self.prompt_len
        self.prefill_done = False
        self.cancelled = False
        self.finished = False
        self.seed = request.sampling.seed or 0
        self.stops = stops
        self.detok: IncrementalDetokenizer | None = None
        self.stop_text: StopStringMatcher | None = None
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)


class _MockStream:
    """The context manager and iterator `MockEngine.open_stream` returns."""

    __slots__ = ("_done", "_engine", "_seq")

    def __init__(self, engine: MockEngine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq
        self._done = False

    async def __aenter__(self) -> AsyncIterator[EngineOutput]:
        self._engine._admit(self._seq)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._engine._release(self._seq)

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._seq.receive.receive()
        if item is _BROKEN:
            self._done = True
            raise WorkerGone(
                f"worker {self._engine.instance_id} went away after "
                f"{self._seq.generated} tokens of request {self._seq.request_id!r}",
                worker_id=self._engine.instance_id,
            )
        if item.finish_reason is not None:
            self._done = True
        return item  # type: ignore[no-any-return]


class MockEngine:
    """A simulated worker.

    It batches like a vLLM-style scheduler (a FIFO waiting queue; at most ``max_num_seqs``
    running; at most ``max_num_batched_tokens`` new prompt tokens per step; admission only
    while the prompt's KV blocks fit under ``(1 - watermark)`` of ``num_gpu_blocks``). Each
    step takes the reference mocker's time (`MockTiming`), prefills what it admitted and gives
    every running sequence one token.

    Tokens are a deterministic function of ``seed``, the request's sampling seed, the previous
    token and the position, so a request that migrates to another engine with the same seed
    continues exactly as it would have. ``token_pool`` restricts them to a set of ids (say,
    the ids of real words under a tokenizer). With ``postprocessing='engine'`` the engine
    applies the stop conditions itself and returns text: decoded with ``tokenizer`` when it
    has one, `mock_token_text` otherwise.

    Fault injection: `crash` (streams break; new ones are refused until `restart`),
    ``crash_after_tokens`` (crash once that many tokens were emitted in all), `refuse_new`,
    `stall`, `slow`, `leave` / `rejoin` (withdraw from discovery but keep serving).
    """

    def __init__(
        self,
        instance_id: int,
        role: Role = "agg",
        *,
        seed: int = 0,
        timing: MockTiming | None = None,
        block_size: int = 16,
        num_gpu_blocks: int = 16_384,
        watermark: float = 0.01,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int = 32_768,
        vocab_size: int = 32_000,
        token_pool: Sequence[int] | None = None,
        tokenizer: Tokenizer | None = None,
        crash_after_tokens: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if type(instance_id) is not int or instance_id < 0:
            raise ValueError(f"instance_id must be a non-negative int, got {instance_id!r}")
        self._instance_id = instance_id
        self._role: Role = role
        self.seed = seed
        self.timing = timing or MockTiming()
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.watermark = watermark
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        #: Generated tokens are drawn from this pool (e.g. the ids of real words) if given.
        self.token_pool = tuple(token_pool) if token_pool else None
        #: Turns tokens into text when a request asks the engine to detokenize.
        self.tokenizer = tokenizer
        self.crash_after_tokens = crash_after_tokens
        #: Counters for tests and reports.
        self.tokens_emitted = 0
        self.requests_started = 0
        self.requests_finished = 0
        self.requests_cancelled = 0
        self.crashes = 0
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: dict[int, _Sequence] = {}
        self._active_blocks = 0
        self._active_tokens = 0
        self._down = False
        self._refusing = False
        self._registered = True
        self._stalled_until = -math.inf
        self._slow_factor = 1.0
        self._epoch = 0
        self._wake = trio.Event()
        self._listeners: list[EventListener] = []
        self._next_anonymous = 0

    # -- Engine protocol ------------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        return self._instance_id

    @property
    def role(self) -> Role:
        return self._role

    def open_stream(self, request: PreprocessedRequest) -> _MockStream:
        request_id = request.request_id
        if request_id is None:
            self._next_anonymous += 1
            request_id = f"mock-{self._instance_id}-{self._next_anonymous}"
        stops = frozenset(request.stop_token_ids) | (
            frozenset() if request.ignore_eos else frozenset(request.eos_token_ids)
        )
        seq = _Sequence(request, request_id, stops)
        if request.detokenize and self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=request.token_ids)
        if request.stop:
            seq.stop_text = StopStringMatcher(
                request.stop, include_stop_str_in_output=request.include_stop_str_in_output
            )
        return _MockStream(self, seq)

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def snapshot(self) -> WorkerSnapshot:
        await trio.lowlevel.checkpoint()
        active = [
            ActiveSequence(
                request_id=s.request_id,
                prompt_tokens=s.prompt_len,
                cached_tokens=s.prompt_len - s.new_tokens,
                generated_tokens=s.generated,
                prefill_done=s.prefill_done,
            )
            for s in (*self._running.values(), *self._waiting)
            if not s.cancelled and not s.finished
        ]
        return WorkerSnapshot(worker_id=self._instance_id, role=self._role, active=tuple(active))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until cancelled; streams still open then are broken."""
        task_status.started()
        try:
            await self._schedule_forever()
        finally:
            self._break_all()

    # -- state for tests ------------------------------------------------------------------

    @property
    def active_requests(self) -> int:
        """Requests admitted and not yet finished or cancelled (waiting or running)."""
        return len(self._running) + sum(1 for s in self._waiting if not s.cancelled)

    @property
    def is_down(self) -> bool:
        return self._down

    @property
    def registered(self) -> bool:
        return self._registered

    # -- fault injection ------------------------------------------------------------------

    def crash(self) -> None:
        """Break every open stream, drop all state, refuse new streams until `restart`, and
        leave discovery (a dead process loses its registration)."""
        if self._down:
            return
        self._down = True
        self.crashes += 1
        self._break_all()
        self._set_registered(False)

    def restart(self) -> None:
        """Come back up after `crash`, empty, and rejoin discovery."""
        self._down = False
        self._refusing = False
        self._stalled_until = -math.inf
        self._set_registered(True)

    def refuse_new(self, refuse: bool = True) -> None:
        """Refuse (or accept again) new streams; open ones carry on."""
        self._refusing = refuse

    def stall(self, seconds: float) -> None:
        """Produce nothing for ``seconds`` (trio time) from now."""
        self._stalled_until = max(self._stalled_until, trio.current_time() + seconds)
        self._wake.set()

    def slow(self, factor: float) -> None:
        """Make every step ``factor`` times slower (1.0 restores normal speed)."""
        if factor <= 0:
            raise ValueError(f"slow factor must be > 0, got {factor}")
        self._slow_factor = factor

    def leave(self) -> None:
        """Withdraw from discovery (drain): no new routing, open streams carry on."""
        self._set_registered(False)

    def rejoin(self) -> None:
        """Return to discovery after `leave`."""
        if not self._down:
            self._set_registered(True)

    # -- internals ------------------------------------------------------------------------

    def _set_registered(self, registered: bool) -> None:
        if registered == self._registered:
            return
        self._registered = registered
        event = WorkerJoined(self._instance_id) if registered else WorkerLeft(self._instance_id)
        for listener in list(self._listeners):
            listener(event)

    def _admit(self, seq: _Sequence) -> None:
        if self._down:
            raise WorkerRefused(f"worker {self._instance_id} is down", worker_id=self._instance_id)
        if self._refusing:
            raise WorkerRefused(
                f"worker {self._instance_id} refuses new requests", worker_id=self._instance_id
            )
        self.requests_started += 1
        self._waiting.append(seq)
        self._wake.set()

    def _release(self, seq: _Sequence) -> None:
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        self.requests_cancelled += 1
        if self._running.pop(id(seq), None) is not None:
            self._free(seq)

    def _free(self, seq: _Sequence) -> None:
        self._active_blocks -= -(-seq.prompt_len // self.block_size)
        self._active_tokens -= seq.prompt_len + seq.generated

    def _break_all(self) -> None:
        self._epoch += 1
        for seq in (*self._running.values(), *self._waiting):
            if not seq.cancelled and not seq.finished:
                seq.finished = True
                seq.send.send_nowait(_BROKEN)
        self._running.clear()
        self._waiting.clear()
        self._active_blocks = 0
        self._active_tokens = 0

    async def _schedule_forever(self) -> None:
        timing = self.timing
        capacity_tokens = self.num_gpu_blocks * self.block_size
        block_budget = (1.0 - self.watermark) * self.num_gpu_blocks
        while True:
            if not self._running and not self._waiting:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if self._stalled_until > trio.current_time():
                await trio.sleep_until(self._stalled_until)
                continue
            new_tokens = self._admit_waiting(block_budget)
            decoding = any(s.prefill_done for s in self._running.values())
            step = timing.prefill_seconds(new_tokens)
            if decoding:
                step += timing.decode_seconds(self._active_tokens / capacity_tokens)
            epoch = self._epoch
            if step > 0:
                await trio.sleep(step * self._slow_factor)
            else:
                await trio.lowlevel.checkpoint()
            if epoch != self._epoch or self._stalled_until > trio.current_time():
                continue  # crashed or stalled meanwhile: this step produced nothing
            self._emit_step()

    def _admit_waiting(self, block_budget: float) -> int:
        waiting = self._waiting
        running = self._running
        new_tokens = 0
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if seq.cancelled:
                waiting.popleft()
                continue
            blocks = -(-seq.prompt_len // self.block_size)
            if running and (
                self._active_blocks + blocks > block_budget
                or new_tokens + seq.new_tokens > self.max_num_batched_tokens
            ):
                break
            waiting.popleft()
            running[id(seq)] = seq
            self._active_blocks += blocks
            self._active_tokens += seq.prompt_len
            new_tokens += seq.new_tokens
        return new_tokens

    def _emit_step(self) -> None:
        vocab = self.vocab_size
        pool = self.token_pool
        engine_seed = self.seed
        next_token = mock_next_token
        finished: list[_Sequence] = []
        crash_at = self.crash_after_tokens
        for seq in list(self._running.values()):
            seq.prefill_done = True
            token = next_token(
                seq.prev_token,
                seq.prompt_len + seq.generated,
                engine_seed=engine_seed,
                request_seed=seq.seed,
                vocab=vocab if pool is None else len(pool),
            )
            if pool is not None:
                token = pool[token]
            seq.prev_token = token
            generated_before = seq.generated
            seq.generated += 1
            self._active_tokens += 1
            finish: str | None = None
            hidden = False
            if token in seq.stops and generated_before >= seq.request.min_tokens:
                finish, hidden = "stop", True
            elif (seq.max_new is not None and seq.generated >= seq.max_new) or (
                seq.prompt_len + seq.generated >= self.max_model_len
            ):
                finish = "length"
            finish = self._send_token(seq, token, hidden, finish)
            if finish is not None:
                finished.append(seq)
            self.tokens_emitted += 1
            if crash_at is not None and self.tokens_emitted >= crash_at:
                self.crash_after_tokens = None
                for done in finished:
                    self._finish(done)
                self.crash()
                return
        for done in finished:
            self._finish(done)

    def _send_token(
        self, seq: _Sequence, token: int, hidden: bool, finish: str | None
    ) -> str | None:
        request = seq.request
        text = None
        if request.detokenize:
            if hidden:
                text = ""
            elif seq.detok is not None:
                text = seq.detok.push((token,))
            else:
                text = mock_token_text(token)
            if finish is not None and seq.detok is not None:
                text += seq.detok.flush()
            if seq.stop_text is not None:
                text, stopped = seq.stop_text.push(text)
                if stopped:
                    finish = "stop"
                elif finish is not None:
                    text += seq.stop_text.flush()
        usage = prefill_result = None
        if finish is not None:
            completion = seq.generated - (1 if hidden else 0)
            handed_over = request.prefill_result
            cached = (
                handed_over.cached_tokens
                if handed_over is not None
                else seq.prompt_len - seq.new_tokens
            )
            usage = Usage(
                prompt_tokens=seq.prompt_len, completion_tokens=completion, cached_tokens=cached
            )
            if self._role == "prefill":
                prefill_result = PrefillResult(
                    prefill_worker_id=self._instance_id,
                    prompt_tokens=seq.prompt_len,
                    cached_tokens=cached,
                    kv_transfer_params={"remote_engine_id": self._instance_id},
                )
        seq.send.send_nowait(
            EngineOutput(
                token_ids=() if hidden else (token,),
                text=text,
                finish_reason=finish,  # type: ignore[arg-type]
                usage=usage,
                prefill_result=prefill_result,
            )
        )
        return finish

    def _finish(self, seq: _Sequence) -> None:
        if self._running.pop(id(seq), None) is not None:
            seq.finished = True
            self.requests_finished += 1
            self._free(seq)

    def __repr__(self) -> str:
        return f"<MockEngine {self._instance_id} role={self._role}>"
