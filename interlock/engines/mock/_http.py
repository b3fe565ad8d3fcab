"""`serve_mock_openai`: a `MockEngine` behind vLLM's HTTP surface (vLLM 0.32's shapes), so that
interlock's OpenAI-HTTP engine and its tests run everywhere without vLLM.

Endpoints (docs/mock-vllm.md): ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``,
``POST /tokenize``, ``POST /detokenize``, ``GET /version``, and the mock-only ``GET
/mock/state``. Shapes follow reference/vllm-cpu.md: token-id prompts, ``return_token_ids``
(per-chunk ``token_ids``, ``prompt_token_ids`` on the first chunk), the final usage chunk with
``"choices": []``, ``usage.prompt_tokens_details.cached_tokens`` (as vLLM with
``--enable-prompt-tokens-details``), ``X-Request-Id`` as the request id, NIXL-shaped
``kv_transfer_params``, vLLM's error bodies, and vLLM's faults on the wire (`_faults`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..._errors import RequestError, WorkerGone, WorkerRefused
from ...processing import (
    ByteTokenizer,
    ChatMessageError,
    ChatTemplate,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
)
from ...wire import EngineOutput, PrefillResult, PreprocessedRequest, SamplingOptions
from ._engine import MockEngine, _MockStream
from ._faults import FAULT_HEADER, FaultSchedule, FaultSpecError, MockFault, parse_faults
from ._h11 import HttpRequest, HttpResponder, serve_h11
from ._kv_publisher import VllmKvPublisher, publish_vllm_kv_events

_logger = logging.getLogger("interlock.engines.mock.http")

#: What vLLM 0.32 reports as its version (``/version``, ``system_fingerprint``).
VLLM_VERSION: Final = "0.32.0"
_FINGERPRINT: Final = f"vllm-{VLLM_VERSION}-interlock-mock"
_SSE_HEADERS: Final = (("content-type", "text/event-stream; charset=utf-8"),)
_DONE: Final = b"data: [DONE]\n\n"
#: vLLM's message when its EngineCore died (reference/vllm-cpu.md section 5).
ENGINE_DEAD_MESSAGE: Final = (
    "EngineCore encountered an issue. See stack trace (above) for the root cause."
)
_FINISH_REASONS: Final = ("stop", "length", "abort", "error", "repetition")
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(value: Any) -> bytes:
    return _COMPACT(value).encode()


class ApiError(Exception):
    """An error answered with vLLM's body: ``{"error": {"message", "type", "param", "code"}}``
    where ``code`` is the HTTP status as an integer."""

    def __init__(
        self, status: int, message: str, *, type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def body(self) -> bytes:
        return _dumps(self.to_dict())


def engine_dead_error() -> ApiError:
    """What vLLM answers once its engine core is dead."""
    return ApiError(500, ENGINE_DEAD_MESSAGE, type="InternalServerError")


def _bad(message: str, param: str | None = None) -> ApiError:
    """A 400 for a request vLLM's own checks refuse (``type: "BadRequestError"``)."""
    return ApiError(400, message, param=param)


def _invalid(message: str, field: str | None = None) -> ApiError:
    """A 400 for a body that does not fit vLLM's request schema: FastAPI's validation error,
    ``type: "Bad Request"`` and ``param: "body.<field>"``."""
    return ApiError(
        400, message, type="Bad Request", param=None if field is None else f"body.{field}"
    )


@attrs.define
class MockSurfaceStats:
    """Counters behind ``/metrics`` and ``/mock/state`` (read them in tests)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0
    finished: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(_FINISH_REASONS, 0))
    #: Requests whose client went away before the end (their engine request was aborted).
    aborted: int = 0
    #: Requests with a fault injected (per request or from the command line).
    faulted: int = 0
    #: The last ``kv_transfer_params`` a request carried (a decode leg: what its prefill leg
    #: returned), and the last one a prefill leg answered with.
    last_kv_transfer_params_received: dict[str, Any] | None = None
    last_kv_transfer_params_sent: dict[str, Any] | None = None
    #: Decode legs served as if their prompt's KV arrived, and those whose params were
    #: incomplete (recomputed locally, as vLLM does).
    kv_transfers: int = 0
    kv_transfers_invalid: int = 0


@attrs.define
class _Parsed:
    chat: bool
    prompt_ids: tuple[int, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    #: Checked where the request is made (`PreprocessedRequest`), as vLLM checks it: a 400.
    cache_salt: Any = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    kv_transfer_params: dict[str, Any] | None = None


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 ``host`` in brackets (whether or not it has them). Pure."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class MockOpenAIServer:
    """The vLLM-compatible surface of one `MockEngine` (what `serve_mock_openai` runs and
    reports). ``url`` is set once listening; ``stats`` counts what was served."""

    def __init__(
        self,
        engine: MockEngine,
        *,
        model: str = "mock",
        faults: Iterable[MockFault] = (),
        advertise_host: str | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.tokenizer: Tokenizer = engine.tokenizer or ByteTokenizer()
        self.chat_template: ChatTemplate = self.tokenizer.chat_template or ChatTemplate.chatml()
        self.eos_token_ids = tuple(engine.tokenizer.eos_token_ids) if engine.tokenizer else ()
        #: Faults for every request (or its first ``times``), unless a request names its own.
        self.schedule = FaultSchedule(tuple(faults))
        self.advertise_host = advertise_host
        self.stats = MockSurfaceStats()
        #: NIXL's ``remote_engine_id``: a uuid, stable for a worker id.
        self.engine_uuid = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"interlock-mock/{engine.instance_id}")
        )
        self.host = "127.0.0.1"
        self.port = 0
        self.created = int(time.time())
        self._next_block_id = 1
        #: The KV event publisher, when `serve_mock_openai` was asked for one.
        self.kv_publisher: VllmKvPublisher | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        return http_url(self.host, self.port)

    # -- dispatch --------------------------------------------------------------------------

    async def handle(self, request: HttpRequest, out: HttpResponder) -> None:
        """Answer one HTTP request (the `serve_h11` handler)."""
        path = request.path
        routes = _ROUTES.get(path)
        if routes is None:
            await out.send_whole(404, b'{"detail":"Not Found"}')
            return
        name = routes.get(request.method)
        if name is None:
            await out.send_whole(405, b'{"detail":"Method Not Allowed"}')
            return
        try:
            await getattr(self, name)(request, out)
        except ApiError as exc:
            if out.started or out.closed:
                raise
            await out.send_whole(exc.status, exc.body())

    async def _health(self, request: HttpRequest, out: HttpResponder) -> None:
        await out.send_whole(503 if self.engine.is_down else 200, b"", content_type="")

    async def _version(self, request: HttpRequest, out: HttpResponder) -> None:
        await out.send_whole(200, _dumps({"version": VLLM_VERSION}))

    async def _models(self, request: HttpRequest, out: HttpResponder) -> None:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{self.engine_uuid.replace('-', '')[:16]}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        await out.send_whole(200, _dumps({"object": "list", "data": [card]}))

    async def _metrics(self, request: HttpRequest, out: HttpResponder) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_VllmCollector(self))
        await out.send_whole(
            200, generate_latest(registry), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def _state(self, request: HttpRequest, out: HttpResponder) -> None:
        """Mock-only: what tests inspect (not a vLLM endpoint)."""
        engine = self.engine
        stats = self.stats
        state = {
            "worker_id": engine.instance_id,
            "engine_id": self.engine_uuid,
            "running": engine.running_requests,
            "waiting": engine.waiting_requests,
            "active_requests": engine.active_requests,
            "requests_started": engine.requests_started,
            "requests_finished": engine.requests_finished,
            "requests_cancelled": engine.requests_cancelled,
            "aborted": stats.aborted,
            "faulted": stats.faulted,
            "is_down": engine.is_down,
            "block_size": engine.block_size,
            "num_gpu_blocks": engine.num_gpu_blocks,
            "kv_transfers": stats.kv_transfers,
            "kv_transfers_invalid": stats.kv_transfers_invalid,
            "last_kv_transfer_params_received": stats.last_kv_transfer_params_received,
            "last_kv_transfer_params_sent": stats.last_kv_transfer_params_sent,
        }
        await out.send_whole(200, _dumps(state))

    async def _tokenize(self, request: HttpRequest, out: HttpResponder) -> None:
        body = _json_object(request.body)
        if "messages" in body:
            add_special = _opt_bool(body, "add_special_tokens", False)
            text = self._render_chat(body)
        else:
            prompt = body.get("prompt")
            if type(prompt) is not str:
                raise _bad("prompt must be a string (or send messages)", "prompt")
            add_special = _opt_bool(body, "add_special_tokens", True)
            text = prompt
        tokens = self._encode(text, add_special_tokens=add_special)
        token_strs = None
        if _opt_bool(body, "return_token_strs", False):
            token_strs = [self.tokenizer.id_to_token(t) for t in tokens]
        answer = {
            "count": len(tokens),
            "max_model_len": self.engine.max_model_len,
            "tokens": tokens,
            "token_strs": token_strs,
        }
        await out.send_whole(200, _dumps(answer))

    async def _detokenize(self, request: HttpRequest, out: HttpResponder) -> None:
        body = _json_object(request.body)
        tokens = _token_ids(body.get("tokens"), "tokens", self.tokenizer.vocab_size)
        try:
            text = self.tokenizer.decode(tokens)
        except TokenizerError as exc:
            raise _bad(str(exc), "tokens") from None
        await out.send_whole(200, _dumps({"prompt": text}))

    # -- generation ------------------------------------------------------------------------

    async def _completions(self, request: HttpRequest, out: HttpResponder) -> None:
        await self._generate(request, out, chat=False)

    async def _chat(self, request: HttpRequest, out: HttpResponder) -> None:
        await self._generate(request, out, chat=True)

    async def _generate(self, request: HttpRequest, out: HttpResponder, *, chat: bool) -> None:
        body = _json_object(request.body)
        parsed = self._parse(body, chat=chat)
        faults = self._faults(request)
        base = request.headers.get("x-request-id") or secrets.token_hex(8)
        response_id = ("chatcmpl-" if chat else "cmpl-") + base
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            # vLLM continues the caller's trace from this header; the mock only reports it.
            _logger.debug("request %s traceparent %s", base, traceparent)
        prefill_result = self._received_kv_params(parsed)
        try:
            pre = PreprocessedRequest(
                token_ids=parsed.prompt_ids,
                max_tokens=parsed.max_tokens,
                min_tokens=parsed.min_tokens,
                stop_token_ids=parsed.stop_token_ids,
                # Without a tokenizer the engine's ids are arbitrary: none of them ends a text.
                eos_token_ids=self.eos_token_ids,
                ignore_eos=parsed.ignore_eos,
                sampling=SamplingOptions(
                    temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed
                ),
                request_id=response_id,
                model=self.model,
                # The engine detokenizes (mock_token_text without a tokenizer), so that stop
                # strings apply, as vLLM's do.
                detokenize=True,
                stop=parsed.stop,
                include_stop_str_in_output=parsed.include_stop_str_in_output,
                prefill_result=prefill_result,
                cache_salt=parsed.cache_salt,
            )
        except RequestError as exc:
            raise _bad(str(exc), exc.field if isinstance(exc.field, str) else None) from None
        if faults:
            self.stats.faulted += 1
        if any(f.kind == "http500" for f in faults):
            raise engine_dead_error()
        call = _Call(self, parsed, response_id, faults, out)
        try:
            async with self.engine.open_stream(pre) as stream:
                call.stream = stream  # type: ignore[assignment]
                call.entered = True
                if parsed.stream:
                    await call.run_stream()
                else:
                    await call.run_whole()
        except WorkerRefused:
            if out.started or out.closed:
                raise
            if self.engine.is_down:
                raise engine_dead_error() from None
            raise ApiError(
                503, "the mock engine refuses new requests", type="ServiceUnavailableError"
            ) from None
        except RequestError as exc:
            if out.started or out.closed:
                raise
            raise _bad(str(exc), "prompt") from None
        finally:
            if call.entered and call.finish is None:
                self.stats.aborted += 1
                self.stats.finished["abort"] += 1

    def _faults(self, request: HttpRequest) -> tuple[MockFault, ...]:
        header = request.headers.get(FAULT_HEADER)
        if header is None:
            return self.schedule.next_request()
        try:
            return parse_faults(header)
        except FaultSpecError as exc:
            raise _bad(f"{FAULT_HEADER}: {exc}", FAULT_HEADER) from None

    def _received_kv_params(self, parsed: _Parsed) -> PrefillResult | None:
        params = parsed.kv_transfer_params
        if params is None:
            return None
        self.stats.last_kv_transfer_params_received = params
        if not params.get("do_remote_prefill"):
            return None
        needed = ("remote_block_ids", "remote_engine_id", "remote_host", "remote_port")
        if any(params.get(key) is None for key in needed):
            # vLLM logs "Got invalid KVTransferParams" and computes the prompt itself.
            self.stats.kv_transfers_invalid += 1
            return None
        self.stats.kv_transfers += 1
        prompt = len(parsed.prompt_ids)
        # What arrives: the prompt's full blocks, less the last token (recomputed to sample
        # the first output token), as vLLM's ExampleConnector reports (reference/vllm-cpu.md 4).
        arrived = (prompt - 1) // self.engine.block_size * self.engine.block_size
        return PrefillResult(prefill_worker_id=0, prompt_tokens=prompt, cached_tokens=arrived)

    def prefill_kv_params(self, call: _Call, cached: int) -> dict[str, Any]:
        """The NIXL-shaped ``kv_transfer_params`` a prefill leg answers with."""
        prompt = len(call.parsed.prompt_ids)
        blocks = math.ceil(prompt / self.engine.block_size)
        first = self._next_block_id
        self._next_block_id += blocks
        params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(range(first, first + blocks))],
            "remote_engine_id": self.engine_uuid,
            "remote_request_id": f"{call.response_id}-0-{secrets.token_hex(4)}",
            "remote_host": self.advertise_host or self.host,
            "remote_port": self.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": prompt,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": cached,
        }
        self.stats.last_kv_transfer_params_sent = params
        return params

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self, body: dict[str, Any], *, chat: bool) -> _Parsed:
        p = _Parsed(chat=chat)
        model = body.get("model")
        if model is not None:
            if type(model) is not str:
                raise _invalid(f"model must be a string, got {_kind(model)}", "model")
            if model != self.model:
                raise ApiError(
                    404,
                    f"The model `{model}` does not exist. Valid aliases: {self.model}.",
                    type="NotFoundError",
                    param="model",
                )
        if chat:
            text = self._render_chat(body)
            p.prompt_ids = tuple(self._encode(text, add_special_tokens=False))
        else:
            p.prompt_ids = self._prompt(body)
        if not p.prompt_ids:
            raise _bad("You must pass at least one prompt")
        p.stream = _opt_bool(body, "stream", False)
        p.cache_salt = body.get("cache_salt")
        options = body.get("stream_options")
        if options is not None:
            # vLLM refuses non-empty options without stream (an empty object passes).
            if options and not p.stream:
                raise _bad(
                    "Stream options can only be defined when `stream=True`. "
                    "(parameter=stream_options)",
                    "stream_options",
                )
            if type(options) is not dict:
                raise _invalid("stream_options must be an object", "stream_options")
            p.include_usage = _opt_bool(options, "include_usage", False, "stream_options.")
        p.return_token_ids = _opt_bool(body, "return_token_ids", False)
        n = body.get("n")
        if n not in (None, 1):
            raise _bad("the mock engine serves n=1 only", "n")
        for field in ("logprobs", "prompt_logprobs", "top_logprobs", "echo", "best_of"):
            if body.get(field) not in (None, False):
                raise _bad(f"{field} is not implemented by the mock engine; drop it", field)
        limit = self.engine.max_model_len
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens", None if chat else 16)
        if max_tokens is not None:
            max_tokens = _int(max_tokens, "max_tokens", 1)
            if max_tokens > limit:
                raise _bad(
                    f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
                    f"Please request fewer output tokens. (parameter=max_tokens, "
                    f"value={max_tokens})",
                    "max_tokens",
                )
        p.max_tokens = max_tokens
        prompt_len = len(p.prompt_ids)
        if prompt_len + (max_tokens or 1) > limit:
            asked = prompt_len + (max_tokens or 0)
            raise _bad(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{asked} tokens ({prompt_len} in the messages, {max_tokens or 0} in the "
                "completion). Please reduce the length of the messages or completion.",
                "max_tokens" if max_tokens else "prompt",
            )
        p.min_tokens = _int(body.get("min_tokens", 0), "min_tokens", 0)
        if max_tokens is not None and p.min_tokens > max_tokens:
            raise _bad(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {p.min_tokens}."
            )
        p.ignore_eos = _opt_bool(body, "ignore_eos", False)
        stop = body.get("stop")
        if isinstance(stop, str):
            p.stop = (stop,) if stop else ()
        elif stop is not None:
            if type(stop) is not list or not all(type(s) is str and s for s in stop):
                raise _invalid("stop must be a string or a list of non-empty strings", "stop")
            p.stop = tuple(stop)
        ids = body.get("stop_token_ids")
        if ids is not None:
            p.stop_token_ids = tuple(_token_ids(ids, "stop_token_ids", None, allow_empty=True))
        p.include_stop_str_in_output = _opt_bool(body, "include_stop_str_in_output", False)
        p.temperature = _number(body.get("temperature"), "temperature")
        p.top_p = _number(body.get("top_p"), "top_p")
        seed = body.get("seed")
        if seed is not None:
            p.seed = _int(seed, "seed", 0)
        params = body.get("kv_transfer_params")
        if params is not None and type(params) is not dict:
            raise _invalid("kv_transfer_params must be an object", "kv_transfer_params")
        p.kv_transfer_params = params
        return p

    def _prompt(self, body: dict[str, Any]) -> tuple[int, ...]:
        prompt = body.get("prompt")
        add_special = _opt_bool(body, "add_special_tokens", True)
        if type(prompt) is list and len(prompt) == 1 and type(prompt[0]) in (str, list):
            prompt = prompt[0]  # a batch of one
        if type(prompt) is str:
            return tuple(self._encode(prompt, add_special_tokens=add_special))
        if type(prompt) is list:
            if prompt and type(prompt[0]) in (str, list):
                raise _bad("the mock engine serves one prompt per request, not a batch", "prompt")
            if not prompt:
                raise _bad("You must pass at least one prompt")
            for token in prompt:
                if type(token) is not int:
                    raise _invalid(f"prompt must be a list of integers, got {token!r}", "prompt")
                if not 0 <= token < self.engine.vocab_size:
                    raise _bad(f"Token id {token} is out of vocabulary")
            return tuple(prompt)
        raise _invalid(
            f"prompt must be a string or a list of token ids, got {_kind(prompt)}", "prompt"
        )

    def _render_chat(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if type(messages) is not list:
            raise _invalid(f"messages must be a list, got {_kind(messages)}", "messages")
        if not messages:
            raise _bad(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        kwargs = body.get("chat_template_kwargs") or {}
        if type(kwargs) is not dict:
            raise _invalid("chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            return self.chat_template.render(
                messages,
                add_generation_prompt=_opt_bool(body, "add_generation_prompt", True),
                tools=body.get("tools"),
                **kwargs,
            )
        except ChatMessageError as exc:
            raise _bad(str(exc), getattr(exc, "field", None) or "messages") from None
        except ChatTemplateError as exc:
            raise _bad(str(exc), "messages") from None

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except TokenizerError as exc:
            raise _bad(str(exc), "prompt") from None

    # -- finishing -------------------------------------------------------------------------

    def count_finished(self, call: _Call, reason: str, usage: dict[str, Any]) -> None:
        stats = self.stats
        stats.finished[reason] = stats.finished.get(reason, 0) + 1
        prompt = usage["prompt_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        stats.prompt_tokens += prompt
        stats.generation_tokens += usage["completion_tokens"]
        if call.external:
            stats.external_prefix_cache_queries += prompt
            stats.external_prefix_cache_hits += cached
        else:
            stats.prefix_cache_queries += prompt
            stats.prefix_cache_hits += cached


_ROUTES: Final[dict[str, dict[str, str]]] = {
    "/v1/completions": {"POST": "_completions"},
    "/v1/chat/completions": {"POST": "_chat"},
    "/v1/models": {"GET": "_models"},
    "/health": {"GET": "_health"},
    "/metrics": {"GET": "_metrics"},
    "/tokenize": {"POST": "_tokenize"},
    "/detokenize": {"POST": "_detokenize"},
    "/version": {"GET": "_version"},
    "/mock/state": {"GET": "_state"},
}


class _Call:
    """One generation request being answered."""

    def __init__(
        self,
        server: MockOpenAIServer,
        parsed: _Parsed,
        response_id: str,
        faults: tuple[MockFault, ...],
        out: HttpResponder,
    ) -> None:
        self.server = server
        self.parsed = parsed
        self.response_id = response_id
        self.out = out
        self.stream: _MockStream
        self.created = int(time.time())
        self.finish: str | None = None
        self.entered = False
        self.external = parsed.kv_transfer_params is not None and bool(
            parsed.kv_transfer_params.get("do_remote_prefill")
        )
        self.terminal: MockFault | None = next((f for f in faults if f.ends_stream), None)
        self.stall: MockFault | None = next((f for f in faults if f.kind == "stall"), None)
        self.freeze: MockFault | None = next((f for f in faults if f.kind == "freeze"), None)
        slow = next((f for f in faults if f.kind == "slow"), None)
        self.slow = (slow.seconds or 0.0) if slow is not None else 0.0
        self.burst: MockFault | None = next((f for f in faults if f.kind == "burst"), None)

    # -- pacing and faults -----------------------------------------------------------------

    async def _next(self, sent: int) -> list[EngineOutput]:
        """The outputs of the next chunk (``sent`` chunks went out already). Applies stall,
        slow and burst. Raises WorkerGone when the engine broke the stream."""
        coalesce = False
        freeze = self.freeze
        if freeze is not None and sent == freeze.after:
            self.freeze = None
            # The whole engine stops producing (trio time), as a SIGSTOPped EngineCore does.
            self.server.engine.stall(math.inf if freeze.seconds is None else freeze.seconds)
        stall = self.stall
        if stall is not None and sent == stall.after:
            self.stall = None
            if stall.seconds is None:
                await trio.sleep_forever()
            await trio.sleep(stall.seconds)
            coalesce = True
        try:
            first = await self.stream.__anext__()
        except StopAsyncIteration:
            raise WorkerGone("the stream ended without a final output") from None
        outputs = [first]
        if coalesce:
            outputs.extend(self.stream.ready())
        want = self.burst.tokens if self.burst is not None and sent >= self.burst.after else 1
        while outputs[-1].finish_reason is None and sum(len(o.token_ids) for o in outputs) < want:
            try:
                outputs.append(await self.stream.__anext__())
            except StopAsyncIteration:
                raise WorkerGone("the stream ended without a final output") from None
        if self.slow:
            await trio.sleep(self.slow)
        return outputs

    def _count_error(self) -> None:
        self.finish = "error"
        self.server.stats.finished["error"] += 1

    def _terminal_due(self, sent: int) -> MockFault | None:
        terminal = self.terminal
        if terminal is not None and sent >= terminal.after:
            return terminal
        return None

    # -- answers ---------------------------------------------------------------------------

    def _usage(self, final: EngineOutput, *, stream: bool) -> dict[str, Any]:
        usage = final.usage
        prompt = usage.prompt_tokens if usage is not None else len(self.parsed.prompt_ids)
        completion = usage.completion_tokens if usage is not None else 0
        cached = usage.cached_tokens if usage is not None else 0
        # vLLM 0.32's details differ by endpoint and by stream (measured in the engine tier).
        chat = self.parsed.chat
        details: dict[str, Any] = {"cached_tokens": cached}
        if chat:
            details["created_cache_tokens"] = 0
        if not stream:
            if not chat:
                details["created_cache_tokens"] = None
            details["multimodal_tokens"] = None
        usage_body: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
        }
        if not stream:
            usage_body["completion_tokens_details"] = None
        return usage_body

    async def run_whole(self) -> None:
        """Collect the whole answer, then send one JSON body."""
        outputs: list[EngineOutput] = []
        received = 0
        while True:
            terminal = self._terminal_due(received)
            if terminal is not None:
                await self._die(terminal, streaming=False)
                return
            try:
                batch = await self._next(received)
            except WorkerGone:
                self._count_error()
                raise engine_dead_error() from None
            outputs.extend(batch)
            received += 1
            if batch[-1].finish_reason is not None:
                break
        final = outputs[-1]
        reason = final.finish_reason or "stop"
        usage = self._usage(final, stream=False)
        token_ids = [t for o in outputs for t in o.token_ids]
        text = "".join(o.text or "" for o in outputs)  # the mock detokenizes every output
        parsed = self.parsed
        prompt_ids = list(parsed.prompt_ids) if parsed.return_token_ids else None
        kv_params = None
        request_params = parsed.kv_transfer_params
        # vLLM's NIXL connector answers only a prefill leg that hit its max_tokens.
        if (
            request_params is not None
            and request_params.get("do_remote_decode")
            and reason == "length"
        ):
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            kv_params = self.server.prefill_kv_params(self, cached)
        if parsed.chat:
            body: dict[str, Any] = {
                "id": self.response_id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.server.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "reasoning": None,
                        },
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                        "token_ids": token_ids if parsed.return_token_ids else None,
                        "routed_experts": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": _FINGERPRINT,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt_ids,
                "prompt_text": None,
                "kv_transfer_params": kv_params,
                "ec_transfer_params": None,
                "metrics": None,
            }
        else:
            body = {
                "id": self.response_id,
                "object": "text_completion",
                "created": self.created,
                "model": self.server.model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                        "token_ids": token_ids if parsed.return_token_ids else None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": prompt_ids,
                        "routed_experts": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": _FINGERPRINT,
                "usage": usage,
                "kv_transfer_params": kv_params,
                "ec_transfer_params": None,
                "metrics": None,
            }
        self.finish = reason
        self.server.count_finished(self, reason, usage)
        await self.out.send_whole(200, _dumps(body))

    async def run_stream(self) -> None:
        """Send server-sent events as tokens arrive."""
        # Wait for the first output before the head: a stream that breaks before producing
        # anything (the engine died) is an HTTP 500, as vLLM answers then.
        terminal = self._terminal_due(0)
        first: list[EngineOutput] | None = None
        if terminal is None:
            try:
                first = await self._next(0)
            except WorkerGone:
                self._count_error()
                raise engine_dead_error() from None
        out = self.out
        await out.start(200, _SSE_HEADERS)
        parsed = self.parsed
        encoder = _ChunkEncoder(self)
        if parsed.chat:
            await out.send_chunk(encoder.role_chunk())
        sent = 0
        while True:
            terminal = self._terminal_due(sent)
            if terminal is not None:
                await self._die(terminal, streaming=True)
                return
            if first is not None:
                outputs, first = first, None
            else:
                try:
                    outputs = await self._next(sent)
                except WorkerGone:
                    # The engine core died: vLLM's in-band error, then [DONE].
                    self._count_error()
                    await out.send_chunk(_in_band(engine_dead_error()) + _DONE)
                    await out.end()
                    return
            final = outputs[-1]
            reason = final.finish_reason
            ids = [t for o in outputs for t in o.token_ids]
            text = "".join(o.text or "" for o in outputs)
            sent += 1
            if reason is None:
                await out.send_chunk(encoder.chunk(ids, text, reason))
                continue
            usage = self._usage(final, stream=True)
            self.finish = reason
            self.server.count_finished(self, reason, usage)
            if parsed.include_usage:
                chunk = encoder.chunk(ids, text, reason) + encoder.usage_chunk(usage)
            else:
                # vLLM puts its system_fingerprint on a stream's last chunk.
                chunk = encoder.chunk(ids, text, reason, last=True)
            await out.send_chunk(chunk + _DONE)
            await out.end()
            return

    async def _die(self, fault: MockFault, *, streaming: bool) -> None:
        """End the response the way ``fault`` says (see `_faults`)."""
        self._count_error()
        kind = fault.kind
        if kind == "reset":
            await self.out.reset()
        elif kind == "eof":
            await self.out.close()
        elif streaming:  # "error" (or "http500" after the head: the same in-band error)
            await self.out.send_chunk(_in_band(engine_dead_error()) + _DONE)
            await self.out.end()
        else:
            await self.out.send_whole(500, engine_dead_error().body())


def _in_band(error: ApiError) -> bytes:
    # vLLM writes this one with json.dumps' default separators.
    return b"data: " + json.dumps(error.to_dict()).encode() + b"\n\n"


class _ChunkEncoder:
    """vLLM's stream chunks for one request."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.chat = call.parsed.chat
        self.return_ids = call.parsed.return_token_ids
        self.first = True
        self.head = {
            "id": call.response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": call.created,
            "model": call.server.model,
        }

    def role_chunk(self) -> bytes:
        """A chat stream's first chunk: the role, empty content, and the prompt's ids (null
        without ``return_token_ids``)."""
        body = dict(self.head)
        body["choices"] = [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        body["prompt_token_ids"] = list(self.call.parsed.prompt_ids) if self.return_ids else None
        body["prompt_text"] = None
        return b"data: " + _dumps(body) + b"\n\n"

    def chunk(self, ids: list[int], text: str, finish: str | None, *, last: bool = False) -> bytes:
        """A chunk with new tokens; ``last`` adds the ``system_fingerprint`` vLLM puts on a
        stream's last chunk when no usage chunk follows."""
        body = dict(self.head)
        token_ids = ids if self.return_ids else None
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            # vLLM's chat chunks carry stop_reason only once finished.
            if finish is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = token_ids
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "prompt_token_ids": (
                    list(self.call.parsed.prompt_ids) if self.return_ids and self.first else None
                ),
                "token_ids": token_ids,
            }
        self.first = False
        body["choices"] = [choice]
        if last:
            body["system_fingerprint"] = _FINGERPRINT
        return b"data: " + _dumps(body) + b"\n\n"

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        """The last chunk with ``include_usage``: no choices, the usage."""
        body = dict(self.head)
        body["choices"] = []
        body["usage"] = usage
        body["system_fingerprint"] = _FINGERPRINT
        return b"data: " + _dumps(body) + b"\n\n"


# -- /metrics ----------------------------------------------------------------------------------


class _VllmCollector:
    """vLLM 0.32's metric names and label shapes (reference/vllm-cpu.md section 3), from the
    engine's state and the surface's counters."""

    def __init__(self, server: MockOpenAIServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        server = self.server
        engine = server.engine
        stats = server.stats
        names = ["engine", "model_name"]
        base = ["0", server.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(base, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(base, value)
            return family

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.running_requests,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            engine.waiting_requests,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of requests waiting, by reason.",
            labels=[*names, "reason"],
        )
        waiting.add_metric([*base, "capacity"], engine.waiting_requests)
        waiting.add_metric([*base, "deferred"], 0)
        yield waiting
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state", "Engine sleep state", labels=[*names, "sleep_state"]
        )
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.add_metric([*base, state], value)
        yield sleep
        cache = engine.kv_cache
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            cache.active_blocks / cache.num_blocks,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )
        yield counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in "
            "terms of number of queried tokens.",
            stats.external_prefix_cache_queries,
        )
        yield counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
            stats.external_prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            engine.preemptions,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens
        )
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            labels=[*names, "source"],
        )
        local_hits = stats.prefix_cache_hits
        external_hits = stats.external_prefix_cache_hits
        computed = stats.prompt_tokens - local_hits - external_hits
        by_source.add_metric([*base, "local_compute"], computed)
        by_source.add_metric([*base, "local_cache_hit"], local_hits)
        by_source.add_metric([*base, "external_kv_transfer"], external_hits)
        yield by_source
        yield counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            local_hits + external_hits,
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            stats.generation_tokens,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )
        for reason in _FINISH_REASONS:
            success.add_metric([*base, reason], stats.finished.get(reason, 0))
        yield success
        labels = {
            "block_size": str(engine.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": "0",
            "gpu_memory_utilization": "0.92",
            "kv_cache_size_tokens": str(engine.num_gpu_blocks * engine.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(engine.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "xxh3_64",
            "sliding_window": "None",
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=list(labels),
        )
        info.add_metric(list(labels.values()), 1.0)
        yield info


# -- body helpers ------------------------------------------------------------------------------


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"the request body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise _invalid(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _opt_bool(body: Mapping[str, Any], name: str, default: bool, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise _invalid(f"{prefix}{name} must be a boolean, got {_kind(value)}", prefix + name)
    return value


def _int(value: Any, name: str, minimum: int) -> int:
    if type(value) is not int:
        raise _invalid(f"{name} must be an integer, got {_kind(value)} {value!r}", name)
    if value < minimum:
        raise _bad(f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _invalid(f"{name} must be a number, got {_kind(value)} {value!r}", name)
    if not math.isfinite(value) or value < 0:
        raise _bad(f"{name} must be a number >= 0, got {value!r}", name)
    return float(value)


def _token_ids(
    value: Any, name: str, vocab_size: int | None, *, allow_empty: bool = False
) -> list[int]:
    if type(value) is not list or (not value and not allow_empty):
        raise _bad(f"{name} must be a non-empty list of token ids", name)
    for index, token in enumerate(value):
        if type(token) is not int or token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f" below {vocab_size}" if vocab_size is not None else ""
            raise _bad(
                f"{name}[{index}] must be a token id (an integer >= 0{limit}), got {token!r}",
                name,
            )
    return value


# -- serving -----------------------------------------------------------------------------------


async def serve_mock_openai(
    engine: MockEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model: str = "mock",
    faults: Iterable[MockFault] = (),
    advertise_host: str | None = None,
    run_engine: bool = True,
    kv_events_endpoint: str | None = None,
    kv_events_topic: str | None = None,
    kv_events_replay: str | None = None,
    task_status: trio.TaskStatus[MockOpenAIServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``engine`` behind vLLM's HTTP surface on ``host:port`` until cancelled.

    Use with ``server = await nursery.start(serve_mock_openai, engine)``: it returns once
    listening, with the `MockOpenAIServer` (``server.url`` is ``http://host:port``; ``port=0``
    lets the OS choose). With ``run_engine`` (the default) it also runs ``engine.run``; pass
    False when something else runs it (``interlock worker`` serving both protocols).
    ``faults`` apply to every request that does not name its own in the
    ``x-interlock-mock-fault`` header (see `interlock.engines.mock.parse_faults`).

    With ``kv_events_endpoint`` the engine's KV events go out as vLLM's do
    (`publish_vllm_kv_events`: PUB connecting there, topic ``kv_events_topic`` or
    ``kv@<worker id>``, replay ROUTER bound at ``kv_events_replay`` if given); the publisher is
    ``server.kv_publisher``. The engine must then keep block tokens
    (``MockEngine(..., keep_block_tokens=True)``).

    Raises:
        OSError: the address cannot be bound.
        ConfigError: KV events asked of an engine that keeps no block tokens.
        zmq.ZMQError: a KV event endpoint is malformed or cannot be bound.
    """
    server = MockOpenAIServer(engine, model=model, faults=faults, advertise_host=advertise_host)
    # Before the nursery, so that a port in use is an OSError, not an exception group.
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        if kv_events_endpoint is not None:
            server.kv_publisher = await nursery.start(
                functools.partial(
                    publish_vllm_kv_events,
                    engine,
                    kv_events_endpoint,
                    topic=kv_events_topic,
                    replay_endpoint=kv_events_replay,
                )
            )
        if run_engine:
            await nursery.start(engine.run)
        server.host, server.port = await nursery.start(
            functools.partial(serve_h11, server.handle, listeners=listeners)
        )
        _logger.info("worker %d: vLLM-compatible HTTP on %s", engine.instance_id, server.url)
        task_status.started(server)
