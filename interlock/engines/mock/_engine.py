"""`MockEngine`: an in-process worker with a batch scheduler (chunked prefill, preemption), the
reference timing model, deterministic tokens, and fault injection. Runs on any trio clock; in
virtual time on `SimulationClock` (cheapest) or `trio.testing.MockClock`."""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import trio

from ..._errors import RequestError, WorkerGone, WorkerRefused
from ..._simclock import SimulationClock
from ...kv import compute_block_hashes, compute_sequence_hashes, kv_salt
from ...processing import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from ...wire import (
    EngineOutput,
    PrefillResult,
    PreprocessedRequest,
    Usage,
    WorkerChanged,
    WorkerJoined,
    WorkerLeft,
)
from .._listeners import Listeners
from .._protocol import ROLES, ActiveSequence, EventListener, Role, WorkerSnapshot
from ._kv_cache import MockKvCache
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
        "chunk",
        "detok",
        "finished",
        "generated",
        "hashed_len",
        "max_new",
        "new_tokens",
        "partials",
        "prefill_done",
        "prefill_left",
        "prev_token",
        "prompt_len",
        "receive",
        "request",
        "request_id",
        "seed",
        "send",
        "seq_hashes",
        "stop_text",
        "stops",
        "tokens",
        "tokens_hashes",
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
        #: Uncached prompt tokens not yet prefilled, and those the current step prefills.
        self.prefill_left = 0
        self.chunk = 0
        self.prefill_done = False
        self.cancelled = False
        self.finished = False
        self.seed = request.sampling.seed or 0
        self.stops = stops
        self.detok: IncrementalDetokenizer | None = None
        self.stop_text: StopStringMatcher | None = None
        #: Prompt plus generated tokens: what the KV cache holds for this sequence.
        self.tokens = list(request.token_ids)
        self.seq_hashes: list[int] = []
        self.tokens_hashes: list[int] = []
        self.hashed_len = -1
        self.partials = 0
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)


class _MockStream:
    """The context manager and iterator `MockEngine.open_stream` returns."""

    __slots__ = ("_broken", "_done", "_engine", "_seq")

    def __init__(self, engine: MockEngine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq
        self._done = False
        self._broken = False

    @property
    def request_id(self) -> str:
        """The id the engine knows the request by (generated when the request had none)."""
        return self._seq.request_id

    def ready(self) -> list[EngineOutput]:
        """The outputs already produced and not read yet, without waiting: a consumer that fell
        behind takes its backlog at once (as vLLM's API server coalesces tokens after a stall).
        A break found here is raised by the next iteration."""
        outputs: list[EngineOutput] = []
        while not self._done and not self._broken:
            try:
                item = self._seq.receive.receive_nowait()
            except trio.WouldBlock:
                break
            if item is _BROKEN:
                self._broken = True
                break
            outputs.append(item)
            if item.finish_reason is not None:
                self._done = True
        return outputs

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
        return self._take(_BROKEN if self._broken else await self._seq.receive.receive())

    def receive_nowait(self) -> EngineOutput:
        """The next output if it is ready, without waiting (or a checkpoint).

        Raises:
            trio.WouldBlock: none is ready.
            StopAsyncIteration: the stream has ended.
            WorkerGone: as iterating would.
        """
        if self._done:
            raise StopAsyncIteration
        return self._take(_BROKEN if self._broken else self._seq.receive.receive_nowait())

    def _take(self, item: Any) -> EngineOutput:
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

    It keeps a paged KV cache (`MockKvCache`: ``num_gpu_blocks`` blocks of ``block_size``
    tokens, prefix caching, LRU eviction of unreferenced blocks) and announces every change
    to its listeners as KV events (a decode-role worker, like the reference's, announces
    none). It schedules like vLLM: a FIFO waiting queue; at most ``max_num_seqs`` running; at
    most ``max_num_batched_tokens`` uncached prompt tokens prefilled per step; admission only
    while the active blocks stay under ``(1 - watermark)`` of the cache; when a running
    sequence needs a block and none is left, the newest running sequence is preempted (its
    blocks freed, its tokens recomputed when it is admitted again; its stream just pauses).
    With ``enable_chunked_prefill`` (the default, as in the reference) a prompt larger than
    the step's remaining token budget is prefilled a chunk per step, so a long prompt neither
    waits for an empty batch nor stalls the decoding sequences beside it; without it, such a
    prompt is admitted only into an empty batch and prefilled whole.
    Each step takes the reference mocker's time (`MockTiming`): prefill counts only uncached
    tokens, decode depends on how full the cache is.

    Tokens are a deterministic function of ``seed``, the request's sampling seed, the previous
    token and the position, so a request that migrates to another engine with the same seed
    continues exactly as it would have. ``token_pool`` restricts them to a set of ids (say,
    the ids of real words under a tokenizer). With ``postprocessing='engine'`` the engine
    applies the stop conditions itself and returns text: decoded with ``tokenizer`` when it
    has one, `mock_token_text` otherwise.

    ``keep_block_tokens`` makes the KV cache keep every full block's token ids
    (`MockKvCache.block_tokens`), for publishers that announce them (vLLM's KV events do).

    ``max_model_len`` bounds prompt plus output, and is capped at what the cache holds: a
    sequence reaching it finishes with ``"length"``, and `open_stream` refuses a prompt that
    leaves no room for output (`RequestError`) rather than queueing it forever.

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
        enable_chunked_prefill: bool = True,
        max_model_len: int = 32_768,
        vocab_size: int = 32_000,
        token_pool: Sequence[int] | None = None,
        tokenizer: Tokenizer | None = None,
        crash_after_tokens: int | None = None,
        keep_block_tokens: bool = False,
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
        self.enable_chunked_prefill = enable_chunked_prefill
        # A sequence longer than the whole cache could never be scheduled: cap it there.
        self.max_model_len = min(max_model_len, num_gpu_blocks * block_size)
        self.vocab_size = vocab_size
        #: Generated tokens are drawn from this pool (e.g. the ids of real words) if given.
        self.token_pool = tuple(token_pool) if token_pool else None
        #: Turns tokens into text when a request asks the engine to detokenize.
        self.tokenizer = tokenizer
        self.crash_after_tokens = crash_after_tokens
        self.keep_block_tokens = keep_block_tokens
        #: Counters for tests and reports.
        self.tokens_emitted = 0
        self.requests_started = 0
        self.requests_finished = 0
        self.requests_cancelled = 0
        self.crashes = 0
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: dict[int, _Sequence] = {}
        self.preemptions = 0
        self._cache = self._new_cache()
        self._down = False
        self._refusing = False
        self._registered = True
        self._adapters: frozenset[str] = frozenset()
        self._stalled_until = -math.inf
        self._slow_factor = 1.0
        self._epoch = 0
        self._wake = trio.Event()
        self._listeners = Listeners()
        self._step_listeners: list[Callable[[], None]] = []
        self._next_anonymous = 0

    # -- Engine protocol ------------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        return self._instance_id

    @property
    def role(self) -> Role:
        return self._role

    @property
    def slots(self) -> int:
        """``max_num_seqs``: the router's default in-flight limit for this worker."""
        return self.max_num_seqs

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
        return self._listeners.add(listener)

    def add_step_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every scheduler step that produced tokens, once the step's
        events were published (a publisher batches a step's KV events as vLLM does); returns
        the function that removes it."""
        self._step_listeners.append(listener)

        def remove() -> None:
            if listener in self._step_listeners:
                self._step_listeners.remove(listener)

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
        publishes = self._role != "decode"
        return WorkerSnapshot(
            worker_id=self._instance_id,
            role=self._role,
            active=tuple(active),
            kv_blocks=tuple(self._cache.dump()) if publishes else (),
            kv_last_event_id=self._cache.next_event_id - 1,
            block_size=self.block_size,
        )

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
    def running_requests(self) -> int:
        """Requests in the running batch (prefilling or decoding)."""
        return len(self._running)

    @property
    def waiting_requests(self) -> int:
        """Requests admitted and waiting for a place in the batch (preempted ones included)."""
        return sum(1 for s in self._waiting if not s.cancelled)

    @property
    def kv_cache(self) -> MockKvCache:
        """The KV cache (read it in tests; the engine owns it)."""
        return self._cache

    @property
    def is_down(self) -> bool:
        return self._down

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def adapters(self) -> frozenset[str]:
        """The LoRA adapters it claims to serve, as an `OpenAIEngine`'s /v1/models lists them
        (none unless set; it runs every request the same). Setting another set while
        registered announces `WorkerChanged`, as an `OpenAIEngine` that reads a new list."""
        return self._adapters

    @adapters.setter
    def adapters(self, adapters: frozenset[str]) -> None:
        changed = adapters != self._adapters
        self._adapters = adapters
        if changed and self._registered:
            self._publish(WorkerChanged(self._instance_id))

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
        if self._down:
            self._cache = self._new_cache()
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
        self._publish(event)

    def _admit(self, seq: _Sequence) -> None:
        if seq.prompt_len >= self.max_model_len:
            raise RequestError(
                f"a prompt of {seq.prompt_len} tokens leaves no room for output on worker "
                f"{self._instance_id}, whose context is {self.max_model_len} tokens "
                "(max_model_len, at most the KV cache's capacity); shorten the prompt",
                field="token_ids",
            )
        if self._down:
            raise WorkerRefused(f"worker {self._instance_id} is down", worker_id=self._instance_id)
        if self._refusing:
            raise WorkerRefused(
                f"worker {self._instance_id} refuses new requests", worker_id=self._instance_id
            )
        self.requests_started += 1
        self._waiting.append(seq)
        self._wake.set()

    def _new_cache(self) -> MockKvCache:
        # Decode-only workers, like the reference's, announce no KV events.
        emit = self._publish if self._role != "decode" else None
        return MockKvCache(
            self.num_gpu_blocks,
            self.block_size,
            worker_id=self._instance_id,
            emit=emit,
            keep_tokens=self.keep_block_tokens,
        )

    def _publish(self, event: Any) -> None:
        self._listeners.publish(event)

    def _release(self, seq: _Sequence) -> None:
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        self.requests_cancelled += 1
        if self._running.pop(id(seq), None) is not None:
            self._free(seq)

    def _free(self, seq: _Sequence) -> None:
        self._cache.release(seq.seq_hashes, partials=seq.partials)
        seq.seq_hashes = []
        seq.tokens_hashes = []
        seq.hashed_len = -1
        seq.partials = 0

    def _break_all(self) -> None:
        self._epoch += 1
        for seq in (*self._running.values(), *self._waiting):
            if not seq.cancelled and not seq.finished:
                seq.finished = True
                seq.send.send_nowait(_BROKEN)
        self._running.clear()
        self._waiting.clear()
        # The process is gone: its cache with it (a router forgets it when it leaves).
        self._cache.clear(announce=False)

    async def _schedule_forever(self) -> None:
        timing = self.timing
        block_budget = (1.0 - self.watermark) * self.num_gpu_blocks
        clock = trio.lowlevel.current_clock()
        # A simulation clock's timers skip the cancel scope trio.sleep_until needs: the
        # step loop is what a long simulation spends its time in.
        sleep_until = clock.sleep_until if isinstance(clock, SimulationClock) else trio.sleep_until
        now = clock.current_time
        running = self._running
        while True:
            if not running and not self._waiting:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if self._stalled_until > now():
                await sleep_until(self._stalled_until)
                continue
            self._reserve_tail_blocks()
            new_tokens = self._schedule_prefill(block_budget)
            step = timing.prefill_seconds(new_tokens)
            if self._decoding:
                step += timing.decode_seconds(self._cache.active_blocks / self.num_gpu_blocks)
            epoch = self._epoch
            if step > 0:
                await sleep_until(now() + step * self._slow_factor)
            else:
                await trio.lowlevel.checkpoint()
            if epoch != self._epoch or self._stalled_until > now():
                continue  # crashed or stalled meanwhile: this step produced nothing
            self._emit_step()
            for step_listener in self._step_listeners:
                step_listener()

    @property
    def _decoding(self) -> bool:
        """Whether some running sequence is past its prefill (so this step decodes)."""
        # Running sequences are in admission order and a step finishes every prefill, so
        # the ones past prefill come first: the oldest tells.
        for seq in self._running.values():
            return seq.prefill_done
        return False

    def _reserve_tail_blocks(self) -> None:
        """Give every running sequence whose next token starts a new block that block,
        preempting the newest sequences when the cache is full."""
        block_size = self.block_size
        cache = self._cache
        for seq in list(self._running.values()):
            # A sequence still prefilling holds its tail block already, step after step.
            if seq.partials or len(seq.tokens) % block_size or id(seq) not in self._running:
                continue
            while not cache.add_partial():
                victim = next(reversed(self._running.values()))
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.partials += 1

    def _preempt(self, seq: _Sequence) -> None:
        self.preemptions += 1
        del self._running[id(seq)]
        self._free(seq)
        seq.prefill_done = False
        # Its blocks may be evicted while it waits: admitted again, it recomputes whatever is
        # no longer cached, prompt and generated tokens alike; its stream simply pauses.
        seq.prefill_left = seq.chunk = 0
        self._waiting.appendleft(seq)

    def _schedule_prefill(self, block_budget: float) -> int:
        """Choose this step's prefill work: first the chunks still owed to running sequences,
        then new admissions from the waiting queue. Returns the tokens to prefill."""
        budget = self.max_num_batched_tokens
        running = self._running
        new_tokens = 0
        # Prefills finish in admission order, so those still going are the newest sequences.
        owed: list[_Sequence] = []
        for seq in reversed(running.values()):
            if not seq.prefill_left:
                break
            owed.append(seq)
        for seq in reversed(owed):
            seq.chunk = chunk = min(seq.prefill_left, budget - new_tokens)
            new_tokens += chunk
        if new_tokens >= budget:
            return new_tokens
        if self._waiting:
            new_tokens = self._admit_waiting(block_budget, new_tokens)
        return new_tokens

    def _admit_waiting(self, block_budget: float, new_tokens: int) -> int:
        waiting = self._waiting
        running = self._running
        cache = self._cache
        block_size = self.block_size
        budget = self.max_num_batched_tokens
        chunked = self.enable_chunked_prefill
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if seq.cancelled:
                waiting.popleft()
                continue
            # Chunked, the budget alone decides: stop before hashing a head that cannot go.
            # Even a fully cached prompt waits, since prefills must finish in admission order.
            if chunked and new_tokens >= budget:
                break
            tokens = seq.tokens
            # A head that does not fit waits here step after step: hash its prompt once.
            if seq.hashed_len == len(tokens):
                local, hashes = seq.tokens_hashes, seq.seq_hashes
            else:
                # A cache_salt keys the blocks apart, as vLLM's do (its salt in block 0's
                # hash), so only requests with the same salt share them.
                local = compute_block_hashes(tokens, block_size, _salt_of(seq.request))
                hashes = compute_sequence_hashes(local)
                seq.tokens_hashes, seq.seq_hashes, seq.hashed_len = local, hashes, len(tokens)
            transferred = seq.request.prefill_result is not None and not seq.generated
            uncached = 0 if transferred else len(tokens) - cache.cached_prefix(hashes) * block_size
            if not chunked and running and new_tokens + uncached > budget:
                break
            partial = len(tokens) % block_size != 0
            limit = block_budget if running else None
            kept = tokens if self.keep_block_tokens else None
            salt = seq.request.cache_salt if kept is not None else None
            if not cache.acquire(
                hashes, local, partial=partial, limit=limit, tokens=kept, salt=salt
            ):
                break
            waiting.popleft()
            seq.seq_hashes = hashes
            seq.tokens_hashes = local
            seq.partials = 1 if partial else 0
            if not seq.generated:
                seq.new_tokens = uncached  # what its usage reports as not cached
            seq.prefill_left = uncached
            seq.chunk = min(uncached, budget - new_tokens) if chunked else uncached
            running[id(seq)] = seq
            new_tokens += seq.chunk
        return new_tokens

    def _emit_step(self) -> None:
        vocab = self.vocab_size
        pool = self.token_pool
        engine_seed = self.seed
        next_token = mock_next_token
        block_size = self.block_size
        cache = self._cache
        finished: list[_Sequence] = []
        crash_at = self.crash_after_tokens
        for seq in list(self._running.values()):
            if seq.prefill_left:
                seq.prefill_left -= seq.chunk
                seq.chunk = 0
                if seq.prefill_left:
                    continue  # more of its prompt to prefill before its first token
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
            tokens = seq.tokens
            tokens.append(token)
            if len(tokens) % block_size == 0 and seq.partials:
                # The tail block is full: it becomes a shareable, announced block.
                parent = seq.seq_hashes[-1] if seq.seq_hashes else None
                salt = _salt_of(seq.request) if parent is None else None
                local = compute_block_hashes(tokens[-block_size:], block_size, salt)[0]
                seq_hash = (
                    compute_sequence_hashes((parent, local))[1] if parent is not None else local
                )
                cache.fill_partial(
                    seq_hash,
                    local,
                    parent,
                    tokens[-block_size:] if self.keep_block_tokens else None,
                    seq.request.cache_salt,
                )
                seq.seq_hashes.append(seq_hash)
                seq.tokens_hashes.append(local)
                seq.partials -= 1
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


def _salt_of(request: PreprocessedRequest) -> int | None:
    """The salt of ``request``'s blocks: its ``cache_salt``'s (the mock runs an adapter's
    requests as the base model's)."""
    salt = request.cache_salt
    return None if salt is None else kv_salt(cache_salt=salt)
