"""`Frontend`: what the HTTP endpoints share (the pipeline, the preprocessor, metrics and
limits) and how they turn a parsed request into a `PreprocessedRequest`. Both the OpenAI app
(`interlock.http._app`) and the route-only API (`interlock.http._route`) use it; it imports
neither."""

from __future__ import annotations

import itertools
import random
import secrets
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs
import trio

from .._model_rewrites import ModelRewrites
from .._pipeline import Pipeline
from .._weak import WeakCallback
from ..actors import served_adapters
from ..engines import Engine
from ..kv._hashing import trust_u32
from ..processing import ByteTokenizer
from ..wire import ModelRewriteDecision, PreprocessedRequest, SamplingOptions
from ._drain import Drain
from ._errors import SERVER_ERROR, HttpError, bad_request
from ._metrics import HttpMetrics
from ._nvext import NvExt
from ._openai import ParsedRequest
from ._preprocess import ChatOptions, Preprocessor


@attrs.frozen(kw_only=True)
class HttpLimits:
    """Bounds on what a client may ask for.

    ``max_body_bytes``: larger bodies get 413 (8 MiB holds a 128k-token ``token_data``).
    ``max_model_len``: the context length; a prompt plus ``max_tokens`` beyond it gets 400, and
    a request without ``max_tokens`` may generate up to it.
    ``request_read_timeout``: seconds a request's body may take to arrive after its headers;
    beyond it a 408 (nginx's ``client_body_timeout`` default).
    ``max_stream_buffer_bytes``: how far (in unsent text and events) a stream's client may fall
    behind; beyond it the request is cancelled, freeing its worker (docs/operations.md).
    ``offload_body_bytes``: larger bodies are parsed, rendered and tokenized in a worker
    thread, so one huge request does not stall the event loop for every other client. None
    (the default): by the tokenizer, about where the work takes a few milliseconds: 64 KiB
    with a Hugging Face tokenizer, 256 KiB with the built-in byte tokenizer (a 100k-token
    prompt, ~0.7 ms of work, costs less inline than the thread's two hand-offs).
    ``max_messages``: a chat with more messages gets 400.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_model_len: int = 32_768
    request_read_timeout: float = 60.0
    max_stream_buffer_bytes: int = 256 * 1024
    offload_body_bytes: int | None = None
    max_messages: int = 8192


#: `HttpLimits.offload_body_bytes` when None: 64 KiB, and 256 KiB with the built-in byte
#: tokenizer, whose preprocessing costs ~7 ns a byte (256 KiB: ~2 ms; a thread would hold the
#: GIL for all of it anyway, so below that the event loop gains less than the hand-offs cost).
_OFFLOAD_BODY_BYTES: Final = 64 * 1024
_BYTE_TOKENIZER_OFFLOAD_BODY_BYTES: Final = 256 * 1024


class Frontend:
    """What the endpoints share: the pipeline, the preprocessor, metrics and limits."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        model: str,
        preprocessor: Preprocessor,
        metrics: HttpMetrics,
        limits: HttpLimits,
        objectives: Mapping[str, int] | None = None,
        model_rewrites: ModelRewrites | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model = model
        self.preprocessor = preprocessor
        self.tokenizer = preprocessor.tokenizer
        self.vocab_size = preprocessor.tokenizer.vocab_size
        self.eos_token_ids = tuple(preprocessor.tokenizer.eos_token_ids)
        self.metrics = metrics
        self.limits = limits
        #: Each InferenceObjective's priority, by name (``--objective``): what a request's
        #: ``x-gateway-inference-objective`` header sets its admission priority to.
        self.objectives: Mapping[str, int] = dict(objectives or {})
        #: The ``[[model_rewrites]]`` rules (GAIE's InferenceModelRewrite): `choose_rewrite`.
        self.model_rewrites = model_rewrites or ModelRewrites()
        #: The rules' weighted draws, seeded by ``router_seed`` (the router's own random
        #: choices use another generator of that seed), so a run is repeatable.
        self._rewrite_rng = random.Random(pipeline.config.router_seed)
        #: Whether the server drains, and the requests in flight it waits for.
        self.drain = Drain(metrics)
        #: Bodies larger than this are preprocessed in a thread (`HttpLimits`).
        offload = limits.offload_body_bytes
        if offload is None:
            byte_tokenizer = type(preprocessor.tokenizer) is ByteTokenizer
            offload = _BYTE_TOKENIZER_OFFLOAD_BODY_BYTES if byte_tokenizer else _OFFLOAD_BODY_BYTES
        self.offload_body_bytes = offload
        #: Threads that preprocess large bodies (`HttpLimits.offload_body_bytes`).
        self.offload_limiter = trio.CapacityLimiter(2)
        self.created = int(time.time())
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(6)
        config = pipeline.config
        self.routing = config.routing
        self.allow_worker_ids = config.allow_request_worker_ids
        self.executes = pipeline.mode.executes
        self.frontend_post = config.postprocessing == "frontend"
        #: The routable workers' ids at the last membership change (`_saw`).
        self._routable: frozenset[int] = frozenset()
        #: The LoRA adapters of each engine away now (registered but not routable: unhealthy,
        #: reconnecting), as it listed them when it left (`model_not_found`). Names, not
        #: engines: an engine removed for good is forgotten, its memory released.
        self._away: Mapping[int, frozenset[str]] = {}
        self._saw(pipeline.workers)
        # The frontend follows the membership for its whole life, and only it starts or stops
        # that: the pipeline holds it weakly (a pipeline may outlive its apps: it must neither
        # keep a frontend alive nor call one gone), and the frontend's end stops the calls.
        weakref.finalize(self, pipeline.watch_workers(WeakCallback(self._saw)))

    def _saw(self, workers: Mapping[int, Engine]) -> None:
        # `Pipeline.engine` tells away (still registered) from removed for good (None:
        # `remove_worker`, discovery deleting it). A new dict, not an update in place: the
        # picker reads it from worker threads too (`model_not_found` for a large body), which
        # must never see it change mid-iteration.
        away: dict[int, frozenset[str]] = {}
        for worker_id in (self._routable | self._away.keys()) - workers.keys():
            engine = self.pipeline.engine(worker_id)
            if engine is not None:
                last = self._away.get(worker_id)
                away[worker_id] = served_adapters(engine) if last is None else last
        self._away = away
        self._routable = frozenset(workers)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id_prefix}{next(self._ids):x}"

    def choose_rewrite(self, name: object) -> ModelRewriteDecision | None:
        """Where the ``[[model_rewrites]]`` rules send a request naming the model ``name``:
        the rule matching it exactly, else the generic one, its target drawn by weight (one
        draw, here, once per request); None when no rule matches (or ``name`` is no string:
        the request's checks answer that). The target is then checked like a name the client
        sent (`model_not_found` with the decision) and becomes `PreprocessedRequest.model`
        (`request_model`), with the decision beside it (``model_rewrite``), so the pick, the
        KV salting of an adapter's blocks and the records all see the target, and the answer
        the client's name (`answer_model`)."""
        if not self.model_rewrites or type(name) is not str:
            return None
        return self.model_rewrites.choose(name, self._rewrite_rng)

    def model_not_found(
        self,
        name: object,
        served_by: str = "this server",
        rewrite: ModelRewriteDecision | None = None,
    ) -> HttpError | None:
        """None when a request naming the model ``name`` is served here, else the 404
        (``model_not_found``) to answer it with. The one rule for every endpoint (chat and
        completions, ``/v1/models/{name}``, ``/v1/route``, the gateway's picker): the model
        is ``--model-name``, or a LoRA adapter an engine serves (its ``/v1/models``; the
        router sends such a request only to the engines that serve it), no other name or
        alias. An adapter that only engines away now serve (unhealthy, reconnecting: still
        registered) passes too: the router's 503 (no engine serves it now) says to retry,
        where a 404 would say it does not exist. An engine removed for good (deleted from
        discovery, `Pipeline.remove_worker`) no longer counts. ``served_by`` names the server in
        the message ("this router", "this pool"). ``rewrite``: the rule that chose ``name``
        (`choose_rewrite`), which the message names: a target checked per request, not at
        start, since the adapters it may name come and go with their engines."""
        if name == self.model:
            return None  # (every base-model request: no adapter list built)
        served, adapters = self._served(name)
        if served is not None:
            return None
        also = f" (and the LoRA adapters {sorted(adapters)})" if adapters else ""
        if rewrite is not None:
            return HttpError(
                404,
                f"the model_rewrites rule {rewrite.rule!r} sent this request for "
                f"{rewrite.model!r} to {name!r}, which does not exist; {served_by} serves "
                f"{self.model!r}{also}: serve {name!r}, or change the rule's targets",
                param="model",
                code="model_not_found",
            )
        return HttpError(
            404,
            f"the model {name!r} does not exist; {served_by} serves {self.model!r}{also}",
            param="model",
            code="model_not_found",
        )

    def model_unavailable(self, name: str) -> HttpError | None:
        """None when ``/v1/models/{name}`` answers with ``name``'s card, else what a request
        naming it gets now: `model_not_found`'s 404, or for an adapter only engines away serve
        the router's 503 (retry), where a card would say a request may use it now."""
        if name == self.model:
            return None
        served, _ = self._served(name)
        if served == "away":
            return HttpError(
                503,
                f"the LoRA adapter {name!r} is served only by engines away now (unhealthy or "
                "reconnecting); retry later",
                type=SERVER_ERROR,
                code="no_workers_available",
            )
        return None if served is not None else self.model_not_found(name)

    def _served(self, name: object) -> tuple[Literal["now", "away"] | None, frozenset[str]]:
        """Whether a request naming ``name``, not the base model, is served now (an adapter a
        routable engine serves), only by engines away, or not at all (None); with the
        adapters served now, built once for the check and `model_not_found`'s message."""
        adapters = self.adapters()
        if type(name) is not str:  # an unhashable name is no adapter either
            return None, adapters
        if name in adapters:
            return "now", adapters
        if any(name in names for names in self._away.values()):
            return "away", adapters
        return None, adapters

    def adapters(self) -> frozenset[str]:
        """The LoRA adapters the registered engines serve now (`served_adapters`)."""
        return _adapters_of(self.pipeline.workers.values())

    def request_model(self, name: str) -> str | None:
        """`PreprocessedRequest.model` for a request naming the model ``name`` (which
        `model_not_found` accepted): None for ``--model-name`` (the base model), else the
        LoRA adapter ``name``. Decided here, once, so the request stays an adapter's
        whatever engines come and go."""
        return None if name == self.model else name

    def answer_model(self, request: PreprocessedRequest) -> str:
        """The model an answer, a stream's chunks and the request's SERVER span
        (``gen_ai.request.model``) name for ``request``: the name its client sent
        (`request_model`'s inverse, or the name a ``[[model_rewrites]]`` rule matched: the
        client asked for that model, whichever target served it). Its engine legs are named
        after the target (``request.model``, else ``--model-name``): what the engine is asked
        for."""
        rewrite = request.model_rewrite
        if rewrite is not None:
            return rewrite.model
        return request.model or self.model

    # -- preprocessing ----------------------------------------------------------------------

    def check_worker_ids(self, nvext: NvExt) -> None:
        """Refuse client-chosen workers where the configuration does not allow them."""
        named = nvext.named_worker()
        routing = self.routing
        if named is not None:
            source = named[1]
            if routing == "discover" and not self.allow_worker_ids:
                raise HttpError(
                    400,
                    f"{source} names a worker, but this server selects workers itself "
                    "(routing='discover') and does not let a client pin load onto one; drop "
                    "it, or start the server with --allow-request-worker-ids",
                    param=source,
                    code="worker_ids_not_allowed",
                )
            if routing == "query_only":
                raise HttpError(
                    400,
                    f"{source} names a worker, but this server only answers queries "
                    "(routing='query_only'): it selects the workers for the caller; drop it",
                    param=source,
                    code="worker_ids_not_allowed",
                )
        elif routing == "direct_to_known":
            raise HttpError(
                400,
                "this server routes direct_to_known: every request names its worker; send the "
                "header x-worker-instance-id (or nvext.backend_instance_id)",
                param="x-worker-instance-id",
                code="worker_id_required",
            )

    def prompt_tokens(
        self, parsed: ParsedRequest, nvext: NvExt, *, packed: bool = False
    ) -> Sequence[int]:
        """The prompt's token ids: a tuple (`U32TokenIds` when the tokenizer made them), or
        with ``packed`` and a preprocessor that `packs_ids`, `PackedTokenIds` (no int object
        per id: for a query, whose ids are only hashed and counted, never sent to a worker).

        Raises:
            HttpError: 400 for an empty prompt or an id outside the vocabulary.
            ChatMessageError, ChatTemplateError, TokenizerError: from the preprocessor.
        """
        if nvext.token_data is not None:
            return self.checked_ids(nvext.token_data, "nvext.token_data")
        preprocessor = self.preprocessor
        packed = packed and preprocessor.packs_ids
        encode_text = preprocessor.encode_text_packed if packed else preprocessor.encode_text
        ids: Sequence[int]
        if parsed.kind == "chat":
            assert parsed.messages is not None
            if nvext.use_raw_prompt:
                ids = encode_text(_raw_chat_text(parsed.messages))
            else:
                options = ChatOptions(
                    tools=parsed.tools,
                    add_generation_prompt=parsed.add_generation_prompt,
                    template_kwargs=parsed.chat_template_kwargs,
                )
                if packed:
                    ids = encode_text(preprocessor.render_chat(parsed.messages, **options))
                else:
                    ids = preprocessor.encode_chat(parsed.messages, **options)
        elif parsed.prompt_ids is not None:
            return self.checked_ids(parsed.prompt_ids, "prompt")
        else:
            assert parsed.prompt_text is not None
            ids = encode_text(parsed.prompt_text)
        if not ids:
            raise bad_request(
                "the prompt is empty after tokenization; send some text",
                "messages" if parsed.kind == "chat" else "prompt",
            )
        if packed:
            return ids  # `PackedTokenIds`: vouched for as they are
        # Checking a 100k-token prompt's ids costs a conversion to u32 words (~1 ms), and the
        # router hashes only the blocks its index matches: spare it both when the tokenizer
        # made them.
        return trust_u32(ids) if preprocessor.makes_u32_ids else tuple(ids)

    def checked_ids(self, ids: tuple[int, ...], where: str) -> tuple[int, ...]:
        if max(ids) >= self.vocab_size:
            bad = next(i for i, t in enumerate(ids) if t >= self.vocab_size)
            raise bad_request(
                f"{where}[{bad}]={ids[bad]} is outside the tokenizer's vocabulary "
                f"(0..{self.vocab_size - 1})",
                f"{where}[{bad}]",
            )
        return ids

    def preprocess(
        self,
        parsed: ParsedRequest,
        nvext: NvExt,
        request_id: str,
        rewrite: ModelRewriteDecision | None = None,
    ) -> PreprocessedRequest:
        """The request to route and run for ``parsed`` (``rewrite``: the rule's choice of its
        model, `choose_rewrite`, already checked by `model_not_found`).

        Raises:
            HttpError: 400 for a prompt too long for the context (or as `prompt_tokens`).
        """
        tokens = self.prompt_tokens(parsed, nvext)
        max_len = self.limits.max_model_len
        max_tokens = parsed.max_tokens
        room = max_len - len(tokens)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            wanted = f" + {max_tokens} requested" if max_tokens is not None else ""
            raise HttpError(
                400,
                f"this model's context length is {max_len} tokens; the prompt has "
                f"{len(tokens)}{wanted}; shorten the prompt or lower max_tokens",
                param="messages" if parsed.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room
        temperature = 0.0 if nvext.greed_sampling else parsed.temperature
        sampling = (
            SamplingOptions(temperature=temperature, top_p=parsed.top_p, seed=parsed.seed)
            if temperature is not None or parsed.top_p is not None or parsed.seed is not None
            else _NO_SAMPLING
        )
        return PreprocessedRequest(
            token_ids=tokens,
            max_tokens=max_tokens,
            min_tokens=parsed.min_tokens,
            stop_token_ids=parsed.stop_token_ids,
            eos_token_ids=self.eos_token_ids,
            ignore_eos=parsed.ignore_eos,
            sampling=sampling,
            routing=nvext.routing_hints(),
            request_id=request_id,
            model=self.request_model(parsed.model if rewrite is None else rewrite.target),
            model_rewrite=rewrite,
            annotations=nvext.annotations,
            # A whole answer without stop strings needs no text until the end: it is decoded
            # once (`Preprocessor.decode_completion`) instead of token by token. Streams,
            # stop strings and engine-side text need the pipeline's incremental text.
            detokenize=parsed.stream or bool(parsed.stop) or not self.frontend_post,
            stop=parsed.stop,
            include_stop_str_in_output=parsed.include_stop_str_in_output,
            cache_salt=parsed.cache_salt,
        )


_NO_SAMPLING: Final = SamplingOptions()


def _adapters_of(engines: Iterable[Engine]) -> frozenset[str]:
    found: frozenset[str] = frozenset()
    for engine in engines:
        found |= served_adapters(engine)
    return found


def _raw_chat_text(messages: list[Any]) -> str:
    """``nvext.use_raw_prompt`` on a chat request: the messages' text, without a template."""
    parts = []
    for index, message in enumerate(messages):
        content = message.get("content") if type(message) is dict else None
        if type(content) is not str:
            raise bad_request(
                "with nvext.use_raw_prompt every message's content must be a string",
                f"messages[{index}].content",
            )
        parts.append(content)
    return "\n".join(parts)
