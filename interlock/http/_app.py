"""`build_app`: the OpenAI-compatible Starlette app in front of a running `Pipeline`.

The two generation endpoints are raw ASGI callables (Starlette routes to them): they read the
body under a size limit, validate it, run the request, and watch for the client going away.
A disconnect cancels the request's task, which cancels the pipeline's iteration: the worker
stops and the router frees the load (reference/stack.md section 2).
"""

from __future__ import annotations

import io
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import aclosing, suppress
from typing import Any, Final

import attrs
import trio
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._errors import ConfigError, InterlockError
from .._model_rewrites import ModelRewrites
from .._pipeline import Pipeline
from .._tracing import MODEL_REWRITE_ATTRIBUTE, TTFT_ATTRIBUTE, describe_request
from .._weak import WeakCallback
from ..wire import EngineOutput, PreprocessedRequest, RoutingDecision
from ._auth import (
    OPEN_PATHS,
    TRUSTED,
    UNAUTHORIZED_HEADERS,
    ApiKeys,
    caller_flow,
    check_privileges,
)
from ._drain import CONNECTION_CLOSE, DrainTicket, cut_by_drain, refused_while_draining
from ._errors import SERVER_ERROR, HttpError, bad_request, http_error_for
from ._frontend import Frontend, HttpLimits
from ._h1 import BODY_NOWAIT
from ._metrics import HttpMetrics, RequestWatch
from ._nvext import NvExt, apply_headers, query_nvext, worker_id_info
from ._openai import (
    ChatDeltas,
    ParsedRequest,
    chat_request,
    completion_body,
    json_object,
    needs_engine_chat,
    parse_request,
    usage_dict,
)
from ._preprocess import Preprocessor
from ._route import route_routes
from ._sse import DONE, ChunkEncoder, dumps, dumps_plain, event
from ._tracing import TracedEndpoint

# HttpLimits is defined with the endpoints' shared state; it is imported from here too.
__all__ = ["HttpLimits", "build_app", "build_metrics_app", "read_body", "send_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_logger = logging.getLogger("interlock.http")

_JSON: Final = [(b"content-type", b"application/json")]
_SSE: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Disconnected(Exception):
    """The client went away while we were reading its body."""


async def read_body(receive: Receive, scope: Scope, limit: int, within: float = math.inf) -> bytes:
    """The request body, at most ``limit`` bytes, all of it within ``within`` seconds.

    Raises:
        HttpError: 413 when the body (or its Content-Length) is over the limit; 408 when it
            has not all arrived within ``within`` seconds.
        _Disconnected: the client closed the connection first.
    """
    extensions = scope.get("extensions")
    nowait = extensions.get(BODY_NOWAIT) if extensions else None
    if nowait is not None:
        # A body all there: its length is what Content-Length said (the server checked).
        body: bytes | None = nowait()
        if body is not None:
            if len(body) > limit:
                raise _too_large(limit)
            return body
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise bad_request("the Content-Length header is not a number") from None
            if declared > limit:
                raise _too_large(limit)
            break
    with trio.move_on_after(within):
        return await _read_body(receive, limit)
    raise HttpError(
        408,
        f"the request body did not arrive within {within:g} s of its headers "
        "(--request-read-timeout); send the body at once",
        code="request_timeout",
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] != "http.request":
        raise _Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _too_large(limit: int) -> HttpError:
    return HttpError(
        413,
        f"the request body is larger than {limit} bytes; send a shorter prompt",
        code="request_too_large",
    )


async def send_json(send: Send, status: int, body: bytes, headers: list[Any] = _JSON) -> None:
    """Send a whole response (``Content-Length`` set, so no chunked framing)."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: A request still running this long (seconds on trio's clock) after it arrived starts
#: watching for its client going away; a shorter one never pays for the task that waits on
#: ``http.disconnect`` (about a tenth of a short request's CPU). A client that leaves is
#: noticed within about 1.5 times this long (`_Watchdog`), or at the next output after it.
WATCH_DISCONNECT_AFTER: Final = 1.0


async def _watch_disconnect(state: _State) -> None:
    assert state.watcher is not None
    receive = state.receive
    with state.watcher:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not state.done:
                    state.disconnected = True
                    state.scope.cancel()
                return


async def _watch_disconnect_detached(state: _State) -> None:
    """`_watch_disconnect` as a system task (a request without a nursery of its own); the
    request waits for ``state.watcher_done`` before its connection reads again.

    Never raises: an exception from the ASGI ``receive`` is logged (naming the request) and
    swallowed, since a system task that raises crashes the whole trio run; the request then
    goes on unwatched. The task runs in trio's system context, not the request's: context
    variables set for the request (a log context, the current tracing span) are not visible
    to it, so its log line names the request from ``state.request_id``.
    """
    assert state.watcher_done is not None
    try:
        await _watch_disconnect(state)
    except Exception:
        # A system task must not raise: an ASGI server's receive failing only means nobody
        # watches this client any more.
        _logger.exception(
            "watching for the client of request %s going away failed", state.request_id
        )
    finally:
        state.watcher_done.set()


class _Watchdog:
    """Starts the disconnect watcher of each request still running `WATCH_DISCONNECT_AFTER`
    after it arrived, outputs or not: a request waiting in the admission queue or for its
    first token (a long prefill) has no output to notice the time by, and its client may be
    long gone. One system task per trio run, asleep while nothing is in flight (a request
    task cannot host it: it would outlive neither its request nor the others)."""

    __slots__ = ("_pending", "_token")

    def __init__(self) -> None:
        #: The requests not watched yet, in arrival order (so the loop stops at the first
        #: one not due).
        self._pending: dict[_State, None] = {}
        self._token: trio.lowlevel.TrioToken | None = None

    def add(self, state: _State) -> None:
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:
            if self._token is not None:
                self._pending.clear()  # requests of an earlier trio.run: gone with it
            self._token = token
            trio.lowlevel.spawn_system_task(self._run, token, name="interlock disconnect watchdog")
        self._pending[state] = None

    def discard(self, state: _State) -> None:
        self._pending.pop(state, None)

    async def _run(self, token: trio.lowlevel.TrioToken) -> None:
        pending = self._pending
        while pending:
            await trio.sleep(WATCH_DISCONNECT_AFTER / 2)
            now = trio.current_time()
            for state in list(pending):
                if state.watch_at > now:
                    break
                try:
                    state.watch()  # takes it out of ``pending``
                except RuntimeError:
                    # Its nursery closed without `_State.leave` (cancelled from outside):
                    # nothing left to watch. A system task must never raise.
                    pending.pop(state, None)
        if self._token is token:
            self._token = None


class _State:
    """One generation request's progress, shared by its tasks."""

    __slots__ = (
        "disconnected",
        "done",
        "nursery",
        "receive",
        "request_id",
        "running",
        "scope",
        "started",
        "status",
        "watch_at",
        "watchdog",
        "watcher",
        "watcher_done",
    )

    def __init__(
        self,
        nursery: trio.Nursery | None,
        start: float,
        running: int,
        receive: Receive,
        watchdog: _Watchdog,
        scope: trio.CancelScope | None = None,
        request_id: str | None = None,
    ) -> None:
        #: The request's id, for the detached watcher's log (it runs outside the request).
        self.request_id = request_id
        self.disconnected = False
        self.done = False
        #: The response's headers were sent (an error after that is an SSE event).
        self.started = False
        #: The status to count (a stream's, as its producer decided).
        self.status = 200
        #: The request's nursery, where the watcher runs; None for a request of one task,
        #: whose watcher is a system task (a nursery costs ~3 % of a short request's CPU).
        self.nursery = nursery
        #: What a disconnect cancels: the request's nursery's scope, or its own.
        self.scope = nursery.cancel_scope if nursery is not None else scope
        assert self.scope is not None
        #: Set when the detached watcher has ended (None: none was started).
        self.watcher_done: trio.Event | None = None
        #: When to start watching for the client going away (math.inf: watching).
        self.watch_at = start + WATCH_DISCONNECT_AFTER
        #: The disconnect watcher's scope, once one runs.
        self.watcher: trio.CancelScope | None = None
        #: The request's tasks still at work; the last to leave ends the watcher.
        self.running = running
        self.receive = receive
        self.watchdog = watchdog
        watchdog.add(self)

    def watch(self) -> None:
        """Start the task that cancels the request when its client goes away."""
        self.watchdog.discard(self)
        self.watch_at = math.inf
        self.watcher = trio.CancelScope()
        if self.nursery is not None:
            self.nursery.start_soon(_watch_disconnect, self)
        else:
            self.watcher_done = trio.Event()
            trio.lowlevel.spawn_system_task(
                _watch_disconnect_detached, self, name="interlock disconnect watcher"
            )

    def leave(self) -> None:
        """One of the request's tasks is done; after the last, nothing is left to watch for
        (and the nursery closes: the watchdog must not start a watcher in it)."""
        self.running -= 1
        if not self.running:
            self.watchdog.discard(self)
            if self.watcher is not None:
                self.watcher.cancel()


class _GenerateEndpoint:
    """``POST /v1/chat/completions`` (``kind="chat"``) or ``/v1/completions``."""

    def __init__(self, frontend: Frontend, kind: str) -> None:
        self.frontend = frontend
        self.kind = kind
        self.endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        self.id_prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.watchdog = _Watchdog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        frontend = self.frontend
        start = trio.current_time()
        received_wall = time.time()
        if frontend.drain.draining:
            await self._refuse_while_draining(send, start)
            return
        limits = frontend.limits
        try:
            body = await read_body(
                receive, scope, limits.max_body_bytes, limits.request_read_timeout
            )
            if len(body) > frontend.offload_body_bytes:
                # Decoding, rendering and tokenizing a large body takes long enough (100k
                # messages: over a second) to stall every other client: a worker thread does
                # it, and the GIL lets the event loop run in between.
                prepared = await trio.to_thread.run_sync(
                    self._prepare, body, scope, limiter=frontend.offload_limiter
                )
            else:
                prepared = self._prepare(body, scope)
            parsed, nvext, query, request_id, request = prepared
        except _Disconnected:
            return
        except Exception as exc:
            await self._fail(send, http_error_for(exc, preprocessing=True), start)
            return
        if query:
            await self._query(send, parsed, request, start)
            return
        extras = nvext.extra_fields
        watch = frontend.metrics.watch(request_id) if extras else None
        run = _Run(self, parsed, request, extras, watch, start, received_wall)
        frontend.metrics.in_flight += 1
        run.ticket = frontend.drain.enter()
        try:
            if parsed.stream:
                await run.stream(receive, send)
            else:
                await run.complete(receive, send)
        finally:
            frontend.drain.leave(run.ticket)
            frontend.metrics.in_flight -= 1
            if watch is not None:
                frontend.metrics.unwatch(request_id)
            frontend.pipeline.tracing.forget(request_id)

    async def _refuse_while_draining(self, send: Send, start: float) -> None:
        # Connection: close, so that the client's next request opens a new connection, which
        # a load balancer sends to another replica.
        self.frontend.drain.refused += 1
        error = refused_while_draining()
        await send_json(send, 503, error.body(), [*_JSON, CONNECTION_CLOSE])
        self.frontend.metrics.count_request(self.endpoint, 503, trio.current_time() - start)

    def _prepare(
        self, body: bytes, scope: Scope
    ) -> tuple[ParsedRequest, NvExt, bool, str, PreprocessedRequest]:
        """Decode, validate and tokenize a request body; synchronous (and thread-safe).

        Returns the parsed request, its nvext, whether it is a query, its id and the
        preprocessed request.

        Raises:
            HttpError: 4xx naming what was wrong with the request.
            TokenizerError, ChatTemplateError, RequestError: the same, from the preprocessor.
        """
        frontend = self.frontend
        parsed = parse_request(
            self.kind,
            json_object(body),
            max_model_len=frontend.limits.max_model_len,
            engine_postprocessing=not frontend.frontend_post,
        )
        rewrite = frontend.choose_rewrite(parsed.model)
        if rewrite is None:
            missing = frontend.model_not_found(parsed.model)
        else:
            missing = frontend.model_not_found(rewrite.target, rewrite=rewrite)
        if missing is not None:
            raise missing
        max_messages = frontend.limits.max_messages
        if parsed.messages is not None and len(parsed.messages) > max_messages:
            raise bad_request(
                f"messages has {len(parsed.messages)} messages; this server takes at most "
                f"{max_messages} (--max-messages)",
                "messages",
                code="too_many_messages",
            )
        nvext = apply_headers(parsed.nvext, scope["headers"], frontend.objectives)
        flow = caller_flow(scope)
        if flow is not None:
            nvext = attrs.evolve(nvext, fairness_id=flow)
        query = nvext.query_only or not frontend.executes
        frontend.check_worker_ids(nvext)
        check_privileges(
            scope,
            parsed.nvext,
            executes=frontend.executes,
            routing=frontend.routing,
            objectives=frontend.objectives,
        )
        request_id = frontend.new_id(self.id_prefix)
        request = frontend.preprocess(parsed, nvext, request_id, rewrite)
        if self.kind == "chat" and not frontend.frontend_post and not query:
            request = _with_chat(parsed, nvext, request)
        return parsed, nvext, query, request_id, request

    async def _fail(self, send: Send, error: HttpError, start: float) -> None:
        await self._fail_quietly(send, error)
        self.frontend.metrics.count_request(
            self.endpoint, error.status, trio.current_time() - start
        )

    async def _fail_quietly(self, send: Send, error: HttpError) -> None:
        if error.status >= 500:
            _logger.warning("%s answered %d: %s", self.endpoint, error.status, error.message)
        await send_json(send, error.status, error.body(), [*_JSON, *error.headers])

    async def _query(
        self, send: Send, parsed: ParsedRequest, request: PreprocessedRequest, start: float
    ) -> None:
        try:
            decision = await self.frontend.pipeline.query(request)
        except Exception as exc:
            await self._fail(send, http_error_for(exc), start)
            return
        nvext = query_nvext(decision)
        frontend = self.frontend
        assert request.request_id is not None
        if parsed.stream:
            encoder = ChunkEncoder(
                self.kind,
                request_id=request.request_id,
                created=int(time.time()),
                model=frontend.answer_model(request),
                include_usage=False,
            )
            await send_json(send, 200, encoder.query(nvext), _SSE)
        else:
            body = completion_body(
                self.kind,
                request_id=request.request_id,
                created=int(time.time()),
                model=frontend.answer_model(request),
                text="",
                finish_reason=None,
                usage=None,
                nvext=nvext,
            )
            await send_json(send, 200, dumps(body))
        frontend.metrics.count_request(self.endpoint, 200, trio.current_time() - start)


def _with_chat(
    parsed: ParsedRequest, nvext: NvExt, request: PreprocessedRequest
) -> PreprocessedRequest:
    """Under engine postprocessing: ``request`` carrying the client's chat, for an engine that
    runs chats itself (tool calls, reasoning). Not when ``nvext.token_data`` or
    ``nvext.use_raw_prompt`` name the exact prompt: those run as token ids.

    Raises:
        HttpError: 400 when the request needs the engine to run the chat but names its prompt.
    """
    if nvext.token_data is not None or nvext.use_raw_prompt:
        field = needs_engine_chat(parsed)
        if field is not None:
            source = "token_data" if nvext.token_data is not None else "use_raw_prompt"
            raise bad_request(
                f"{field} needs the engine to run the chat, but nvext.{source} makes it run the "
                f"prompt tokens as they are; drop nvext.{source} or {field}",
                field,
            )
        return request
    return attrs.evolve(request, chat=chat_request(parsed))


class _Run:
    """One generation request being served."""

    __slots__ = (
        "endpoint",
        "extras",
        "first_token_at",
        "last_token_at",
        "parsed",
        "received_wall",
        "request",
        "span",
        "start",
        "ticket",
        "token_ids",
        "watch",
    )

    def __init__(
        self,
        endpoint: _GenerateEndpoint,
        parsed: ParsedRequest,
        request: PreprocessedRequest,
        extras: frozenset[str],
        watch: RequestWatch | None,
        start: float,
        received_wall: float,
    ) -> None:
        self.endpoint = endpoint
        self.parsed = parsed
        self.request = request
        self.extras = extras
        self.watch = watch
        self.start = start
        self.received_wall = received_wall
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.token_ids: list[int] | None = [] if "completion_token_ids" in extras else None
        #: The drain's count of this request; its cut cancels the request's nursery.
        self.ticket = DrainTicket()
        #: The request's SERVER span (`TracedEndpoint`), or a no-op span.
        self.span = trace.get_current_span()
        if self.span.is_recording():
            assert request.request_id is not None
            frontend = endpoint.frontend
            # GenAI's convention, span by span: gen_ai.request.model is the model the span's
            # request names. The engine legs (CLIENT spans, named after it) ask the engine for
            # the model it runs: the adapter, else --model-name, a [[model_rewrites]] rule's
            # target whichever it is. This SERVER span's request is the client's: the name it
            # sent (the one it is answered under), with the model that ran as
            # gen_ai.response.model. The same request is then traced the same way wherever a
            # rule's draw sends it.
            served = request.model or frontend.model
            describe_request(
                frontend.pipeline.tracing,
                request.request_id,
                self.span,
                "chat" if endpoint.kind == "chat" else "text_completion",
                served,
            )
            attributes = _request_attributes(request)
            attributes["gen_ai.request.model"] = frontend.answer_model(request)
            attributes["gen_ai.response.model"] = served
            if request.model_rewrite is not None:
                attributes[MODEL_REWRITE_ATTRIBUTE] = request.model_rewrite.rule
            self.span.set_attributes(attributes)

    def _tokens_arrived(self, output: EngineOutput) -> None:
        now = trio.current_time()
        metrics = self.endpoint.frontend.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.start)
            self.span.set_attribute(TTFT_ATTRIBUTE, now - self.start)
        else:
            metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        if self.token_ids is not None:
            self.token_ids.extend(output.token_ids)

    def _finish(self, final: EngineOutput) -> tuple[str, dict[str, Any] | None]:
        """The finish reason to report and the final usage; raises for an engine-side end."""
        reason = final.finish_reason
        if reason not in ("stop", "length", "tool_calls"):
            raise HttpError(
                502,
                f"the worker ended the request with finish_reason={reason!r}",
                type=SERVER_ERROR,
                code="engine_error",
            )
        usage = final.usage
        if usage is None:
            return reason, None
        self.endpoint.frontend.metrics.output_tokens += usage.completion_tokens
        if self.span.is_recording():
            assert self.request.request_id is not None
            self.endpoint.frontend.pipeline.tracing.finished(
                self.request.request_id, usage.completion_tokens
            )
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "gen_ai.response.finish_reasons": (reason,),
                }
            )
        return reason, usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def _response_nvext(self) -> dict[str, Any] | None:
        extras = self.extras
        if not extras:
            return None
        nvext: dict[str, Any] = {}
        decision = self.watch.decision if self.watch is not None else None
        if decision is None:
            decision = self._decision_from_log()
        if "worker_id" in extras and decision is not None:
            nvext["worker_id"] = worker_id_info(decision)
        if "timing" in extras:
            nvext["timing"] = self._timing(decision)
        if "completion_token_ids" in extras:
            nvext["completion_token_ids"] = self.token_ids
        return nvext

    def _decision_from_log(self) -> RoutingDecision | None:
        # Only when the app's HttpMetrics is not among the pipeline's transition sinks (so it
        # never saw the decision): the in-memory log has it, at the cost of a scan.
        decision = None
        assert self.request.request_id is not None
        for record in self.endpoint.frontend.pipeline.transition_log.records(
            self.request.request_id
        ):
            if (
                record.trigger in ("route", "fall_back")
                and type(record.decision) is RoutingDecision
            ):
                decision = record.decision
        return decision

    def _timing(self, decision: RoutingDecision | None) -> dict[str, Any]:
        now = trio.current_time()
        received = self.received_wall
        timing: dict[str, Any] = {"request_received_ms": int(received * 1000)}
        watch = self.watch
        first_wall = (
            received + (self.first_token_at - self.start)
            if self.first_token_at is not None
            else None
        )
        if watch is not None and watch.prefill_started is not None:
            timing["prefill_wait_time_ms"] = max(0.0, (watch.prefill_started - received) * 1000)
            if first_wall is not None:
                timing["prefill_time_ms"] = max(0.0, (first_wall - watch.prefill_started) * 1000)
        if self.first_token_at is not None:
            timing["ttft_ms"] = (self.first_token_at - self.start) * 1000
        timing["total_time_ms"] = (now - self.start) * 1000
        hit_rate = _kv_hit_rate(decision, self.endpoint.frontend.metrics.block_size)
        if hit_rate is not None:
            timing["kv_hit_rate"] = hit_rate
        return timing

    async def complete(self, receive: Receive, send: Send) -> None:
        """Run to the end, then answer with one JSON body."""
        endpoint = self.endpoint
        frontend = endpoint.frontend
        parts: list[str] = []
        generated: list[int] = []
        final: EngineOutput | None = None
        error: HttpError | None = None
        deltas: ChatDeltas | None = None
        with trio.CancelScope() as scope:
            state = _State(
                None, self.start, 1, receive, endpoint.watchdog, scope, self.request.request_id
            )
            self.ticket.attach(scope)
            try:
                # Only the whole answer is needed: workers may send it in fewer outputs.
                async with aclosing(
                    frontend.pipeline.generate(self.request, progress=False)
                ) as outputs:
                    # The per-token work inlined: this loop runs once per token.
                    clock = trio.current_time
                    itl = frontend.metrics.itl.observe_many
                    last = -1.0
                    async for output in outputs:
                        if output.token_ids:
                            now = clock()
                            if last < 0:
                                self.first_token_at = now
                                frontend.metrics.ttft.observe(now - self.start)
                                self.span.set_attribute(TTFT_ATTRIBUTE, now - self.start)
                            else:
                                # A worker holds a whole answer's tokens (Start.hold): an
                                # output of k tokens after a gap g reads as k gaps of g/k, so
                                # the metric's count and mean are per token, as a stream's.
                                k = len(output.token_ids)
                                itl((now - last) / k, k)
                            last = now
                            if now >= state.watch_at:
                                state.watch()
                            generated.extend(output.token_ids)
                        text = output.text
                        if text:
                            parts.append(text)
                        if output.chat_delta is not None:
                            if deltas is None:
                                deltas = ChatDeltas()
                            deltas.add(output.chat_delta)
                        if output.finish_reason is not None:
                            final = output
                if final is None:
                    raise HttpError(
                        502,
                        "the worker's stream ended without a final output",
                        type=SERVER_ERROR,
                        code="worker_gone",
                    )
                reason, usage = self._finish(final)
                self.token_ids = generated
            except Exception as exc:
                error = http_error_for(exc)
            finally:
                # Cancelled too (a drain's cut): out of the watchdog, and the watcher stopped.
                state.leave()
            state.done = True
        if state.watcher_done is not None:
            # The watcher reads the connection: it must be gone before the connection reads
            # the client's next request (a nursery's end would have waited for it).
            await state.watcher_done.wait()
        if state.disconnected:
            frontend.metrics.count_request(endpoint.endpoint, 499, trio.current_time() - self.start)
            return
        if self.ticket.cut and not state.done:
            await endpoint._fail(send, cut_by_drain(), self.start)
            return
        request = self.request
        if error is None and not request.detokenize:
            try:
                parts = [frontend.preprocessor.decode_completion(request.token_ids, generated)]
            except Exception as exc:
                error = http_error_for(exc)
        if error is not None:
            await endpoint._fail(send, error, self.start)
            return
        assert request.request_id is not None
        nvext = self._response_nvext() if self.extras else None
        fields = deltas.fields() if deltas is not None else None
        body = completion_body(
            endpoint.kind,
            request_id=request.request_id,
            created=int(self.received_wall),
            model=frontend.answer_model(request),
            text="".join(parts),
            finish_reason=reason,
            usage=usage,
            nvext=nvext,
            message_fields=fields,
        )
        # The engine's fields and the nvext (timings) may hold floats; the rest of an answer
        # is strings, ints and nulls, which `dumps_plain` writes as `dumps` does.
        await send_json(send, 200, dumps(body) if nvext or fields else dumps_plain(body))
        frontend.metrics.count_request(endpoint.endpoint, 200, trio.current_time() - self.start)

    async def stream(self, receive: Receive, send: Send) -> None:
        """Answer with server-sent events as outputs arrive.

        Two tasks: this one writes to the client, a child reads the outputs (so a slow client
        falls behind into the outbox, where its limit is counted, rather than stalling the
        request unseen); each write takes all the outputs that arrived meanwhile.
        """
        endpoint = self.endpoint
        frontend = endpoint.frontend
        metrics = frontend.metrics
        assert self.request.request_id is not None
        encoder = ChunkEncoder(
            endpoint.kind,
            request_id=self.request.request_id,
            created=int(self.received_wall),
            model=frontend.answer_model(self.request),
            include_usage=self.parsed.include_usage,
        )
        outbox = _Outbox(encoder, frontend.limits.max_stream_buffer_bytes, metrics)
        metrics.streams_open += 1
        try:
            async with trio.open_nursery() as nursery:
                state = _State(nursery, self.start, 2, receive, endpoint.watchdog)
                self.ticket.attach(nursery.cancel_scope)
                nursery.start_soon(self._produce, outbox, state)
                try:
                    await self._send_stream(outbox, send, state)
                finally:
                    state.leave()
            if self.ticket.cut and not state.done and not state.disconnected:
                state.status = await self._end_cut_stream(send, state)
        finally:
            outbox.discard()
            metrics.streams_open -= 1
        metrics.count_request(
            endpoint.endpoint,
            499 if state.disconnected else state.status,
            trio.current_time() - self.start,
        )

    async def _end_cut_stream(self, send: Send, state: _State) -> int:
        """The drain's grace period ended mid-request: a 503 before the headers, else an SSE
        error event (as for a failure mid-stream) and ``[DONE]``; the status to count."""
        error = cut_by_drain()
        if not state.started:
            await send_json(send, 503, error.body(), [*_JSON, CONNECTION_CLOSE])
        else:
            await send(
                {"type": "http.response.body", "body": event(error.to_dict()) + b"data: [DONE]\n\n"}
            )
        return 503

    async def _send_stream(self, outbox: _Outbox, send: Send, state: _State) -> None:
        """Send the response as the producer fills ``outbox``: an HTTP error when the request
        failed before its first output, else the SSE headers and then the events."""
        error = await outbox.wait_head()
        if error is not None:
            await self.endpoint._fail_quietly(send, error)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        state.started = True
        await outbox.send_all(send)

    async def _produce(self, outbox: _Outbox, state: _State) -> None:
        """Run the request, putting its outputs in ``outbox`` as they come (the child task)."""
        try:
            # Created, iterated and closed in this task, so whatever the engine's stream
            # holds open stays in one task.
            async with aclosing(self.endpoint.frontend.pipeline.generate(self.request)) as outputs:
                # Ended (or too slow a client): the engine stops now (closing ``outputs``),
                # not once the client has taken the rest. Cancelled (the client left, a
                # drain's cut) the response is not ended here: the writer, cancelled with
                # it, must not send the end of the body before the cut's error event.
                state.status = await self._fill(outbox, outputs, state)
                outbox.close()
        finally:
            state.leave()

    async def _fill(
        self,
        outbox: _Outbox,
        outputs: AsyncIterator[EngineOutput],
        state: _State,
    ) -> int:
        # Wait for the first output before sending the headers: an error that ends the request
        # before it produced anything (no worker, bad hint, refused) is an HTTP status.
        try:
            output: EngineOutput | None = await outputs.__anext__()
        except StopAsyncIteration:
            output = None
        except Exception as exc:
            error = http_error_for(exc)
            outbox.refuse(error)
            return error.status
        outbox.begin()
        try:
            while output is not None:
                if output.token_ids:
                    self._tokens_arrived(output)
                    if self.last_token_at >= state.watch_at:
                        state.watch()
                text = output.text or ""
                if output.finish_reason is not None:
                    reason, usage = self._finish(output)
                    state.done = True
                    outbox.finish(text, reason, usage, self._response_nvext(), output.chat_delta)
                    return 200
                if output.chat_delta is not None:
                    # Tool-call deltas and reasoning, passed on as the engine sent them.
                    outbox.add_delta(text, output.chat_delta)
                elif text:
                    outbox.add_text(text)
                try:
                    output = await outputs.__anext__()
                except StopAsyncIteration:
                    output = None
            raise HttpError(
                502,
                "the worker's stream ended without a final output",
                type=SERVER_ERROR,
                code="worker_gone",
            )
        except Exception as exc:
            # Headers are out: the error becomes an SSE event, as OpenAI-compatible servers do.
            error = http_error_for(exc)
            _logger.warning("stream %s failed: %s", self.request.request_id, error.message)
            state.done = True
            outbox.end(event(error.to_dict()) + DONE)
            return error.status


class _Outbox:
    """What a stream produced and its client has not taken yet, with the task that sends it.

    Each output is an event of its own, and each write takes every event waiting. A client
    that falls more than ``_merge_at`` bytes behind has its further text wait as text, leaving
    as one event however many outputs it came in, so it costs the bytes of its text, not an
    event per token. Past ``limit`` waiting bytes the producer gets `HttpError` 408
    (``code="stream_buffer_full"``), which ends the request.
    """

    __slots__ = (
        "_chunks",
        "_closed",
        "_first",
        "_head",
        "_lot",
        "_merge_at",
        "_size",
        "_spill",
        "_text",
        "_text_size",
        "encoder",
        "limit",
        "metrics",
    )

    def __init__(self, encoder: ChunkEncoder, limit: int, metrics: HttpMetrics) -> None:
        self.encoder = encoder
        self.limit = limit
        self.metrics = metrics
        #: Encoded events waiting, then text not yet encoded (it follows every chunk).
        self._chunks: list[bytes] = []
        self._text: list[str] = []
        #: Text of a client that fell behind, gathered from ``_text`` (it comes first): one
        #: buffer, not a string object (about 50 bytes) per output.
        self._spill: io.StringIO | None = None
        self._text_size = 0
        #: Waiting bytes (text counted in characters until it is encoded).
        self._size = 0
        self._first = True
        #: None while open; the last bytes of the stream once it ends (sent without more_body).
        self._closed: bytes | None = None
        #: None until the producer knows how the response starts: True (headers, then
        #: events) or the error to answer instead.
        self._head: HttpError | bool | None = None
        #: Waiting bytes past which text is merged into one event.
        self._merge_at = min(limit // 4, 16 * 1024)
        self._lot = trio.lowlevel.ParkingLot()

    def begin(self) -> None:
        """The response starts: its headers can go."""
        self._head = True
        self._lot.unpark()

    def refuse(self, error: HttpError) -> None:
        """The request failed before its first output: answer ``error`` instead."""
        self._head = error
        self._lot.unpark()

    async def wait_head(self) -> HttpError | None:
        """Wait until the response starts (None) or is refused (the error to answer)."""
        while self._head is None and self._closed is None:
            await self._lot.park()
        head = self._head
        return head if isinstance(head, HttpError) else None

    def _resize(self, size: int) -> None:
        self.metrics.stream_buffered_bytes += size - self._size
        self._size = size

    def _grew(self, added: int) -> None:
        self._resize(self._size + added)
        self._lot.unpark()
        if self._size > self.limit:
            self.metrics.stream_buffer_overflows += 1
            raise HttpError(
                408,
                f"the client fell more than {self.limit} bytes behind the stream "
                "(--max-stream-buffer-bytes); the request was cancelled to free its worker; "
                "read the stream as it arrives",
                code="stream_buffer_full",
            )

    def _take_text(self) -> str:
        text = "".join(self._text)
        self._text.clear()
        if self._spill is not None:
            text = self._spill.getvalue() + text
            self._spill = None
        return text

    def _flush_text(self) -> None:
        if self._text_size:
            chunk = self.encoder.text(self._take_text(), first=self._first)
            self._first = False
            self._chunks.append(chunk)
            self._resize(self._size - self._text_size + len(chunk))
            self._text_size = 0

    def add_text(self, text: str) -> None:
        if not self._text_size and self._size < self._merge_at:
            # The client keeps up: an event per output, as the engine sent them.
            chunk = self.encoder.text(text, first=self._first)
            self._first = False
            self._chunks.append(chunk)
            self._grew(len(chunk))
            return
        parts = self._text
        parts.append(text)
        if len(parts) == 16:
            if self._spill is None:
                self._spill = io.StringIO()
            self._spill.write("".join(parts))
            parts.clear()
        self._text_size += len(text)
        self._grew(len(text))

    def add_delta(self, text: str, fields: dict[str, Any]) -> None:
        self._flush_text()
        chunk = self.encoder.delta(text, fields, first=self._first)
        self._first = False
        self._chunks.append(chunk)
        self._grew(len(chunk))

    def finish(
        self,
        text: str,
        reason: str,
        usage: dict[str, Any] | None,
        nvext: dict[str, Any] | None,
        fields: dict[str, Any] | None,
    ) -> None:
        """End the stream with its last chunk; the waiting text goes with it."""
        if self._text_size:
            text = self._take_text() + text
            self._resize(self._size - self._text_size)
            self._text_size = 0
        self.end(
            self.encoder.final(
                text, reason, first=self._first, usage=usage, nvext=nvext, fields=fields
            )
        )

    def end(self, last: bytes) -> None:
        """End the stream with ``last``, after what is waiting."""
        if self._closed is None:
            self._flush_text()
            self._closed = last
            self._resize(self._size + len(last))
            self._lot.unpark()

    def close(self) -> None:
        """End the stream after what is waiting, without a last event (if none was given)."""
        self.end(b"")

    def discard(self) -> None:
        """Forget what is waiting (the request is over)."""
        self._chunks.clear()
        self._text.clear()
        self._spill = None
        self._text_size = 0
        self._resize(0)

    async def send_all(self, send: Send) -> None:
        """Send what is waiting as it comes, until the stream ends; each send takes all that
        is waiting (one write however many events). Cancelled with the request."""
        while True:
            while not self._chunks and not self._text_size and self._closed is None:
                await self._lot.park()
            self._flush_text()
            chunks = self._chunks
            closed = self._closed
            if closed:
                chunks.append(closed)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._resize(0)
            if closed is None:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": body})
                return


def _request_attributes(request: PreprocessedRequest) -> dict[str, Any]:
    """The GenAI request attributes of a traced request's SERVER span."""
    attributes: dict[str, Any] = {"gen_ai.response.id": request.request_id}
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    sampling = request.sampling
    for name in ("temperature", "top_p", "seed"):
        value = getattr(sampling, name)
        if value is not None:
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def _kv_hit_rate(decision: RoutingDecision | None, block_size: int) -> float | None:
    if decision is None:
        return None
    blocks = len(decision.token_ids) // block_size
    if not blocks:
        return None
    for selection in decision.selections:
        if selection.chosen == decision.decode_worker_id and selection.leg != "prefill":
            for candidate in selection.candidates:
                if candidate.worker_id == selection.chosen:
                    return candidate.overlap_blocks / blocks
    return None


# -- small endpoints -------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def _discard(observers: list[Any], observer: object) -> None:
    """Take ``observer`` out of ``observers`` if still there (a finalizer's callback)."""
    with suppress(ValueError):
        observers.remove(observer)


def build_app(
    pipeline: Pipeline,
    *,
    model: str = "mock",
    preprocessor: Preprocessor | None = None,
    metrics: HttpMetrics | None = None,
    limits: HttpLimits | None = None,
    route_api: bool = False,
    api_keys: ApiKeys | None = None,
    metrics_endpoint: bool = True,
    objectives: Mapping[str, int] | None = None,
    model_rewrites: ModelRewrites | None = None,
) -> Starlette:
    """The OpenAI-compatible app serving ``pipeline`` under the model name ``model``.

    ``preprocessor`` turns prompts into tokens; by default the pipeline's tokenizer (from
    ``Components(tokenizer=...)``) with its chat template, or the built-in byte tokenizer.
    Pass the same ``metrics`` that the pipeline got in ``Components.transition_sinks`` so that
    ``/metrics`` includes routing and transition counts (without it they stay at zero).
    ``route_api`` adds the route-only endpoints (``POST /v1/route`` and friends, see
    docs/route-api.md).

    ``api_keys``: requests outside ``/health``, ``/live`` and ``/metrics`` need one of these
    keys (401 without), and only its trusted keys may pin workers, skip load booking, ask for
    query-only answers or use the route-only API (403); by default (and with ``ApiKeys()``)
    no key is needed and every caller may. ``metrics_endpoint=False`` leaves ``/metrics`` out
    (serve `build_metrics_app` on another address instead).

    ``objectives``: each InferenceObjective's priority, by name: a request whose
    ``x-gateway-inference-objective`` header names one waits in the admission queue with that
    priority (one not listed: 0); a positive one is reserved for trusted callers, as
    ``nvext.agent_hints.priority`` is.

    ``model_rewrites``: GAIE's InferenceModelRewrite rules (``[[model_rewrites]]``): a
    request naming a model a rule matches goes to a target drawn by weight, and is answered
    under the name it sent (`Frontend.choose_rewrite`).

    Raises:
        ConfigError: the pipeline postprocesses in the frontend but has no tokenizer to turn
            tokens into text.
    """
    if preprocessor is None:
        tokenizer = pipeline.tokenizer
        if tokenizer is None:
            preprocessor = Preprocessor.default()
        else:
            from ..processing import ChatTemplate

            preprocessor = Preprocessor(
                tokenizer,
                tokenizer.chat_template or ChatTemplate.chatml(),
                source=getattr(tokenizer, "source", repr(tokenizer)),
            )
    if pipeline.config.postprocessing == "frontend" and pipeline.tokenizer is None:
        raise ConfigError(
            "postprocessing='frontend' turns tokens into text in the frontend, but the pipeline "
            "has no tokenizer; build it with Components(tokenizer=preprocessor.tokenizer)",
            knobs=("postprocessing",),
        )
    metrics = metrics if metrics is not None else HttpMetrics()
    metrics.block_size = pipeline.config.kv_block_size
    # Held weakly, and taken out when the metrics go: a pipeline may outlive its apps.
    observer = WeakCallback(metrics.observe_queue_time)
    observers = pipeline.queue_time_observers
    if observer not in observers:
        observers.append(observer)
        weakref.finalize(metrics, _discard, observers, observer)
    frontend = Frontend(
        pipeline,
        model=model,
        preprocessor=preprocessor,
        metrics=metrics,
        limits=limits or HttpLimits(),
        objectives=objectives,
        model_rewrites=model_rewrites,
    )
    # The names the rewrite counter may label a request's model by (any other: "other").
    metrics.model_rewrite_names = frontend.model_rewrites.label_names() | {model}

    async def models(request: Request) -> Response:
        # What a request may use now (OpenAI's "currently available models", vLLM's loaded
        # adapters): an adapter only engines away serve is left out until one is back.
        adapters = [_model_card(frontend, a) for a in sorted(frontend.adapters())]
        return _json({"object": "list", "data": [_model_card(frontend), *adapters]})

    async def model_info(request: Request) -> Response:
        name = request.path_params["model"]
        error = frontend.model_unavailable(name)
        if error is not None:
            return Response(error.body(), error.status, media_type="application/json")
        return _json(_model_card(frontend, None if name == frontend.model else name))

    async def health(request: Request) -> Response:
        workers = pipeline.workers
        healthy = bool(workers)
        if frontend.drain.draining:
            # A load balancer's health check stops sending here; the requests in flight
            # finish (docs/operations.md, "Draining").
            return _json(
                {
                    "status": "draining",
                    "model": frontend.model,
                    "workers": sorted(workers),
                    "routing": pipeline.config.routing,
                    "in_flight": pipeline.in_flight,
                },
                503,
            )
        try:
            ejected = await pipeline.worker_states()
        except InterlockError:
            ejected = {}  # the router is restarting: /health answers all the same
        return _json(
            {
                "status": "healthy" if healthy else "unhealthy",
                "model": frontend.model,
                "workers": sorted(workers),
                # Left out of routing for a while (they stalled or broke streams), with the
                # seconds left; routable again by themselves afterwards.
                "ejected": {str(w): round(left, 1) for w, left in ejected.items()},
                "routing": pipeline.config.routing,
                "in_flight": pipeline.in_flight,
                "queued": pipeline.queued,
            },
            200 if healthy else 503,
        )

    async def live(request: Request) -> Response:
        return _json({"status": "live"})

    async def render_metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if pipeline.config.router_mode == "kv":
            # How an operator sees that the engines' KV events arrive (docs/engines.md).
            blocks = await pipeline.kv_blocks()
            metrics.kv_blocks = {worker: len(ids) for worker, ids in blocks.items()}
        metrics.queued = pipeline.queued
        metrics.shed = pipeline.shed
        metrics.stalls = pipeline.stats.stalls
        metrics.ejected = await pipeline.worker_states()
        # Every worker is listed, 0 when idle: a leaked booking shows as a count that stays.
        load = await pipeline.load()
        metrics.booked_requests = {
            worker: load[worker].active_requests if worker in load else 0
            for worker in sorted(set(pipeline.workers) | set(load))
        }
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def traced(kind: str) -> TracedEndpoint:
        endpoint = _GenerateEndpoint(frontend, kind)
        return TracedEndpoint(
            endpoint,
            pipeline.tracing.tracer,
            route=endpoint.endpoint,
            operation="chat" if kind == "chat" else "text_completion",
            model=model,
        )

    routes = [
        Route("/v1/chat/completions", traced("chat"), methods=["POST"]),
        Route("/v1/completions", traced("completion"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/live", live, methods=["GET"]),
    ]
    if metrics_endpoint:
        routes.append(Route("/metrics", render_metrics, methods=["GET"]))
    if route_api:
        routes += route_routes(frontend)

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = HttpError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code="not_found" if exc.status_code == 404 else None,
        )
        return Response(error.body(), exc.status_code, media_type="application/json")

    async def internal_error(request: Request, exc: Exception) -> Response:
        _logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = http_error_for(exc)
        return Response(
            error.body(),
            error.status,
            headers={k.decode(): v.decode() for k, v in error.headers},
            media_type="application/json",
        )

    app = _App(
        routes=routes,
        exception_handlers={HTTPException: http_exception, Exception: internal_error},
    )
    app.fast_routes = {
        "/v1/chat/completions": routes[0].app,
        "/v1/completions": routes[1].app,
    }
    app.api_keys = api_keys if api_keys is not None and api_keys.enabled else None
    app.open_paths = OPEN_PATHS if metrics_endpoint else OPEN_PATHS - {"/metrics"}
    app.state.render_metrics = render_metrics
    app.state.frontend = frontend
    app.state.drain = frontend.drain
    app.state.metrics = metrics
    app.state.pipeline = pipeline
    return app


class _App(Starlette):
    """Starlette, with the two generation endpoints dispatched before its middleware.

    They are raw ASGI endpoints that answer every error themselves, so the error middleware
    and the route table (about 10 % of a small request's CPU) have nothing to add there.
    """

    fast_routes: dict[str, Any]
    api_keys: ApiKeys | None
    open_paths: frozenset[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Before anything reads the request: a caller without a key learns nothing else.
            keys = self.api_keys
            if keys is None:
                scope[TRUSTED] = True
            elif scope["path"] not in self.open_paths:
                try:
                    scope[TRUSTED] = keys.authenticate(scope["headers"])
                except HttpError as error:
                    await send_json(send, error.status, error.body(), UNAUTHORIZED_HEADERS)
                    return
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast_routes.get(scope["path"])
            if endpoint is not None:
                try:
                    await endpoint(scope, receive, send)
                except Exception as exc:
                    # A bug: logged with its traceback, and a 500 if nothing was sent yet.
                    _logger.exception("unhandled error in POST %s", scope["path"])
                    try:
                        await send_json(send, 500, http_error_for(exc).body())
                    except Exception:
                        pass  # the response had started; the log has the error
                return
        await super().__call__(scope, receive, send)


def build_metrics_app(app: Starlette) -> Starlette:
    """An app serving only ``GET /metrics`` of ``app`` (from `build_app`), for a separate
    address (``--metrics-port``); it needs no API key."""
    return Starlette(routes=[Route("/metrics", app.state.render_metrics, methods=["GET"])])


def _model_card(frontend: Frontend, adapter: str | None = None) -> dict[str, Any]:
    """The base model's card, or (``adapter``) a LoRA adapter's, whose ``parent`` is the base
    model as vLLM lists it."""
    card: dict[str, Any] = {
        "id": adapter or frontend.model,
        "object": "model",
        "created": frontend.created,
        "owned_by": "interlock",
        "max_model_len": frontend.limits.max_model_len,
    }
    if adapter is not None:
        card["parent"] = frontend.model
    return card
