"""`ExtProcPicker`: interlock as a Gateway API Inference Extension endpoint picker (EPP).

A gateway (Envoy, and the gateways built on it) opens one ext_proc stream per HTTP request
(``envoy.service.ext_proc.v3.ExternalProcessor/Process``) and sends it the request's phases;
`ExtProcPicker.process` answers them as GAIE's protocol says (reference: llm-d's EPP):

- ``request_headers``: the headers are recorded (``:path``, ``x-request-id`` (else a new id),
  ``test-epp-endpoint-selection``, the objective and fairness headers, the model-name
  rewrite ``x-llm-d-model-name-rewrite``, else ``x-gateway-model-name-rewrite``: `model_rewrite`).
  No answer yet, unless
  the request has no body (``end_of_stream``): then it is picked at once, as a one-token
  prompt, and not booked (a ``GET`` costs a worker nothing the router tracks).
- ``request_body`` (``FULL_DUPLEX_STREAMED``: the picker buffers the chunks itself, up to the
  frontend's ``max_body_bytes``, else ImmediateResponse 413). At ``end_of_stream`` the body of
  a chat or completions request is parsed with the HTTP layer's field checks (only the fields
  that make the prompt: the engine checks the rest), its prompt rendered and tokenized by the
  frontend's preprocessor (in a worker thread above `Frontend.offload_body_bytes`), and routed by
  `Pipeline.query` with ``book=True`` and admission control. The answer, in the order full
  duplex mode requires: the request-headers response (``clear_route_cache``, the header
  ``x-gateway-destination-endpoint: ip:port[,fallback...]``, ``Content-Length``, and
  ``x-prefiller-host-port`` naming the prefill endpoint when the decision is disaggregated:
  llm-d's header) with the same endpoint list in ``dynamic_metadata["envoy.lb"]``; then the
  body, unchanged (but for the model-name rewrite: its ``model`` is that name, set
  before the pick, so the pick and the 404 check see it, and ``Content-Length`` is the new
  length; a ``[[model_rewrites]]`` rule for the body's model sets it instead, the header
  notwithstanding, as llm-d's picker does: `Frontend.choose_rewrite`), in
  ``streamed_response`` chunks of at most 62,000 bytes. The fallbacks are
  the decision's other candidates for that leg, best first. Other paths' bodies are not
  parsed: they are picked as a request without a body is.
- ``response_headers``: answered with ``x-conformance-test-served-endpoint: <served>`` when
  the request carried ``test-epp-endpoint-selection`` (the conformance hook; no other client
  sees the pool's addresses), else with no mutation. The served endpoint is
  ``metadata_context["envoy.lb"]["x-gateway-destination-endpoint-served"]`` when the gateway
  says, else the pick. A 5xx counts as a failed stream of the served worker for outlier
  ejection. When the served worker is not the one picked (the gateway fell back), the booking
  moves: the pick's is freed and the request is booked again, under ``<request id>-served``,
  on the worker that served (a second recorded decision). When Envoy sends no response body
  (``response_body_mode: NONE``, docs/gateway/envoy.yaml) the headers release the prefill load.
- ``response_body``: each chunk is passed back unchanged (after a model-name rewrite, with
  every ``"model": "<that name>"`` put back to the name the client sent, full duplex mode
  only); the first one releases the prefill
  load (`Pipeline.mark_prefill_complete`); the last (or the response trailers) frees the
  booking. Without response bodies the stream's end (Envoy ends it with the request, when
  response trailers are on) frees it. The OpenAI ``usage`` the body reports (a JSON body's,
  wherever it is in the object, or a stream's last chunks', with
  ``stream_options.include_usage``) is read as the body passes (`UsageReader`: a stream's
  last `USAGE_TAIL_BYTES` are kept, a JSON body's usage object alone; never a whole body),
  counted in
  ``interlock_gateway_usage_tokens_total{kind}`` (prompt, completion, cached) and noted after
  the pick's records in the transition log (`Pipeline.record_usage`).

Other body modes, as Envoy's ``protocol_config`` names them: with a ``BUFFERED`` request body
the headers are answered at once (Envoy sends the body only then) and the pick rides on the
body's answer (the same header mutation, ``clear_route_cache`` and metadata, and a rewritten
body whole in its ``body_mutation``); a response body in a mode other than full duplex is
answered without a mutation.

Whatever ends a stream (the response's end, an ImmediateResponse, the gateway dropping the
stream, a client gone, an error) frees its booking: booked load never leaks.

Errors are ImmediateResponses with an OpenAI-style JSON body: 400 for a bad body (not JSON,
no ``model``, a bad field), 404 for a model this frontend does not serve
(`Frontend.model_not_found`: ``--model-name`` or a LoRA adapter a registered engine serves,
after any rewrite), 413 for a body over ``max_body_bytes``, 429 when every candidate is at its
in-flight limit and the queue is full (`Overloaded`), 503 when no candidate is left (none
registered with an HTTP endpoint, the subset hint or ``test-epp-endpoint-selection`` names
none, none of them serves the LoRA adapter the body names) or while the frontend drains.

A body naming a LoRA adapter is picked among the engines that serve it, those where it is
running first, as the router does for every request (`interlock.actors` ``_adapters``).

Candidates: only workers with an HTTP endpoint (`http_endpoints`); a worker without one
that joins later (an etcd record of an ``interlock worker`` without ``--openai-port``) is
left out of every pick, and logged once. ``interlock route --ext-proc-port`` refuses at start
the workers it is given without one. The subset hint
(``metadata_context["envoy.lb.subset_hint"]["x-gateway-destination-endpoint-subset"]``) and
``test-epp-endpoint-selection`` restrict the destination further (both: to what both name).

GAIE's ``x-gateway-inference-objective`` header gives the pick the priority of the objective
it names (``--objective NAME=PRIORITY``; one not configured: 0) in the admission queue, where
a negative one is sheddable (429 at once while every candidate is full);
``x-gateway-inference-fairness-id`` is its flow there (waiting flows of one priority take
turns; none: ``default-flow``).

The ext_proc stream carries no API key (``--api-key`` guards the HTTP API only): serve it
where only the gateway reaches it (any client of the gateway may name any objective, as with
GAIE's own picker).

Only the pick waits: `ExtProcStream.answer_now` answers every other message (request
headers with no answer due, body chunks before the last, the response phases) at once, and
runs the router bookkeeping they imply (prefill release, 5xx count, the booking's release,
usage) after making the answer.

Each pick is a query in the transition log (``received -> preprocessed -> routed -> done``
with the routing decision), which ``interlock inspect`` explains like ``/v1/route``'s.
Picks are counted in ``interlock_http_requests_total{endpoint="ext_proc"}`` with their
status (200 for a pick).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

import trio
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus

from ..engines import Engine
from ..http._drain import DrainTicket, refused_while_draining
from ..http._errors import HttpError, bad_request, http_error_for
from ..http._frontend import Frontend
from ..http._nvext import EMPTY, HEADER_FAIRNESS, HEADER_OBJECTIVE, gaie_routing_hints
from ..http._openai import CHAT_FIELDS, COMPLETION_FIELDS, ParsedRequest, json_object
from ..wire import ModelRewriteDecision, PreprocessedRequest, RoutingDecision, Usage
from ._endpoints import http_endpoints, match_endpoints
from ._rewrite import ModelNameRestorer, model_rewrite, rewrite_model
from ._usage import USAGE_TAIL_BYTES, UsageReader, usage_of

__all__ = [
    "BODY_CHUNK_BYTES",
    "DESTINATION_HEADER",
    "PREFILLER_HEADER",
    "SERVED_TEST_HEADER",
    "USAGE_TAIL_BYTES",
    "ExtProcPicker",
    "ExtProcStream",
    "usage_of",
]

_logger = logging.getLogger("interlock.gateway")

#: The most body bytes one ``streamed_response`` carries (GAIE's ``BodyByteLimit``).
BODY_CHUNK_BYTES: Final = 62_000
DESTINATION_HEADER: Final = "x-gateway-destination-endpoint"
SERVED_KEY: Final = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE: Final = "envoy.lb.subset_hint"
SUBSET_KEY: Final = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE: Final = "envoy.lb"
#: llm-d's header naming the prefill endpoint of a disaggregated request.
PREFILLER_HEADER: Final = "x-prefiller-host-port"
#: GAIE's conformance hooks: restrict the candidates; echo the served endpoint.
SELECTION_TEST_HEADER: Final = "test-epp-endpoint-selection"
SERVED_TEST_HEADER: Final = "x-conformance-test-served-endpoint"
#: GAIE's InferenceObjective and flow-control headers (as the recorded header names).
OBJECTIVE_HEADER: Final = HEADER_OBJECTIVE.decode()
FAIRNESS_HEADER: Final = HEADER_FAIRNESS.decode()
#: The metrics label of every pick (`HttpMetrics.count_request`).
METRICS_ENDPOINT: Final = "ext_proc"

#: The fields of a body that make its prompt; the engine checks the others.
_PROMPT_FIELDS: Final = {
    "chat": (
        "model",
        "messages",
        "tools",
        "chat_template_kwargs",
        "add_generation_prompt",
        "cache_salt",
    ),
    # cache_salt: the engine caches a salted prompt's blocks apart, so the pick looks them up
    # under the salt (`interlock.kv.kv_salt`).
    "completion": ("model", "prompt", "cache_salt"),
}
_FIELD_CHECKS: Final = {"chat": CHAT_FIELDS, "completion": COMPLETION_FIELDS}
_OVERWRITE: Final = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_DUPLEX: Final = ProcessingMode.FULL_DUPLEX_STREAMED
_NONE: Final = ProcessingMode.NONE
#: The prompt of a request without a body to parse (a ``GET``): it fills no KV block, so
#: the router picks by load alone.
_NO_PROMPT: Final = (0,)


class ExtProcPicker:
    """The picker over a running frontend: `process` answers one ext_proc stream.

    ``booked`` holds the ids of the requests whose load is booked now (each freed when its
    stream ends, however it ends). ``fallbacks``: how many other candidates the destination
    names after the pick (None: all of them). ``interlock route`` passes 0 unless
    ``--ext-proc-fallbacks``: Envoy's ``ORIGINAL_DST`` cluster (GAIE's reference Envoy routes
    on the header with it) takes exactly one ``host:port``, and answers a list with 503.
    """

    def __init__(self, frontend: Frontend, *, fallbacks: int | None = None) -> None:
        self.frontend = frontend
        self.fallbacks = fallbacks
        self.booked: set[str] = set()
        #: Workers without an HTTP endpoint already logged as left out of picks.
        self._unroutable_logged: set[int] = set()

    @property
    def ready(self) -> bool:
        """Whether picks can succeed now: not draining, and a worker with an HTTP endpoint is
        registered (gRPC health's ``readiness``)."""
        if self.frontend.drain.draining:
            return False
        return bool(http_endpoints(self.frontend.pipeline.workers))

    def open_stream(self) -> ExtProcStream:
        """A new stream's state, for `process` (any thread: it only reads the picker)."""
        return ExtProcStream(self)

    async def process(
        self,
        requests: AsyncIterator[ProcessingRequest],
        stream: ExtProcStream | None = None,
    ) -> AsyncIterator[ProcessingResponse]:
        """Answer one ext_proc stream: for each message of ``requests`` (Envoy's), the
        responses its phase needs, as the module says. Waits for the messages, the
        tokenizer's thread and the router (and the admission queue). Ends when ``requests``
        ends or after an ImmediateResponse; frees the request's booking however it ends.

        ``stream``: the stream's state (`open_stream`), when some of its messages were
        answered already with `ExtProcStream.answer_now`."""
        if stream is None:
            stream = ExtProcStream(self)
        try:
            async for message in requests:
                for response in await stream.handle(message):
                    yield response
                if stream.finished:
                    return
        finally:
            stream.close()

    # -- what the streams share ---------------------------------------------------------------

    def endpoints(self, workers: Mapping[int, Engine]) -> dict[int, str]:
        """Each worker of ``workers`` with an HTTP endpoint -> that endpoint; those without
        one are logged (once each)."""
        found = http_endpoints(workers)
        for worker_id in workers.keys() - found.keys() - self._unroutable_logged:
            self._unroutable_logged.add(worker_id)
            _logger.warning(
                "worker %d has no HTTP endpoint (it is not an OpenAI-compatible server, e.g. an "
                "interlock worker without --openai-port): the gateway cannot send it requests, "
                "so no pick names it",
                worker_id,
            )
        return found

    def booking_id(self, wanted: str | None) -> str:
        """The id to book a request under: ``wanted`` (its ``x-request-id``) unless absent or
        booked by another stream now, else a new one."""
        if wanted and wanted not in self.booked:
            return wanted
        return self.frontend.new_id("epp")


class ExtProcStream:
    """One ext_proc stream's state: the request's headers and body, the pick, the booking.

    One message at a time: `answer_now` answers the messages that need no waiting
    (`serve_ext_proc` calls it as it reads each message, so most phases need no task of
    their own), then runs the router bookkeeping they imply (`chores`); `handle` answers any
    message. Fields set by the pick (`decision`, `picked`, `endpoints`) are only read once it
    is made.
    """

    def __init__(self, picker: ExtProcPicker) -> None:
        self.picker = picker
        self.frontend = picker.frontend
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.size = 0
        #: The request bodies' and responses' modes (full duplex unless Envoy says otherwise).
        self.request_duplex = True
        self.response_duplex = True
        #: Whether Envoy sends the response body at all (``response_body_mode`` not NONE).
        self.response_body_sent = True
        self.subset: list[str] | None = None
        #: The endpoint the gateway says served the request (its ``envoy.lb`` metadata).
        self.served: str | None = None
        self.request: PreprocessedRequest | None = None
        self.decision: RoutingDecision | None = None
        #: The picked endpoints, best first.
        self.picked: list[str] = []
        self.endpoints: dict[int, str] = {}
        #: The id the request's load is booked under (None: nothing booked).
        self.booked_as: str | None = None
        self.prefill_released = False
        #: The request counted in flight for the frontend's drain, from the pick on.
        self.ticket: DrainTicket | None = None
        #: The booking moved to the worker that served (once per stream).
        self.moved = False
        self.finished = False
        #: Router bookkeeping an answer implies, run after it is made, in order (`run_chores`).
        self.chores: list[Callable[[], None]] = []
        #: Whether `answer_now` queued the prefill release already (the chore runs once).
        self._prefill_queued = False
        #: Reads the response body's usage as it passes (keeps at most `USAGE_TAIL_BYTES`).
        self._usage = UsageReader()
        #: The usage the response body reported (None: none seen).
        self.usage: Usage | None = None
        #: The response ended (`answer_now` queued the booking's release).
        self.response_ended = False
        #: Puts the client's model name back into the response (the model-name rewrite
        #: changed the request's; None: nothing to put back).
        self.model_restorer: ModelNameRestorer | None = None

    # -- the phases ---------------------------------------------------------------------------

    async def handle(self, message: ProcessingRequest) -> list[ProcessingResponse]:
        """The responses to one message from the gateway (maybe none yet); the trio thread."""
        answers = self.answer_now(message)
        if answers is not None:
            return answers
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            return await self._request_headers(message)
        if phase == "request_body":
            return await self._request_body(message)
        if phase == "request_trailers":
            return await self._request_trailers()
        if phase == "response_headers":
            worker = self._served_worker()
            if worker is not None:
                await self._move_booking(worker)
            answers = self.answer_now(message)
            assert answers is not None, "the booking moved: the headers need no router now"
            return answers
        return []

    def answer_now(self, message: ProcessingRequest) -> list[ProcessingResponse] | None:
        """The responses to ``message`` if it needs no waiting (one message at a time per
        stream, and none while `handle` runs), the router bookkeeping they imply run after
        them (`run_chores`). None: the message needs `handle` (the pick, a refusal while
        draining, an ImmediateResponse, a booking to move), and nothing was changed but the
        protocol and metadata it carries (read again by `handle`)."""
        answers = self._answer_now(message)
        if answers is not None and self.chores:
            self.run_chores()
        return answers

    def _answer_now(self, message: ProcessingRequest) -> list[ProcessingResponse] | None:
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self.request_duplex = config.request_body_mode == _DUPLEX
            self.response_duplex = config.response_body_mode == _DUPLEX
            self.response_body_sent = config.response_body_mode != _NONE
        self._read_metadata(message)
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            if (
                message.request_headers.end_of_stream
                or not self.request_duplex
                or self.frontend.drain.draining
            ):
                return None
            self._record_headers(message)
            return []
        if phase == "request_body":
            if self.decision is not None:
                return []  # trailers came first: the pick was made
            body = message.request_body
            if body.end_of_stream or not self.request_duplex or not self._buffer(body.body):
                return None  # the pick, the buffered body's answer, or 413
            return []
        if phase == "response_headers":
            return self._response_headers(message)
        if phase == "response_body":
            return self._response_body(message)
        if phase == "response_trailers":
            self._finish_response()
            answers = [ProcessingResponse(response_trailers=TrailersResponse())]
            held = self.model_restorer.flush() if self.model_restorer is not None else b""
            if held and self.response_duplex:
                # The body ended without its end_of_stream: pass on what was held back.
                answers.insert(0, _streamed("response_body", held, False))
            return answers
        if phase == "request_trailers":
            return None
        return []

    def run_chores(self) -> None:
        """Run (and take) the bookkeeping `chores` queued; never raises: a chore that fails
        is logged."""
        chores, self.chores = self.chores, []
        for chore in chores:
            try:
                chore()
            except Exception:
                _logger.exception("the ext_proc stream's bookkeeping failed")

    def _buffer(self, chunk: bytes) -> bool:
        """Add ``chunk`` to the request body; False (nothing added) when the body would pass
        the frontend's ``max_body_bytes``."""
        if self.size + len(chunk) > self.frontend.limits.max_body_bytes:
            return False
        self.size += len(chunk)
        if chunk:
            self.parts.append(chunk)
        return True

    def _record_headers(self, message: ProcessingRequest) -> None:
        headers = self.headers
        for header in message.request_headers.headers.headers:
            value = header.raw_value.decode("latin-1") if header.raw_value else header.value
            name = header.key.lower()
            headers[name] = f"{headers[name]},{value}" if name in headers else value

    async def _request_headers(self, message: ProcessingRequest) -> list[ProcessingResponse]:
        self._record_headers(message)
        if self.frontend.drain.draining:
            self.frontend.drain.refused += 1
            return [self._fail(refused_while_draining(), 0.0)]
        if message.request_headers.end_of_stream:
            return await self._pick(None, end_of_stream=True)
        if not self.request_duplex:
            # Envoy sends the body only once the headers are answered; the pick rides on the
            # body's answer.
            return [ProcessingResponse(request_headers=HeadersResponse())]
        return []

    async def _request_body(self, message: ProcessingRequest) -> list[ProcessingResponse]:
        if self.decision is not None:
            return []  # trailers came first: the pick was made
        body = message.request_body
        if not self._buffer(body.body):
            limit = self.frontend.limits.max_body_bytes
            error = HttpError(
                413, f"the request body is larger than {limit} bytes", code="request_too_large"
            )
            return [self._fail(error, 0.0)]
        if body.end_of_stream:
            return await self._pick(b"".join(self.parts), end_of_stream=True)
        if not self.request_duplex:
            return [ProcessingResponse(request_body=BodyResponse())]
        return []

    async def _request_trailers(self) -> list[ProcessingResponse]:
        answers = []
        if self.decision is None and not self.finished:
            answers = await self._pick(b"".join(self.parts), end_of_stream=False)
            if self.finished:
                return answers
        return [*answers, ProcessingResponse(request_trailers=TrailersResponse())]

    def _served_worker(self) -> int | None:
        """The worker that served the request when it is not the one picked and the booking
        has not moved to it yet (`_move_booking`); else None."""
        decision = self.decision
        if decision is None or self.moved or self.booked_as is None:
            return None
        worker = self._worker_of(self._served())
        return worker if worker is not None and worker != decision.decode_worker_id else None

    def _response_headers(self, message: ProcessingRequest) -> list[ProcessingResponse] | None:
        """The answer to the response headers, or None when the booking must move first."""
        if self._served_worker() is not None:
            return None
        served = self._served()
        status = 0
        for header in message.response_headers.headers.headers:
            if header.key == ":status":
                text = header.raw_value.decode("latin-1") if header.raw_value else header.value
                # ASCII digits only: "\xb2".isdigit() is true, and int() refuses it.
                status = int(text) if text.isascii() and text.isdigit() else 0
                break
        worker = self._worker_of(served)
        chores = self.chores
        if worker is not None and status >= 500:
            chores.append(functools.partial(self.frontend.pipeline.report_failed_stream, worker))
        if not self.response_body_sent:
            # No body phase will come: the first output is on its way now.
            self._queue_prefill_complete()
        if message.response_headers.end_of_stream:
            self._finish_response()
        if SELECTION_TEST_HEADER not in self.headers:
            # The echo is a conformance hook: other clients never see internal addresses.
            return [ProcessingResponse(response_headers=HeadersResponse())]
        answer = ProcessingResponse()
        _set_header(answer.response_headers.response.header_mutation, SERVED_TEST_HEADER, served)
        return [answer]

    def _response_body(self, message: ProcessingRequest) -> list[ProcessingResponse]:
        body = message.response_body
        self._queue_prefill_complete()
        chunk = body.body
        self._usage.feed(chunk)
        if body.end_of_stream:
            self._finish_response()
        if not self.response_duplex:
            return [ProcessingResponse(response_body=BodyResponse())]
        if self.model_restorer is not None:
            chunk = self.model_restorer.restore(chunk, body.end_of_stream)
        return [_streamed("response_body", chunk, body.end_of_stream)]

    def _queue_prefill_complete(self) -> None:
        if not self._prefill_queued:
            self._prefill_queued = True
            self.chores.append(self._prefill_complete)

    def _finish_response(self) -> None:
        """The response ended (its last body chunk or its trailers): count its usage, if the
        body said, and queue the booking's release."""
        self.response_ended = True
        if self.usage is None:
            usage = self._usage.usage()
            if usage is not None:
                self.usage = usage
                self.chores.append(functools.partial(self._count_usage, usage))
        self.chores.append(self._release)

    def _count_usage(self, usage: Usage) -> None:
        """Count ``usage`` in the frontend's metrics and note it after the pick's records
        (trio thread)."""
        self.frontend.metrics.count_gateway_usage(usage)
        decision = self.decision
        if decision is not None:
            self.frontend.pipeline.record_usage(
                decision.request_id, usage, worker_id=self._worker_of(self._served())
            )

    # -- the pick -----------------------------------------------------------------------------

    async def _pick(self, body: bytes | None, *, end_of_stream: bool) -> list[ProcessingResponse]:
        """Parse, tokenize and route; the answers to send (an ImmediateResponse on error)."""
        frontend = self.frontend
        start = trio.current_time()
        request_id = self.picker.booking_id(self.headers.get("x-request-id"))
        try:
            kind = _kind(self.headers.get(":path", ""), body)
            book = False
            tokens: Sequence[int] = _NO_PROMPT
            model: str | None = None
            salt: str | None = None
            rewrite: ModelRewriteDecision | None = None
            if kind is not None and body is not None:
                book = True
                # Reserved before the first wait: a second stream with the same x-request-id
                # meanwhile gets a new id instead of a refusal. A failure releases it.
                self.booked_as = request_id
                self.picker.booked.add(request_id)
                header = model_rewrite(self.headers)
                rewriting = bool(header or frontend.model_rewrites)
                if len(body) > frontend.offload_body_bytes:
                    # As the HTTP app does: a huge prompt's rendering and tokenizing would
                    # stall every other stream; a worker thread does it, the rewrite too (one
                    # trip there and back, not one each).
                    prepared = await trio.to_thread.run_sync(
                        self._prepared,
                        kind,
                        body,
                        header,
                        rewriting,
                        limiter=frontend.offload_limiter,
                    )
                else:
                    prepared = self._prepared(kind, body, header, rewriting)
                body, tokens, model, salt, rewrite, self.model_restorer = prepared
            request = PreprocessedRequest(
                token_ids=tokens,
                request_id=request_id,
                # None (the base model), or the LoRA adapter the body names (the router
                # sends it only to the engines that serve that adapter).
                model=model,
                model_rewrite=rewrite,
                cache_salt=salt,
                routing=gaie_routing_hints(
                    frontend.objectives,
                    self.headers.get(OBJECTIVE_HEADER),
                    self.headers.get(FAIRNESS_HEADER),
                ),
            )
            candidates = self._candidates()
            decision = await frontend.pipeline.query(
                request, book=book, candidates=candidates, admit=book
            )
        except Exception as exc:
            return [self._fail(http_error_for(exc, preprocessing=True), start)]
        if book:
            self.booked_as = request_id
            self.picker.booked.add(request_id)
            self.ticket = frontend.drain.enter()
        self.request = request
        self.decision = decision
        self.picked = self._ranked(decision)
        frontend.metrics.count_request(METRICS_ENDPOINT, 200, trio.current_time() - start)
        return self._answer(body, end_of_stream=end_of_stream)

    def _prepared(
        self, kind: str, body: bytes, header: str | None, rewriting: bool
    ) -> tuple[
        bytes,
        Sequence[int],
        str | None,
        str | None,
        ModelRewriteDecision | None,
        ModelNameRestorer | None,
    ]:
        """What the pick needs from a chat or completions ``body``: the body to send on
        (rewritten when ``rewriting``: `_rewritten`, ``header`` the rewrite header's model),
        the prompt's tokens, model and salt (`_tokens`), the rewrite rule's decision and the
        response's restorer (None: nothing to put back). Synchronous (and thread-safe).

        Raises:
            What `_rewritten` and `_tokens` raise.
        """
        if not rewriting:
            return body, *self._tokens(kind, body), None, None
        body, parsed, rewrite, restorer = self._rewritten(kind, body, header)
        return body, *self._tokens(kind, body, parsed, rewrite), rewrite, restorer

    def _rewritten(
        self, kind: str, body: bytes, header: str | None
    ) -> tuple[bytes, ParsedRequest, ModelRewriteDecision | None, ModelNameRestorer | None]:
        """``body`` decoded and checked (`_parsed`), then rewritten to the model a
        ``[[model_rewrites]]`` rule draws for the model it names (`Frontend.choose_rewrite`),
        else to ``header``'s (the rewrite header's): as llm-d's picker does, a rule for the
        body's model wins over the header. Returns the body, its fields (their ``model`` the
        target), the rule's decision and the response's restorer (None: nothing to put back).
        Synchronous (and thread-safe).

        Raises:
            HttpError: 400 when the body is not a JSON object or a field is bad.
        """
        data = json_object(body)
        # Checked before the draw, as interlock serve does: a body refused without rules (no
        # model, an empty one, a bad field) is refused with them, and never rewritten to a
        # target the generic rule (which matches any name, "" too) or the header names.
        parsed = self._parsed(kind, data)
        rewrite = self.frontend.choose_rewrite(parsed.model)
        target = header if rewrite is None else rewrite.target
        if not target:
            return body, parsed, None, None
        body, incoming = rewrite_model(body, target, data)
        parsed.model = target
        restorer = None if incoming is None else ModelNameRestorer(target, incoming)
        return body, parsed, rewrite, restorer

    def _parsed(self, kind: str, data: dict[str, Any]) -> ParsedRequest:
        """The prompt's fields of a chat or completions body (``data``: decoded), checked:
        each field's type and range, a non-empty ``model``, and the prompt present.
        Synchronous (and thread-safe).

        Raises:
            HttpError: 400 naming the field.
        """
        parsed = ParsedRequest(kind)
        checks = _FIELD_CHECKS[kind]
        max_len = self.frontend.limits.max_model_len
        for name in _PROMPT_FIELDS[kind]:
            value = data.get(name)
            if value is not None:
                checks[name](parsed, value, max_len)
        if not parsed.model:
            raise bad_request("model not found in request body; model is required", "model")
        required = "messages" if kind == "chat" else "prompt"
        if data.get(required) is None:
            raise bad_request(f"{required} is required", required)
        return parsed

    def _tokens(
        self,
        kind: str,
        body: bytes,
        parsed: ParsedRequest | None = None,
        rewrite: ModelRewriteDecision | None = None,
    ) -> tuple[Sequence[int], str | None, str | None]:
        """The prompt's token ids from a chat or completions body (``parsed``: its fields,
        checked already), its `PreprocessedRequest.model` (`Frontend.request_model`: None for
        the base model, else the LoRA adapter it names; ``rewrite``: the rule that set the
        body's model, named in a 404) and its ``cache_salt``; synchronous (and thread-safe).

        Raises:
            HttpError: 400 (not JSON, no model, a bad prompt field) or 404 (another model).
            TokenizerError, ChatTemplateError: the prompt cannot be rendered or encoded.
        """
        frontend = self.frontend
        if parsed is None:
            parsed = self._parsed(kind, json_object(body))
        missing = frontend.model_not_found(parsed.model, "this pool", rewrite)
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
        # Packed: the router only hashes and counts a pick's ids. A tuple of them was 100,000
        # pointers (8 bytes a token: byte ids are CPython's cached small ints) built from the
        # UTF-8 bytes, then turned back into u32 words to be hashed: most of a long pick's cost.
        tokens = frontend.prompt_tokens(parsed, EMPTY, packed=True)
        return tokens, frontend.request_model(parsed.model), parsed.cache_salt

    def _candidates(self) -> frozenset[int]:
        """The workers this request may go to.

        Raises:
            HttpError: 503 when none is left.
        """
        workers = self.frontend.pipeline.workers
        endpoints = self.endpoints = self.picker.endpoints(workers)
        if not endpoints:
            raise _no_candidate("no worker with an HTTP endpoint is registered")
        allowed = frozenset(endpoints)
        prefill = frozenset(w for w, e in workers.items() if e.role == "prefill")
        for source, entries in (
            (f"the subset hint ({SUBSET_NAMESPACE})", self.subset),
            (f"the {SELECTION_TEST_HEADER} header", self._selection_header()),
        ):
            if entries is None:
                continue
            named = match_endpoints(entries, endpoints)
            allowed = (allowed & named) | (allowed & prefill)
            if not (allowed - prefill):
                raise _no_candidate(
                    f"{source} names {entries}, and no routable worker is there (workers' "
                    f"endpoints: {sorted(endpoints.values())})"
                )
        return allowed

    def _selection_header(self) -> list[str] | None:
        text = self.headers.get(SELECTION_TEST_HEADER)
        return None if text is None else [e for e in text.split(",") if e.strip()]

    def _ranked(self, decision: RoutingDecision) -> list[str]:
        """The destination and its fallbacks: the decode (or agg) leg's choice, then that leg's
        other candidates by cost (lowest first; in the policy's order when it has none)."""
        endpoints = self.endpoints
        chosen = decision.decode_worker_id
        ranked = [chosen]
        record = next((s for s in decision.selections if s.leg != "prefill"), None)
        if record is not None:
            others = [c for c in record.candidates if c.worker_id != chosen]
            others.sort(key=lambda c: float("inf") if c.cost is None else c.cost)
            ranked += [c.worker_id for c in others]
        result: list[str] = []
        for worker in ranked:
            endpoint = endpoints.get(worker)
            if endpoint is not None and endpoint not in result:
                result.append(endpoint)
        fallbacks = self.picker.fallbacks
        return result if fallbacks is None else result[: 1 + fallbacks]

    def _answer(self, body: bytes | None, *, end_of_stream: bool) -> list[ProcessingResponse]:
        decision = self.decision
        assert decision is not None
        destination = ",".join(self.picked)
        # Built in place, as `_streamed` is: a constructor copies each submessage it is given,
        # which was half of building the answer (~4 of ~9 us).
        answer = ProcessingResponse()
        buffered = body is not None and not self.request_duplex
        common = (answer.request_body if buffered else answer.request_headers).response
        common.clear_route_cache = True
        mutation = common.header_mutation
        _set_header(mutation, DESTINATION_HEADER, destination)
        if body is not None:
            _set_header(mutation, "content-length", str(len(body)))
        if decision.disaggregated and decision.prefill_worker_id is not None:
            prefiller = self.endpoints.get(decision.prefill_worker_id)
            if prefiller is not None:
                _set_header(mutation, PREFILLER_HEADER, prefiller)
        _set_destination(answer, destination)
        if body is None:
            return [answer]
        if buffered:
            if self.model_restorer is not None:
                # Rewritten (``x-gateway-model-name-rewrite``): the buffered body is replaced
                # whole, matching the Content-Length set above.
                common.body_mutation.body = body
            return [answer]
        answers = [answer]
        chunks = [body[i : i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)]
        if not chunks:
            chunks = [b""]
        last = len(chunks) - 1
        for index, chunk in enumerate(chunks):
            answers.append(_streamed("request_body", chunk, end_of_stream and index == last))
        return answers

    def _fail(self, error: HttpError, start: float) -> ProcessingResponse:
        """The ImmediateResponse of ``error``; this stream is over."""
        self.finished = True
        self._release()
        if error.status >= 500:
            _logger.warning("ext_proc pick answered %d: %s", error.status, error.message)
        headers = HeaderMutation()
        _set_header(headers, "content-type", "application/json")
        for name, value in error.headers:
            _set_header(headers, name.decode(), value.decode())
        self.frontend.metrics.count_request(
            METRICS_ENDPOINT, error.status, trio.current_time() - start if start else 0.0
        )
        return ProcessingResponse(
            immediate_response=ImmediateResponse(
                status=HttpStatus(code=error.status),
                headers=headers,
                body=error.body(),
                details=error.message[:200],
            )
        )

    # -- the served endpoint and the booking ---------------------------------------------------

    def _read_metadata(self, message: ProcessingRequest) -> None:
        if not message.HasField("metadata_context"):
            return
        filters = message.metadata_context.filter_metadata
        if SUBSET_NAMESPACE in filters:
            fields = filters[SUBSET_NAMESPACE].fields
            if SUBSET_KEY in fields:
                self.subset = _strings(fields[SUBSET_KEY])
        if LB_NAMESPACE in filters:
            fields = filters[LB_NAMESPACE].fields
            if SERVED_KEY in fields:
                served = _strings(fields[SERVED_KEY])
                if served:
                    self.served = served[0]

    def _served(self) -> str:
        if self.served is not None:
            return self.served
        return self.picked[0] if self.picked else ""

    def _worker_of(self, endpoint: str) -> int | None:
        if not endpoint:
            return None
        for worker, known in self.endpoints.items():
            if known == endpoint:
                return worker
        return None

    async def _move_booking(self, worker: int) -> None:
        """The gateway sent the request to ``worker``, not to the pick: book it there instead
        (a recorded decision under ``<id>-served``), so the load is where the request is."""
        old = self.booked_as
        request = self.request
        if old is None or request is None or self.moved:
            return
        self.moved = True
        self._release(leave_drain=False)
        new_id = self.picker.booking_id(f"{old}-served")
        moved = PreprocessedRequest(
            token_ids=request.token_ids,
            request_id=new_id,
            model=request.model,
            cache_salt=request.cache_salt,
        )
        try:
            # No admission: the request runs there already.
            await self.frontend.pipeline.query(moved, book=True, candidates=frozenset({worker}))
        except Exception as exc:
            _logger.warning(
                "request %s was served by worker %d, not the one picked; its load could not be "
                "booked there: %s",
                old,
                worker,
                exc,
            )
            return
        self.booked_as = new_id
        self.picker.booked.add(new_id)

    def _prefill_complete(self) -> None:
        """Release the booked request's prefill load (`Pipeline.mark_prefill_complete`), once."""
        if not self.prefill_released and self.booked_as is not None:
            self.prefill_released = True
            self.frontend.pipeline.mark_prefill_complete(self.booked_as)

    def _release(self, *, leave_drain: bool = True) -> None:
        """Free the booking (and leave the drain) once; idempotent."""
        booked = self.booked_as
        if booked is not None:
            self.booked_as = None
            self.picker.booked.discard(booked)
            self.frontend.pipeline.free(booked)
        if leave_drain and self.ticket is not None:
            self.frontend.drain.leave(self.ticket)
            self.ticket = None

    def close(self) -> None:
        """The stream ended, however: free what is still booked."""
        self.finished = True
        self._release()


def _kind(path: str, body: bytes | None) -> str | None:
    """``"chat"`` or ``"completion"`` for an OpenAI generation request's path, else None."""
    if body is None:
        return None
    path = path.partition("?")[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completion"
    return None


def _strings(value: Any) -> list[str]:
    """A metadata value (a list, or a comma-separated string) as strings."""
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [v.string_value for v in value.list_value.values if v.string_value]
    if kind == "string_value":
        return [e for e in value.string_value.split(",") if e.strip()]
    return []


def _streamed(phase: str, chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
    """The ``phase`` body answer carrying ``chunk`` as a ``streamed_response``.

    Built in place: nesting constructors copies each submessage, so the chunk (up to 62,000
    bytes) would be copied once per level."""
    answer = ProcessingResponse()
    streamed = getattr(answer, phase).response.body_mutation.streamed_response
    streamed.body = chunk
    streamed.end_of_stream = end_of_stream
    return answer


def _set_destination(answer: ProcessingResponse, destination: str) -> None:
    """Name ``destination`` in ``answer``'s ``envoy.lb`` dynamic metadata.

    Set field by field: `Struct.update` walks a dict in protobuf's pure-Python
    well-known-types code, twice this cost on every pick."""
    lb = answer.dynamic_metadata.fields[LB_NAMESPACE].struct_value
    lb.fields[DESTINATION_HEADER].string_value = destination


def _set_header(mutation: HeaderMutation, name: str, value: str) -> None:
    """Add to ``mutation`` the header ``name`` set to ``value`` (replacing any the request
    has), in place (see `_answer`)."""
    option = mutation.set_headers.add(append_action=_OVERWRITE)
    option.header.key = name
    option.header.raw_value = value.encode("latin-1")


def _no_candidate(why: str) -> HttpError:
    return HttpError(
        503,
        f"no endpoint can take this request: {why}",
        type="server_error",
        code="no_workers_available",
    )
