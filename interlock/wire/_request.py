"""What the frontend sends a worker: `PreprocessedRequest` and its parts.

Validators here are the boundary check for every request, whether built in Python, decoded from
the worker protocol, or translated from HTTP: a bad value raises `RequestError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from .._errors import RequestError
from ..kv._hashing import PackedTokenIds, U32TokenIds, known_u32, u32_words
from ._routing import ModelRewriteDecision

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _to_tuple(value: Iterable[Any]) -> tuple[Any, ...]:
    kind = type(value)
    if kind is tuple or kind is U32TokenIds or kind is PackedTokenIds:
        # `U32TokenIds` keeps saying what it is; `PackedTokenIds` stays packed (a query's
        # prompt: turning it into ints is the cost it spares).
        return value
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        # Left as is for the validator, which names the field.
        return value  # type: ignore[return-value]
    return tuple(value)


def _is(kind: type, *, optional: bool = False, prefix: str = "") -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if type(value) is not kind:
            expected = kind.__name__ + (" or null" if optional else "")
            name = prefix + attribute.name
            raise RequestError(
                f"{name} must be {expected}, got {type(value).__name__} {value!r}", field=name
            )

    return check


def _strings(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not tuple or not all(type(v) is str for v in value):
        raise RequestError(f"{attribute.name} must be a list of strings", field=attribute.name)


#: vLLM's limits on a ``cache_salt`` (``validate_cache_salt``): checked here so that a bad salt
#: is the frontend's 400 naming the field, not an engine's error mid-route.
CACHE_SALT_MAX_CHARS = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\0")


def check_cache_salt(value: object, field: str = "cache_salt") -> None:
    """Raise `RequestError` unless ``value`` is None or a salt vLLM accepts: a non-empty
    string of at most 128 characters without ``@``, ``/``, ``\\`` or NUL, that encodes as
    UTF-8."""
    if value is None:
        return
    if type(value) is not str or not value:
        got = repr(value) if type(value) is str else type(value).__name__
        raise RequestError(f"{field} must be a non-empty string, got {got}", field=field)
    if len(value) > CACHE_SALT_MAX_CHARS or not _CACHE_SALT_FORBIDDEN.isdisjoint(value):
        raise RequestError(
            f"{field} must be at most {CACHE_SALT_MAX_CHARS} characters without '@', '/', "
            "'\\' or NUL (vLLM refuses others)",
            field=field,
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        # A lone surrogate (the Python API takes any str; JSON parsing refuses them): the salt
        # is hashed as UTF-8 (kv_salt) and sent to engines as UTF-8, so it must encode.
        raise RequestError(
            f"{field} must be valid Unicode text (it holds a lone surrogate)", field=field
        ) from None


def _cache_salt(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_cache_salt(value, attribute.name)


def check_token_ids(value: tuple[int, ...], field: str) -> None:
    """Raise `RequestError` unless every element is an int in the u32 range."""
    if known_u32(value):
        return  # a tokenizer's output (`trust_u32`): converting it only to check it is waste
    if type(value) is not tuple:
        raise RequestError(
            f"{field} must be a list of token ids, got {type(value).__name__}", field=field
        )
    try:
        # One C-level conversion checks type and range (~10x faster than a Python loop on long
        # prompts); the router's block hashing reuses the words.
        u32_words(value)
    except (OverflowError, TypeError):
        bad = next((t for t in value if not (isinstance(t, int) and 0 <= t <= U32_MAX)), None)
        raise RequestError(
            f"{field} must be unsigned 32-bit integers; found {bad!r}", field=field
        ) from None


def _token_ids(inst: Any, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    if not value:
        raise RequestError(f"{attribute.name} must not be empty", field=attribute.name)
    check_token_ids(value, attribute.name)


def _token_id_list(inst: Any, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    check_token_ids(value, attribute.name)


def _stop_strings(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    _strings(inst, attribute, value)
    for index, text in enumerate(value):
        if not text:
            raise RequestError(f"stop[{index}] is an empty string", field="stop")


def _worker_id(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is None:
        return
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise RequestError(
            f"{attribute.name} must be a worker id (an unsigned 64-bit integer), got {value!r}",
            field=attribute.name,
        )


def _int_at_least(minimum: int, *, optional: bool = False) -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is None and optional:
            return
        if type(value) is not int or value < minimum:
            raise RequestError(
                f"{attribute.name} must be an integer >= {minimum}, got {value!r}",
                field=attribute.name,
            )

    return check


def _float_at_least(minimum: float, *, optional: bool = True) -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
        if value is None and optional:
            return
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not _finite(value)
            or value < minimum
        ):
            raise RequestError(
                f"{attribute.name} must be a number >= {minimum:g}, got {value!r}",
                field=attribute.name,
            )

    return check


@attrs.frozen(kw_only=True)
class RoutingHints:
    """Routing hints a request carries (nvext fields and GAIE headers map onto these).

    All optional. Which ones a pipeline accepts depends on its routing mode: direct_to_known
    requires them, discover refuses them unless ``allow_request_worker_ids``.
    """

    backend_instance_id: int | None = attrs.field(default=None, validator=_worker_id)
    prefill_worker_id: int | None = attrs.field(default=None, validator=_worker_id)
    decode_worker_id: int | None = attrs.field(default=None, validator=_worker_id)
    dp_rank: int | None = attrs.field(default=None, validator=_int_at_least(0, optional=True))
    #: False: the caller (a gateway) does the load bookkeeping; the router must not.
    enable_local_updates: bool | None = attrs.field(
        default=None, validator=_is(bool, optional=True)
    )
    expected_output_tokens: int | None = attrs.field(
        default=None, validator=_int_at_least(0, optional=True)
    )
    #: Order in the frontend's queue when every worker is full: higher first, unset counts
    #: as 0, negative is sheddable (429 at once instead of queueing), as GAIE's
    #: InferenceObjective priority.
    priority: int | None = attrs.field(default=None, validator=_is(int, optional=True))
    #: The request's flow (GAIE's ``x-gateway-inference-fairness-id``): within a priority,
    #: the frontend's queue serves waiting flows in turn. None: ``default-flow``.
    fairness_id: str | None = attrs.field(default=None, validator=_is(str, optional=True))

    def names_a_worker(self) -> str | None:
        """The first worker-id field that is set, or None."""
        for name in ("backend_instance_id", "prefill_worker_id", "decode_worker_id"):
            if getattr(self, name) is not None:
                return name
        return None


@attrs.frozen(kw_only=True)
class RouterConfigOverride:
    """Per-request overrides of the KV policy's knobs."""

    overlap_score_weight: float | None = attrs.field(default=None, validator=_float_at_least(0.0))
    router_temperature: float | None = attrs.field(default=None, validator=_float_at_least(0.0))


@attrs.frozen(kw_only=True)
class SamplingOptions:
    """Sampling parameters passed through to the engine untouched."""

    temperature: float | None = attrs.field(default=None, validator=_float_at_least(0.0))
    top_p: float | None = attrs.field(default=None, validator=_float_at_least(0.0))
    seed: int | None = attrs.field(default=None, validator=_int_at_least(0, optional=True))


@attrs.frozen(kw_only=True)
class PrefillResult:
    """What the decode leg of a disaggregated request needs from its prefill leg."""

    prefill_worker_id: int
    prompt_tokens: int
    cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None


#: The ``tool_choice`` strings a chat request may carry (a named function is an object).
TOOL_CHOICES = ("none", "auto", "required")


def _dicts(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not tuple or not all(type(v) is dict for v in value):
        raise RequestError(
            f"chat.{attribute.name} must be a list of objects", field=f"chat.{attribute.name}"
        )


def _object(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and type(value) is not dict:
        raise RequestError(
            f"chat.{attribute.name} must be an object or null, got {type(value).__name__}",
            field=f"chat.{attribute.name}",
        )


def _tool_choice(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None or value in TOOL_CHOICES:
        return
    function = value.get("function") if type(value) is dict else None
    if (
        type(value) is not dict
        or value.get("type") != "function"
        or type(function) is not dict
        or type(function.get("name")) is not str
    ):
        raise RequestError(
            "chat.tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r:.200}',
            field="chat.tool_choice",
        )


@attrs.frozen(kw_only=True)
class ChatRequest:
    """The parts of a client's chat request that an engine needs to run the chat itself:
    render ``messages`` with its own template, constrain output to ``tool_choice`` or
    ``response_format``, and parse tool calls and reasoning out of its text.

    Carried on `PreprocessedRequest.chat` under ``postprocessing='engine'`` (the frontend still
    renders and tokenizes the same messages, for routing). Values are the client's JSON,
    passed to the engine untouched; only their outer shape is checked here.

    Raises:
        RequestError: naming the first invalid field (``chat.<name>``).
    """

    messages: tuple[dict[str, Any], ...] = attrs.field(converter=_to_tuple, validator=_dicts)
    #: Empty: none sent.
    tools: tuple[dict[str, Any], ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_dicts
    )
    #: 'none', 'auto', 'required', or ``{"type": "function", "function": {"name": ...}}``
    #: (typed loosely: the wire codec passes JSON values through as they are).
    tool_choice: Any = attrs.field(default=None, validator=_tool_choice)
    parallel_tool_calls: bool | None = attrs.field(
        default=None, validator=_is(bool, optional=True, prefix="chat.")
    )
    response_format: dict[str, Any] | None = attrs.field(default=None, validator=_object)
    chat_template_kwargs: dict[str, Any] | None = attrs.field(default=None, validator=_object)
    add_generation_prompt: bool = attrs.field(default=True, validator=_is(bool, prefix="chat."))


@attrs.frozen(kw_only=True)
class PreprocessedRequest:
    """A tokenized request, ready to route and execute.

    ``max_tokens=None`` lets the engine generate until its context is full or it stops.
    ``stop_token_ids`` and ``eos_token_ids`` end generation (hidden: the stop token itself is
    not returned) unless ``ignore_eos``; neither counts before ``min_tokens`` tokens.

    Raises:
        RequestError: naming the first invalid field.
    """

    token_ids: tuple[int, ...] = attrs.field(converter=_to_tuple, validator=_token_ids)
    max_tokens: int | None = attrs.field(default=None, validator=_int_at_least(1, optional=True))
    min_tokens: int = attrs.field(default=0, validator=_int_at_least(0))
    stop_token_ids: tuple[int, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_token_id_list
    )
    eos_token_ids: tuple[int, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_token_id_list
    )
    ignore_eos: bool = attrs.field(default=False, validator=_is(bool))
    sampling: SamplingOptions = attrs.field(factory=SamplingOptions)
    routing: RoutingHints | None = None
    router_config_override: RouterConfigOverride | None = None
    request_id: str | None = attrs.field(default=None, validator=_is(str, optional=True))
    #: The LoRA adapter the request is for, by the name the engines list it under; None: the
    #: base model. Decided once where the request enters (the frontend: the client's
    #: ``model`` unless it is ``--model-name``); the router sends it only to engines that
    #: serve that adapter (none: `NoWorkersAvailable`), and an engine is sent this name as is.
    model: str | None = attrs.field(default=None, validator=_is(str, optional=True))
    annotations: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, validator=_strings)
    #: Return text with the tokens: detokenized by the frontend (postprocessing='frontend',
    #: which needs a tokenizer) or by the engine (postprocessing='engine').
    detokenize: bool = attrs.field(default=False, validator=_is(bool))
    #: Stop strings: generation ends at the first one (hidden unless
    #: ``include_stop_str_in_output``). They need text, so ``detokenize=True``.
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, validator=_stop_strings)
    include_stop_str_in_output: bool = attrs.field(default=False, validator=_is(bool))
    #: Set by the disaggregation orchestrator on a decode leg.
    prefill_result: PrefillResult | None = None
    #: The client's chat, for an engine that runs chats itself (an `OpenAIEngine` sends a
    #: request that has one, and ``detokenize``, to its ``/v1/chat/completions``; engines that
    #: take token ids ignore it). ``token_ids`` must still be the rendered chat, for routing.
    #: A migrated request that generated tokens drops it (docs/engines.md).
    chat: ChatRequest | None = None
    #: vLLM's per-request prefix-cache isolation: only requests with the same salt share
    #: cached blocks (the engine mixes it into block 0's hash; the router keys the prompt's
    #: blocks by it: `interlock.kv.kv_salt`). Sent to the engine as the body's ``cache_salt``.
    #: Out of the repr (and the transition records): a tenant may keep it secret.
    cache_salt: str | None = attrs.field(default=None, validator=_cache_salt, repr=False)
    #: The ``[[model_rewrites]]`` rule that set ``model`` (None: the client's own name): the
    #: frontend's, which answers with the client's name and records the rule on the
    #: ``preprocess`` transition; never sent to a worker.
    model_rewrite: ModelRewriteDecision | None = None

    def __attrs_post_init__(self) -> None:
        if self.stop and not self.detokenize:
            raise RequestError(
                "stop strings match text, so they need detokenize=True", field="stop"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}",
                field="min_tokens",
            )
