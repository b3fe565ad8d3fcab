"""`OpenAIEngine`: the `Engine` protocol over HTTP to an OpenAI-compatible server (vLLM first).

Prompts go as token ids to ``/v1/completions`` and the generated ids come back in the stream
(vLLM's ``return_token_ids``), so the frontend's postprocessing, routing and migration work
exactly as with interlock's own workers. Under engine postprocessing a chat request goes as the
client's chat to ``/v1/chat/completions`` instead (`PreprocessedRequest.chat`), so that the
engine's tool-call and reasoning parsers run; its tokens still come back. The engine's health
and load come from its ``/health`` and ``/metrics``; its KV cache from vLLM's ZMQ event feed
(`KvEventFeed`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import msgspec
import trio

from ..._errors import EngineError, RequestError, WorkerGone, WorkerRefused
from ..._tracing import inject_trace_headers
from ...processing import Tokenizer
from ...wire import (
    EngineOutput,
    PrefillResult,
    PreprocessedRequest,
    WorkerChanged,
    WorkerJoined,
    WorkerLeft,
)
from ...wire._output import join_waiting
from .._listeners import Listeners
from .._protocol import (
    ROLES,
    EventListener,
    Role,
    TokenizerMismatch,
    WorkerMismatch,
    WorkerSnapshot,
    WorkerUnreachable,
)
from ._http import (
    EngineConnectError,
    EngineConnections,
    EngineHttpError,
    EngineResponse,
    ssl_context_for,
)
from ._metrics import EngineMetrics, parse_engine_metrics
from ._models import adapters_in, model_cards
from ._stream import ChunkReader, SseSplitter, engine_error_message

_logger = logging.getLogger("interlock.engines.openai")

#: Text the frontend and the engine must tokenize alike before the engine serves: words, digits,
#: punctuation, whitespace runs, accents, CJK and an emoji, so that a tokenizer that differs
#: in merges, normalisation or byte fallback shows it.
TOKENIZER_PROBE = (
    "interlock probe: The quick brown fox jumps over 13 lazy dogs, twice.\n"
    "  def f(x):\n\treturn x**2 -> café naïve résumé 東京 3.14159 <|probe|> 🚂"
)

#: Request bodies as httpx's ``json=`` wrote them (when it was the engine's client): compact,
#: UTF-8, no NaN. For chats (the client's messages, any JSON) and the start-up checks.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
#: The ``/v1/completions`` bodies, in C, ten times as fast as `_JSON` (a 250-token prompt's
#: list of ids was most of it): compact UTF-8 JSON with the same values, though not always the
#: same bytes (msgspec writes the shortest float that reads back: ``0.00001`` and ``1e16``
#: where `_JSON` wrote ``1e-05`` and ``1e+16``; a JSON parser reads the same number). Their
#: numbers are finite (`SamplingOptions` checks); a decode leg's ``kv_transfer_params`` come
#: from a prefill engine's JSON answer, which msgspec decoded, so they hold no NaN (were one
#: there, it would go as null, not raise). A stop string with a lone surrogate raises
#: UnicodeEncodeError (refused by the HTTP frontend before it gets here).
_ENCODE_BODY = msgspec.json.Encoder().encode

#: The KV-transfer parameters of a prefill leg (vLLM's P/D connectors): compute the prompt's KV
#: and keep it for a remote decode; NixlConnector answers with what the decode leg must send.
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class OpenAIEngine:
    """An OpenAI-compatible inference server (vLLM; see docs/engines.md for others) as a worker.

    Implements `Engine`. ``base_url`` is the server's root (``http://127.0.0.1:8101``, without
    ``/v1``). ``model`` is the name the server serves (None: the first of its ``/v1/models``).
    ``block_size`` (tokens per KV block) and ``tokenizer`` are the frontend's: when given, `run`
    refuses an engine that reports another block size (`WorkerMismatch`) or tokenizes a probe
    text differently (`TokenizerMismatch`, through the engine's ``/tokenize``). ``api_key`` is
    sent as a bearer token. ``kv_events`` is the frontend's `KvEventFeed` (or None: the engine
    publishes no KV events); ``kv_replay_endpoint`` the engine's replay socket, from which
    missed event batches are fetched again.

    `run` waits for ``/health`` (at most ``connect_timeout`` seconds), checks the engine, then
    scrapes ``/metrics`` every ``health_interval`` seconds, and polls ``/health`` as often
    unless a request answered in full in the meantime: after ``unhealthy_after`` failed polls
    in a row the engine leaves routing (`WorkerLeft`), and it rejoins (`WorkerJoined`) once
    ``/health`` answers again. `metrics` holds the last scrape.

    A stream breaks (`WorkerGone`, which migration handles) when the connection fails or resets,
    the server answers 5xx, sends an in-band error, or ends the body without a finish reason.
    A server that cannot take the request at all (connection refused, 503, 429) is a
    `WorkerRefused`; a 4xx is the request's own fault (`RequestError`), never the engine's.
    """

    def __init__(
        self,
        base_url: str,
        *,
        instance_id: int,
        role: Role = "agg",
        model: str | None = None,
        block_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        api_key: str | None = None,
        kv_events: Any = None,
        kv_replay_endpoint: str | None = None,
        connect_timeout: float = 30.0,
        health_interval: float = 1.0,
        health_timeout: float = 5.0,
        unhealthy_after: int = 2,
        idle_timeout: float | None = None,
        verify: bool | str = True,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if type(instance_id) is not int or instance_id < 0:
            raise ValueError(f"instance_id must be a non-negative int, got {instance_id!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self._instance_id = instance_id
        self._role: Role = role
        self.model = model
        self.block_size = block_size
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.kv_events = kv_events
        self.kv_replay_endpoint = kv_replay_endpoint
        self.connect_timeout = connect_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.unhealthy_after = unhealthy_after
        #: Seconds to wait for the answer's headers (and a prefill leg's whole answer) before
        #: the stream counts as broken: the pipeline's ``engine_idle_timeout`` covers the
        #: stream once open (None: wait as long as it takes).
        self.idle_timeout = idle_timeout
        self.verify = verify
        #: The last ``/metrics`` scrape (None before the first, or if the engine has none).
        self.metrics: EngineMetrics | None = None
        #: The LoRA adapters the engine serves besides `model` (its ``/v1/models``, read
        #: again with each scrape): the router sends an adapter's requests only here.
        self.adapters: frozenset[str] = frozenset()
        self._listeners = Listeners()
        self._connections: EngineConnections | None = None
        self._present = False
        self._down_reason = "not started"
        self._mirror: Any = None
        #: When a stream from this engine last ended with its finish reason (trio time).
        self._answered_at = -math.inf
        #: A chat's prompt tokens were found to differ from the engine's (warned once).
        self._chat_prompt_checked = False

    # -- Engine protocol ------------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        return self._instance_id

    @property
    def role(self) -> Role:
        return self._role

    @property
    def reported_load(self) -> tuple[int, int] | None:
        """``(requests, kv_blocks)`` the engine holds by its last ``/metrics`` scrape: requests
        running plus waiting, and the blocks in use (its KV usage times its blocks); None
        before a scrape or when it reports neither. The router takes the larger of this and
        its own bookkeeping, so load from other frontends or direct clients counts."""
        metrics = self.metrics
        if metrics is None or metrics.requests_running is None:
            return None
        requests = metrics.requests_running + (metrics.requests_waiting or 0)
        blocks = 0
        if metrics.kv_usage is not None and metrics.num_blocks is not None:
            blocks = round(metrics.kv_usage * metrics.num_blocks)
        return requests, blocks

    @property
    def registered(self) -> bool:
        """Healthy, and so routable."""
        return self._present

    def open_stream(self, request: PreprocessedRequest) -> _HttpStream:
        """Send ``request`` to the engine; the context yields its outputs.

        Entering raises `WorkerRefused` when the engine is down or refuses the request,
        `WorkerGone` on a 5xx, `RequestError` on a 4xx or when the request has no JSON to
        send (a lone surrogate in a string, NaN in a chat field). Iterating raises `WorkerGone` when
        the stream breaks. Leaving early closes the HTTP stream, which makes the engine abort
        the request.
        """
        return _HttpStream(self, request)

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        return self._listeners.add(listener)

    async def snapshot(self) -> WorkerSnapshot:
        """The engine's KV cache as its events told it (no I/O)."""
        await trio.lowlevel.checkpoint()
        blocks: tuple[Any, ...] = ()
        last = -1
        if self._mirror is not None:
            dump, last = self._mirror.dump()
            blocks = tuple(dump)
        return WorkerSnapshot(
            worker_id=self._instance_id,
            role=self._role,
            kv_blocks=blocks,
            kv_last_event_id=last,
            block_size=self.block_size,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for the engine, check it, call ``task_status.started()``, then watch its health
        and load until cancelled.

        Raises:
            WorkerUnreachable: ``/health`` did not answer 200 within ``connect_timeout``.
            WorkerMismatch: the engine pages its KV cache in blocks of another size.
            TokenizerMismatch: the engine tokenizes the probe text differently.
        """
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        verify = ssl_context_for(self.verify) if self.base_url.startswith("https:") else True
        # One client for the start-up checks, the polls and the requests: interlock's own
        # HTTP/1.1 client (`_http`), as httpx's per-request cost was most of the frontend's in
        # front of an engine. Reads wait as long as the engine generates: a stalled stream is
        # the pipeline's engine_idle_timeout to judge, not the HTTP client's.
        connections = EngineConnections(self.base_url, headers=headers, verify=verify)
        try:
            # Checked before the nursery opens, so that they raise bare, not in a group.
            await self._wait_healthy(connections)
            await self._describe(connections)
            await self._check_tokenizer(connections)
            self._connections = connections
            async with trio.open_nursery() as nursery:
                if self.kv_events is not None:
                    await self._follow_kv_events(nursery)
                self._set_present(True, "healthy")
                task_status.started()
                await self._watch(connections)
        finally:
            self._present = False
            self._connections = None
            with trio.CancelScope(shield=True):
                await connections.aclose()

    # -- starting ---------------------------------------------------------------------------

    async def _wait_healthy(self, connections: EngineConnections) -> None:
        delay = 0.05
        last = "no attempt"
        with trio.move_on_after(self.connect_timeout):
            while True:
                last = await self._health(connections)
                if not last:
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise WorkerUnreachable(
            f"engine {self.instance_id} at {self.base_url} did not answer GET /health with 200 "
            f"within connect_timeout={self.connect_timeout}s (last: {last}); is the server "
            "running there? (a vLLM takes a minute or two to start)",
            worker_id=self.instance_id,
        )

    async def _health(self, connections: EngineConnections) -> str:
        """'' when ``/health`` answers 200, else why not."""
        try:
            with trio.fail_after(self.health_timeout):
                status, _ = await connections.get("/health")
        except trio.TooSlowError:
            return f"no answer within {self.health_timeout}s"
        except EngineConnectError as exc:
            return f"connection refused or unreachable ({exc})"
        except EngineHttpError as exc:
            return f"{type(exc).__name__}: {exc}"
        if status != 200:
            return f"/health answered {status}"
        return ""

    async def _describe(self, connections: EngineConnections) -> None:
        """Learn the served model, its LoRA adapters and context length; check the block
        size."""
        cards = await self._model_cards(connections)
        if self.model is None:
            # The base model, not one of its adapters (vLLM lists it first anyway).
            card = next((c for c in cards if type(c.get("parent")) is not str), None)
        else:
            card = next((c for c in cards if c["id"] == self.model), None)
        if self.model is None:
            if card is None:
                raise WorkerMismatch(
                    f"engine {self.instance_id} at {self.base_url} lists no model in "
                    "GET /v1/models; is it an OpenAI-compatible server, and does it want an "
                    "API key (--engine-api-key)?",
                    worker_id=self.instance_id,
                )
            self.model = str(card["id"])
        elif cards and card is None:
            served = ", ".join(repr(c["id"]) for c in cards)
            raise WorkerMismatch(
                f"engine {self.instance_id} at {self.base_url} serves {served}, not "
                f"{self.model!r}; give OpenAIEngine(model=...) the engine's --served-model-name",
                worker_id=self.instance_id,
            )
        self.adapters = adapters_in(cards, self.model)
        metrics = await self._scrape(connections)
        reported = metrics.block_size if metrics is not None else None
        if self.block_size is not None and reported is not None and reported != self.block_size:
            raise WorkerMismatch(
                f"engine {self.instance_id} at {self.base_url} pages its KV cache in blocks of "
                f"{reported} tokens, but this frontend's kv_block_size is {self.block_size}: "
                "prefix matches would be lost; serve with --kv-block-size "
                f"{reported} (or start the engine with --block-size {self.block_size}; vLLM on "
                "CPU needs a multiple of 32)",
                worker_id=self.instance_id,
            )

    async def _model_cards(self, connections: EngineConnections) -> list[dict[str, Any]]:
        """The cards of the engine's ``GET /v1/models`` (none when it does not answer one)."""
        try:
            with trio.fail_after(self.health_timeout):
                status, raw = await connections.get("/v1/models")
        except (EngineHttpError, trio.TooSlowError):
            return []
        return model_cards(status, raw)

    async def _check_tokenizer(self, connections: EngineConnections) -> None:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return
        body = {"model": self.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        try:
            with trio.fail_after(self.health_timeout):
                response = await connections.post("/tokenize", _JSON.encode(body).encode())
                try:
                    status, raw = response.status, await response.read()
                finally:
                    response.close()
        except (EngineHttpError, trio.TooSlowError) as exc:
            why = (
                f"no answer within {self.health_timeout}s"
                if isinstance(exc, trio.TooSlowError)
                else f"{type(exc).__name__}: {exc}"
            )
            _logger.warning(
                "engine %d: cannot check its tokenizer (POST /tokenize: %s)", self.instance_id, why
            )
            return
        if status == 404:
            _logger.warning(
                "engine %d at %s has no /tokenize: its tokenizer cannot be checked against "
                "the frontend's",
                self.instance_id,
                self.base_url,
            )
            return
        try:
            theirs = json.loads(raw)["tokens"]
            if type(theirs) is not list:
                raise TypeError("tokens is not a list")
        except (ValueError, KeyError, TypeError, RecursionError):
            _logger.warning(
                "engine %d: POST /tokenize answered %d without tokens; tokenizer not checked",
                self.instance_id,
                status,
            )
            return
        ours = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if list(theirs) != list(ours):
            at = _first_difference(ours, theirs)
            raise TokenizerMismatch(
                f"engine {self.instance_id} at {self.base_url} tokenizes the probe text into "
                f"{len(theirs)} ids, this frontend's tokenizer into {len(ours)}; they first "
                f"differ at position {at} (engine {theirs[at : at + 4]}, frontend "
                f"{ours[at : at + 4]}): the engine would read other tokens than the router "
                "hashed and the frontend decodes; serve with --tokenizer naming the engine's "
                "model directory (or its tokenizer.json)",
                worker_id=self.instance_id,
            )

    async def _follow_kv_events(self, nursery: trio.Nursery) -> None:
        from ._kv_mirror import KvMirror

        if self.block_size is None:
            raise ValueError("an OpenAIEngine with kv_events needs block_size")
        mirror = KvMirror(
            self.instance_id,
            self.block_size,
            publish=self._listeners.publish,
            replay_endpoint=self.kv_replay_endpoint,
            # The engine may have cached blocks before this frontend started.
            replay_at_start=True,
        )
        await nursery.start(mirror.run)
        self._mirror = mirror
        remove = self.kv_events.subscribe(self.instance_id, mirror.on_batch)
        nursery.start_soon(_unsubscribe_on_exit, remove)

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self, connections: EngineConnections) -> None:
        failures = 0
        while True:
            await trio.sleep(self.health_interval)
            if self._present and trio.current_time() - self._answered_at < self.health_interval:
                # A request answered in full since the last poll: the engine is as healthy as
                # /health would say (which cannot see a frozen engine either), so the poll
                # is saved; a busy frontend polls only its idle engines.
                why = ""
            else:
                why = await self._health(connections)
            if why:
                failures += 1
                if failures >= self.unhealthy_after or "refused" in why:
                    self._set_present(False, why)
                continue
            failures = 0
            await self._scrape(connections)
            await self._read_adapters(connections)
            self._set_present(True, "healthy")

    async def _scrape(self, connections: EngineConnections) -> EngineMetrics | None:
        """Read ``/metrics`` into `metrics`; return it (None when it could not be read)."""
        try:
            with trio.fail_after(self.health_timeout):
                status, body = await connections.get("/metrics")
            if status != 200:
                return None
            self.metrics = parse_engine_metrics(body.decode("utf-8", "replace"))
        except (trio.TooSlowError, EngineHttpError, ValueError, ArithmeticError) as exc:
            _logger.debug("engine %d: /metrics: %s", self.instance_id, exc)
            return None
        return self.metrics

    async def _read_adapters(self, connections: EngineConnections) -> None:
        """Read the LoRA adapters the engine serves again (loaded or unloaded at run time);
        kept as they were when ``/v1/models`` does not answer."""
        cards = await self._model_cards(connections)
        if any(c["id"] == self.model for c in cards):
            adapters = adapters_in(cards, self.model)
            if adapters != self.adapters:
                self.adapters = adapters
                if self._present:
                    self._listeners.publish(WorkerChanged(self.instance_id))

    def _set_present(self, present: bool, why: str) -> None:
        if present == self._present:
            return
        self._present = present
        self._down_reason = why
        if present:
            _logger.info("engine %d at %s is healthy", self.instance_id, self.base_url)
            self._listeners.publish(WorkerJoined(self.instance_id))
        else:
            _logger.warning(
                "engine %d at %s leaves routing: %s", self.instance_id, self.base_url, why
            )
            self._listeners.publish(WorkerLeft(self.instance_id))

    # -- requests ---------------------------------------------------------------------------

    def request_body(self, request: PreprocessedRequest, *, stream: bool) -> dict[str, Any]:
        """The ``/v1/completions`` body for ``request`` (a prefill leg on a prefill engine)."""
        body: dict[str, Any] = {
            # A LoRA adapter's request goes under its name even when the engine's last
            # /v1/models no longer lists it (unloaded since the pick): the engine's own 404 is
            # right (a refusal), its base model's text under the adapter's name never is.
            "model": request.model if request.model is not None else self.model,
            "prompt": list(request.token_ids),
            "stream": stream,
            "return_token_ids": True,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.cache_salt is not None:
            body["cache_salt"] = request.cache_salt
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.detokenize or request.stop:
            # Engine postprocessing: the engine applies the stop conditions and makes the text.
            if request.min_tokens:
                body["min_tokens"] = request.min_tokens
            if request.stop_token_ids:
                body["stop_token_ids"] = list(request.stop_token_ids)
            if request.stop:
                body["stop"] = list(request.stop)
                body["include_stop_str_in_output"] = request.include_stop_str_in_output
            body["ignore_eos"] = request.ignore_eos
        else:
            # Frontend postprocessing (or ids only): the frontend owns every stop condition and
            # closes the stream when one hits; the engine must not stop on its own EOS first.
            body["ignore_eos"] = True
            body["skip_special_tokens"] = False
        sampling = request.sampling
        if sampling.temperature is not None:
            body["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        prefill = request.prefill_result
        if self._role == "prefill":
            body["max_tokens"] = 1
            body.pop("min_tokens", None)
            body["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
        elif prefill is not None and prefill.kv_transfer_params is not None:
            # Verbatim: the connector on the decode engine reads what the prefill one wrote.
            body["kv_transfer_params"] = prefill.kv_transfer_params
        return body

    def runs_chat(self, request: PreprocessedRequest) -> bool:
        """Whether ``request`` goes to ``/v1/chat/completions``: it carries the client's chat
        (`PreprocessedRequest.chat`), the engine makes the text (``detokenize``: engine
        postprocessing), and this is not a prefill leg (which stays on token ids)."""
        return request.chat is not None and request.detokenize and self._role != "prefill"

    def chat_body(self, request: PreprocessedRequest) -> dict[str, Any]:
        """The ``/v1/chat/completions`` body for ``request`` (which has a ``chat``): its
        messages and tool fields as the client sent them, with the same generation fields as
        `request_body` (a stream with usage and token ids, ``max_tokens``, stop conditions,
        sampling, a decode leg's ``kv_transfer_params``)."""
        chat = request.chat
        assert chat is not None
        body = self.request_body(request, stream=True)
        del body["prompt"]
        body["messages"] = list(chat.messages)
        if chat.tools:
            body["tools"] = list(chat.tools)
        if chat.tool_choice is not None:
            body["tool_choice"] = chat.tool_choice
        if chat.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = chat.parallel_tool_calls
        if chat.response_format is not None:
            body["response_format"] = chat.response_format
        if chat.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = chat.chat_template_kwargs
        if not chat.add_generation_prompt:
            body["add_generation_prompt"] = False
        return body

    def __repr__(self) -> str:
        return f"<OpenAIEngine {self.instance_id} role={self.role} at {self.base_url}>"


def _first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int:
    """The first position where two token sequences differ (the shorter one's length when one
    is a prefix of the other)."""
    return next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
        min(len(ours), len(theirs)),
    )


async def _unsubscribe_on_exit(remove: Callable[[], None]) -> None:
    try:
        await trio.sleep_forever()
    finally:
        remove()


class _HttpStream:
    """The context manager and iterator `OpenAIEngine.open_stream` returns.

    Iterating yields one output per read of the engine's stream: every SSE chunk that had
    already arrived is joined into it (`join_waiting`), so a burst of tokens costs the pipeline
    and the client one output, not one per token (as interlock's own workers send them).
    """

    __slots__ = (
        "_chat",
        "_engine",
        "_error",
        "_outputs",
        "_payloads",
        "_prefill",
        "_reader",
        "_reading",
        "_request",
        "_response",
        "_spared",
        "_splitter",
        "_streaming",
    )

    def __init__(self, engine: OpenAIEngine, request: PreprocessedRequest) -> None:
        self._engine = engine
        self._request = request
        self._response: EngineResponse | None = None
        #: Reading the SSE body (False before it opens and once it ended).
        self._streaming = False
        #: A read of the body is waiting (in `_read_more`).
        self._reading = False
        #: `fail_waiting` let this wait for an output go on once, as bytes had reached the
        #: connection (until the next output is returned).
        self._spared = False
        self._splitter = SseSplitter()
        #: Payloads split from the body and not fed to the reader yet.
        self._payloads: deque[str] = deque()
        #: Outputs read but not yet returned (those that could not join the ones returned).
        self._outputs: deque[EngineOutput] = deque()
        #: A failure found after outputs that were returned first; raised next.
        self._error: BaseException | None = None
        self._prefill: EngineOutput | None = None
        text = request.detokenize or bool(request.stop)
        #: The engine runs the client's chat (/v1/chat/completions), not token ids.
        self._chat = engine.runs_chat(request)
        self._reader = ChunkReader(
            engine.instance_id, text=text, describe=engine.base_url, chat=self._chat
        )

    async def __aenter__(self) -> AsyncIterator[EngineOutput]:
        engine = self._engine
        connections = engine._connections
        if connections is None or not engine._present:
            await trio.lowlevel.checkpoint()
            raise WorkerRefused(
                f"engine {engine.instance_id} at {engine.base_url} is not serving "
                f"({engine._down_reason})",
                worker_id=engine.instance_id,
            )
        prefill = engine.role == "prefill"
        try:
            if self._chat:
                path = "/v1/chat/completions"
                payload = _JSON.encode(engine.chat_body(self._request)).encode()
            else:
                path = "/v1/completions"
                payload = _ENCODE_BODY(engine.request_body(self._request, stream=not prefill))
        except ValueError as exc:  # UnicodeEncodeError too
            # The HTTP frontend refuses these fields (loads_json's sendable check); a request
            # built in-process may still hold them: the request's fault, not the engine's.
            await trio.lowlevel.checkpoint()
            if self._chat:
                field = "chat"
                what = "a string holds a lone surrogate (no UTF-8) or a number is not finite"
            else:
                # A completions body's only client strings are its stop strings; its numbers
                # are checked finite (SamplingOptions).
                field, what = "stop", "a stop string holds a lone surrogate (no UTF-8)"
            raise RequestError(
                f"the request cannot be sent to engine {engine.instance_id} ({exc}): {what}; "
                "remove it",
                field=field,
            ) from None
        headers: dict[str, str] = {}
        if self._request.request_id is not None:
            # The same id on both legs of a disaggregated request (NIXL derives its transfer
            # id from it), and in the engine's logs.
            headers["x-request-id"] = self._request.request_id
        # The W3C traceparent of this leg's CLIENT span, when the request is traced.
        inject_trace_headers(headers, self._request.request_id)
        try:
            if engine.idle_timeout is None:
                response = await connections.post(path, payload, headers.items())
            else:
                # A bare cancel scope: trio.fail_after's context-manager wrapper cost as much
                # again, per request.
                with trio.CancelScope(deadline=trio.current_time() + engine.idle_timeout) as scope:
                    response = await connections.post(path, payload, headers.items())
                if scope.cancelled_caught:
                    raise trio.TooSlowError
        except trio.TooSlowError:
            raise self._reader.broken(
                f"sent no response within engine_idle_timeout={engine.idle_timeout}s"
            ) from None
        except EngineConnectError as exc:
            raise WorkerRefused(
                f"engine {engine.instance_id} at {engine.base_url} refused the connection: "
                f"connection refused or unreachable ({exc})",
                worker_id=engine.instance_id,
            ) from exc
        except EngineHttpError as exc:
            raise self._reader.broken(f"failed: {exc}") from exc
        self._response = response
        try:
            if response.status != 200:
                await self._refuse(response)
            if prefill:
                timeout = engine.idle_timeout if engine.idle_timeout is not None else math.inf
                try:
                    with trio.fail_after(timeout):
                        self._prefill = await self._read_prefill(response)
                except trio.TooSlowError:
                    raise self._reader.broken(
                        f"sent no prefill answer within engine_idle_timeout={timeout}s"
                    ) from None
            else:
                self._streaming = True
        except BaseException:
            self._close()
            raise
        return self

    async def _refuse(self, response: EngineResponse) -> None:
        engine = self._engine
        status = response.status
        try:
            with trio.fail_after(engine.health_timeout):
                raw = await response.read()
            message = engine_error_message(json.loads(raw))
        except (EngineHttpError, ValueError, RecursionError, trio.TooSlowError):
            # RecursionError: an error body nested too deeply to read is as unreadable as one
            # that is not JSON; the status still decides.
            message = f"HTTP {status}"
        where = f"engine {engine.instance_id} at {engine.base_url}"
        if status in (429, 503):
            raise WorkerRefused(
                f"{where} cannot take the request now ({status}: {message})",
                worker_id=engine.instance_id,
            )
        if status in (401, 403, 404):
            # The engine's configuration, not the request's fault: a wrong API key, or an
            # engine restarted under another model name. Another engine may take it.
            raise WorkerRefused(
                f"{where} refused the request ({status}: {message}); check --engine-api-key "
                "and the engine's --served-model-name",
                worker_id=engine.instance_id,
            )
        if 400 <= status < 500:
            raise RequestError(
                f"{where} rejected the request ({status}): {message}",
                field="messages" if self._chat else "prompt",
            )
        raise self._reader.broken(f"answered {status}: {message}")

    async def _read_prefill(self, response: EngineResponse) -> EngineOutput:
        engine = self._engine
        try:
            raw = await response.read()
        except EngineHttpError as exc:
            raise self._reader.broken(f"sent an unreadable prefill answer ({exc})") from exc
        output, usage, params = self._reader.answer(raw)
        result = PrefillResult(
            prefill_worker_id=engine.instance_id,
            prompt_tokens=len(self._request.token_ids),
            cached_tokens=usage.cached_tokens if usage is not None else 0,
            kv_transfer_params=params if type(params) is dict else None,
        )
        return EngineOutput(
            token_ids=output.token_ids,
            finish_reason=output.finish_reason,
            usage=usage,
            prefill_result=result,
        )

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._prefill is not None:
            output, self._prefill = self._prefill, None
            return output
        outputs = self._outputs
        while not outputs:
            error, self._error = self._error, None
            if error is not None:
                raise error
            if self._payloads:
                self._decode()
            elif self._streaming:
                await self._read_more()
            else:
                raise StopAsyncIteration
        # Everything that had arrived, joined into one output (built once); the next read
        # may wait.
        first = outputs.popleft()
        self._spared = False
        return join_waiting(first, outputs) if outputs else first

    def fail_waiting(self, exc: EngineError) -> bool:
        """End the reader's wait for the next output with ``exc``, which its `__anext__` then
        raises (the pipeline's `StallWatch`: a stall without a cancel scope per wait).

        The wait is a read of the body in the reader's own task, which only closing the
        connection can end: it is closed (never given back to the pool, and the engine sees
        the client go and aborts the request). Returns False and does nothing when an output
        or error is already there to take (between reads: also one whose bytes have arrived
        on the connection, taken now without waiting), or the stream has ended (or is a
        prefill leg's, whose answer came whole when it opened). And once per wait for an
        output when a read waits and bytes have reached its socket: the woken read takes
        them (as with a scope, whose cancel cannot undo a wake-up already due), which may be
        a whole output, even the last; if they were only part of one (an engine frozen
        mid-output), the watch's re-check (`RECHECK_GRACE`) finds the wait still going and
        this fails it. Bytes the reader took from the socket in the instant it is failed
        are dropped for ``exc``: the stall was decided.
        """
        if self._outputs or self._error is not None or not self._streaming:
            return False
        if self._reading:
            response = self._response
            if not self._spared and response is not None and response.readable():
                self._spared = True
                return False
        elif self._take_arrived():
            # Called between reads (the pipeline, at a wait that found its deadline passed
            # while the consumer held the last output): what came meanwhile goes first, as
            # the worker was not stalled. Never while a read waits: bytes taken here would
            # not wake it.
            return False
        self._error = exc
        self._streaming = False
        self._payloads.clear()
        response, self._response = self._response, None
        if response is not None:
            response.abort()
        return True

    def _decode(self) -> None:
        """Feed every payload split from the body so far to the reader; keep its outputs, and
        a failure to raise after them (the tokens before it still count: migration keeps
        them)."""
        payloads = self._payloads
        outputs = self._outputs
        while payloads:
            try:
                output = self._feed(payloads.popleft())
            except WorkerGone as exc:
                self._error = exc
                payloads.clear()
                self._streaming = False
                return
            if output is not None:
                outputs.append(output)

    def _feed(self, data: str) -> EngineOutput | None:
        reader = self._reader
        output = reader.feed(data)
        if reader.prompt_token_ids is not None:
            self._check_prompt(reader.prompt_token_ids)
            reader.prompt_token_ids = None
        if reader.done:
            # Whatever follows [DONE] is not read; `_close` reads the body's end so that the
            # connection is reused.
            self._payloads.clear()
            self._streaming = False
            self._engine._answered_at = trio.current_time()
        return output

    async def _read_more(self) -> None:
        """Read the body until it yields payloads or ends (then the last ones, or the final
        output of a stream that ended without ``[DONE]``)."""
        response = self._response
        assert response is not None
        self._reading = True
        try:
            data = await response.receive()
        except (EngineHttpError, trio.ClosedResourceError) as exc:
            if self._error is None:
                self._read_failed(exc)
            # Else `fail_waiting` closed the connection to end this read: its error is next.
            return
        finally:
            self._reading = False
        if self._error is None:
            self._took(data)
        # Else `fail_waiting` came as these bytes did: the stall was decided, they are dropped.

    def _took(self, data: bytes) -> None:
        """Split what a read of the body returned (b"": its end) into payloads."""
        if data:
            self._payloads.extend(self._splitter.feed(data))
            return
        self._streaming = False
        self._payloads.extend(self._splitter.end())
        if self._payloads:
            return
        reader = self._reader
        if reader.finished:
            # The finish reason came; only [DONE] is missing.
            self._outputs.append(reader.finish())
            return
        raise reader.broken("closed the stream without a finish_reason")

    def _read_failed(self, exc: Exception) -> None:
        self._streaming = False
        reader = self._reader
        if reader.finished:
            # Every token and the finish reason came before the connection broke.
            self._outputs.append(reader.finish())
            return
        raise reader.broken(f"broke the stream ({exc})") from exc

    def _take_arrived(self) -> bool:
        """Read, without waiting, what the engine sent while no one read the stream, up to an
        output; whether the reader now has an output, an error or the end to take."""
        response = self._response
        try:
            while (
                not self._outputs
                and self._error is None
                and self._streaming
                and response is not None
            ):
                try:
                    data = response.receive_nowait()
                except trio.WouldBlock:
                    return False
                except EngineHttpError as exc:
                    self._read_failed(exc)
                    break
                self._took(data)
                self._decode()
        except WorkerGone as exc:
            self._error = exc
        return True

    def _check_prompt(self, engine_ids: list[int]) -> None:
        """Warn (once per engine) when the engine rendered the chat into other tokens than the
        frontend routed with: the answer is right, but KV-aware routing is blind to it."""
        engine = self._engine
        ours = self._request.token_ids
        if engine._chat_prompt_checked or tuple(engine_ids) == ours:
            return
        engine._chat_prompt_checked = True
        at = _first_difference(ours, engine_ids)
        _logger.warning(
            "engine %d at %s renders chats into other prompt tokens than this frontend "
            "(%d ids vs %d, first difference at %d): KV-aware routing cannot see its cache "
            "for them; serve with --tokenizer (and --chat-template) naming the engine's model",
            engine.instance_id,
            engine.base_url,
            len(engine_ids),
            len(ours),
            at,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response = self._response
        try:
            if response is not None and self._reader.done and not response.complete:
                # After [DONE] only the body's terminating chunk is left: reading it lets the
                # connection go back to the pool instead of a new one per request. Shielded so
                # that a cancelled request still gets its connection back.
                with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                    try:
                        while await response.receive():
                            pass
                    except EngineHttpError:
                        pass
            else:
                # Cancellable, without a trip through the scheduler per request: the stream's
                # reads were its schedule points.
                await trio.lowlevel.checkpoint_if_cancelled()
        finally:
            # Also when the checkpoint raises Cancelled (the client went): the engine must see
            # the connection close, or it generates on for nobody.
            self._close()

    def _close(self) -> None:
        # Closing an unfinished stream drops its connection: the engine sees the client go and
        # aborts the request.
        response, self._response = self._response, None
        if response is not None:
            response.close()
