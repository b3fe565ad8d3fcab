"""The OpenAI request bodies: strict validation into `ParsedRequest`, and the response shapes.

Every field of ``/v1/chat/completions`` and ``/v1/completions`` that a client may send is
listed here with its check. An unknown field is a 400 naming it (a typo never passes
silently); a known field whose behaviour interlock does not implement (``n > 1``,
``logprobs``, penalties, ...) is a 400 that says so, rather than an answer that silently
ignores it. Documented in docs/http.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import attrs

from .._errors import RequestError
from ..wire import ChatRequest
from ..wire._request import check_cache_salt
from ._errors import bad_request
from ._json import loads_json
from ._nvext import EMPTY, U32_MAX, NvExt, parse_nvext, parse_token_ids

#: Largest seed a request may carry (the worker protocol's seeds are unsigned 64-bit).
_SEED_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
#: More stop strings than this is a mistake, not a use case.
MAX_STOP_STRINGS: Final = 64
#: Characters in all stop strings together: the matcher's automaton is built per request on
#: the event loop (about 4 µs a character), so megabyte stop strings would stall every client.
MAX_STOP_CHARS: Final = 4096


@attrs.define(slots=True)
class ParsedRequest:
    """A validated OpenAI request body; ``kind`` is ``"chat"`` or ``"completion"``."""

    kind: str
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    messages: list[Any] | None = None
    tools: list[Any] | None = None
    #: None (not sent), 'none', 'auto', 'required' or a named function (an object).
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    nvext: NvExt = EMPTY
    cache_salt: str | None = None
    stream_options: dict[str, Any] | None = None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise bad_request(f"{name} must be a boolean, got {_kind(value)} {value!r}", name)
    return value


def _int(value: Any, name: str, minimum: int, maximum: int) -> int:
    if type(value) is not int:
        raise bad_request(f"{name} must be an integer, got {_kind(value)} {value!r}", name)
    if not minimum <= value <= maximum:
        raise bad_request(
            f"{name} must be between {minimum} and {maximum}, got {value}",
            name,
            code="integer_out_of_range",
        )
    return value


def _number(value: Any, name: str, minimum: float, maximum: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(f"{name} must be a number, got {_kind(value)} {value!r}", name)
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise bad_request(
            f"{name} must be between {minimum:g} and {maximum:g}, got {value!r}",
            name,
            code="number_out_of_range",
        )
    return float(value)


def _unsupported(name: str, what: str) -> Any:
    return bad_request(
        f"{name}: {what} is not supported by interlock; drop the field (see docs/http.md)",
        name,
        code="unsupported_parameter",
    )


# -- field handlers: (parsed, value, limits) -> None; each raises a 400 naming its field ------


def _model(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not str or not v:
        raise bad_request(f"model must be a non-empty string, got {_kind(v)} {v!r}", "model")
    p.model = v


def _stream(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.stream = _bool(v, "stream")


def _stream_options(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not dict:
        raise bad_request(f"stream_options must be an object, got {_kind(v)}", "stream_options")
    for key, item in v.items():
        where = f"stream_options.{key}"
        if key not in ("include_usage", "continuous_usage_stats"):
            raise bad_request(
                f"unknown field {where!r}; stream_options may have include_usage", where
            )
        if item is None:
            continue
        if _bool(item, where) and key == "continuous_usage_stats":
            raise _unsupported(where, "usage on every chunk")
        if key == "include_usage":
            p.include_usage = item
    p.stream_options = v


def _max_tokens(name: str) -> Callable[[ParsedRequest, Any, int], None]:
    def handle(p: ParsedRequest, v: Any, max_len: int) -> None:
        if type(v) is int and v > max_len:
            raise bad_request(
                f"{name}={v} is more than this model's context length of {max_len} tokens; "
                "ask for fewer tokens",
                name,
                code="context_length_exceeded",
            )
        p.max_tokens = _int(v, name, 1, max_len)

    return handle


def _min_tokens(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.min_tokens = _int(v, "min_tokens", 0, max_len)


def _n(p: ParsedRequest, v: Any, max_len: int) -> None:
    if _int(v, "n", 1, 128) != 1:
        raise _unsupported("n", "more than one choice per request")


def _best_of(p: ParsedRequest, v: Any, max_len: int) -> None:
    if _int(v, "best_of", 1, 128) != 1:
        raise _unsupported("best_of", "best_of > 1")


def _temperature(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.temperature = _number(v, "temperature", 0.0, 2.0)


def _top_p(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.top_p = _number(v, "top_p", 0.0, 1.0)


def _seed(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.seed = _int(v, "seed", 0, _SEED_MAX)


def _stop(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is str:
        v = [v]
    if type(v) is not list:
        raise bad_request(f"stop must be a string or a list of strings, got {_kind(v)}", "stop")
    if len(v) > MAX_STOP_STRINGS:
        raise bad_request(
            f"stop has {len(v)} strings; at most {MAX_STOP_STRINGS}", "stop", code="too_many_stops"
        )
    chars = 0
    for index, text in enumerate(v):
        if type(text) is not str or not text:
            raise bad_request(
                f"stop[{index}] must be a non-empty string, got {_kind(text)} {text!r:.100}",
                f"stop[{index}]",
            )
        chars += len(text)
    if chars > MAX_STOP_CHARS:
        raise bad_request(
            f"the stop strings have {chars} characters in all; at most {MAX_STOP_CHARS}",
            "stop",
            code="stop_too_long",
        )
    p.stop = tuple(v)


def _stop_token_ids(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not list:
        raise bad_request(
            f"stop_token_ids must be a list of token ids, got {_kind(v)}", "stop_token_ids"
        )
    for index, token in enumerate(v):
        if type(token) is not int or not 0 <= token <= U32_MAX:
            raise bad_request(
                f"stop_token_ids[{index}] must be a token id, got {token!r}",
                f"stop_token_ids[{index}]",
            )
    p.stop_token_ids = tuple(v)


def _ignore_eos(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.ignore_eos = _bool(v, "ignore_eos")


def _include_stop(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.include_stop_str_in_output = _bool(v, "include_stop_str_in_output")


def _zero_only(name: str) -> Callable[[ParsedRequest, Any, int], None]:
    def handle(p: ParsedRequest, v: Any, max_len: int) -> None:
        if _number(v, name, -2.0, 2.0) != 0:
            raise _unsupported(name, "a non-zero penalty")

    return handle


def _logit_bias(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not dict:
        raise bad_request(f"logit_bias must be an object, got {_kind(v)}", "logit_bias")
    if v:
        raise _unsupported("logit_bias", "biasing token logits")


def _user(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not str:
        raise bad_request(f"user must be a string, got {_kind(v)}", "user")


def _cache_salt(p: ParsedRequest, v: Any, max_len: int) -> None:
    try:
        check_cache_salt(v)
    except RequestError as exc:
        raise bad_request(str(exc), "cache_salt") from None
    p.cache_salt = v


def _chat_logprobs(p: ParsedRequest, v: Any, max_len: int) -> None:
    if _bool(v, "logprobs"):
        raise _unsupported("logprobs", "returning log probabilities")


def _top_logprobs(p: ParsedRequest, v: Any, max_len: int) -> None:
    if _int(v, "top_logprobs", 0, 20):
        raise _unsupported("top_logprobs", "returning log probabilities")


def _completion_logprobs(p: ParsedRequest, v: Any, max_len: int) -> None:
    _int(v, "logprobs", 0, 5)
    raise _unsupported("logprobs", "returning log probabilities")


def _response_format(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not dict:
        raise bad_request(f"response_format must be an object, got {_kind(v)}", "response_format")
    if type(v.get("type")) is not str:
        raise bad_request(
            "response_format.type must be a string ('text', 'json_object', 'json_schema')",
            "response_format.type",
        )
    p.response_format = v


def _messages(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not list:
        raise bad_request(f"messages must be a list of messages, got {_kind(v)}", "messages")
    p.messages = v


def _tools(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not list or not all(type(t) is dict for t in v):
        raise bad_request("tools must be a list of tool objects", "tools")
    p.tools = v


def _tool_choice(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is str:
        if v not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got {v!r}",
                "tool_choice",
            )
    else:
        if type(v) is not dict or v.get("type") != "function":
            raise bad_request(
                'tool_choice must be a string or {"type": "function", "function": {"name": '
                f"...}}}}, got {_kind(v)} {v!r:.100}",
                "tool_choice",
            )
        function = v.get("function")
        name = function.get("name") if type(function) is dict else None
        if type(name) is not str or not name:
            raise bad_request(
                "tool_choice.function.name must be the name of one of the tools",
                "tool_choice.function.name",
            )
    p.tool_choice = v


def _parallel_tool_calls(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.parallel_tool_calls = _bool(v, "parallel_tool_calls")


def _template_kwargs(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is not dict:
        raise bad_request(
            f"chat_template_kwargs must be an object, got {_kind(v)}", "chat_template_kwargs"
        )
    p.chat_template_kwargs = v


def _add_generation_prompt(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.add_generation_prompt = _bool(v, "add_generation_prompt")


def _nvext(p: ParsedRequest, v: Any, max_len: int) -> None:
    p.nvext = parse_nvext(v)


def _prompt(p: ParsedRequest, v: Any, max_len: int) -> None:
    if type(v) is str:
        p.prompt_text = v
        return
    if type(v) is list and v:
        if len(v) == 1 and type(v[0]) is str:
            p.prompt_text = v[0]
            return
        if type(v[0]) is list:
            if len(v) != 1:
                raise _unsupported("prompt", "more than one prompt per request")
            p.prompt_ids = parse_token_ids(v[0], "prompt[0]")
            return
        if type(v[0]) is int:
            p.prompt_ids = parse_token_ids(v, "prompt")
            return
        if type(v[0]) is str:
            raise _unsupported("prompt", "more than one prompt per request")
    raise bad_request(
        "prompt must be a string, a list of token ids, or a list holding one of those; "
        f"got {_kind(v) if not isinstance(v, list) else 'an empty or mixed list'}",
        "prompt",
    )


def _echo(p: ParsedRequest, v: Any, max_len: int) -> None:
    if _bool(v, "echo"):
        raise _unsupported("echo", "echoing the prompt")


def _suffix(p: ParsedRequest, v: Any, max_len: int) -> None:
    raise _unsupported("suffix", "a suffix (insertion)")


_Handler = Callable[[ParsedRequest, Any, int], None]

_COMMON: Final[dict[str, _Handler]] = {
    "model": _model,
    "stream": _stream,
    "stream_options": _stream_options,
    "max_tokens": _max_tokens("max_tokens"),
    "min_tokens": _min_tokens,
    "n": _n,
    "temperature": _temperature,
    "top_p": _top_p,
    "seed": _seed,
    "stop": _stop,
    "stop_token_ids": _stop_token_ids,
    "ignore_eos": _ignore_eos,
    "include_stop_str_in_output": _include_stop,
    "presence_penalty": _zero_only("presence_penalty"),
    "frequency_penalty": _zero_only("frequency_penalty"),
    "logit_bias": _logit_bias,
    "user": _user,
    "cache_salt": _cache_salt,
    "nvext": _nvext,
}

CHAT_FIELDS: Final[dict[str, _Handler]] = {
    **_COMMON,
    "messages": _messages,
    "max_completion_tokens": _max_tokens("max_completion_tokens"),
    "logprobs": _chat_logprobs,
    "top_logprobs": _top_logprobs,
    "response_format": _response_format,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _parallel_tool_calls,
    "chat_template_kwargs": _template_kwargs,
    "add_generation_prompt": _add_generation_prompt,
}

COMPLETION_FIELDS: Final[dict[str, _Handler]] = {
    **_COMMON,
    "prompt": _prompt,
    "logprobs": _completion_logprobs,
    "best_of": _best_of,
    "echo": _echo,
    "suffix": _suffix,
}

_NAMES: Final = {"chat": "chat completion", "completion": "completion"}

#: The OpenAI default for /v1/completions (chat has none: up to the context length).
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16


def json_object(body: bytes) -> dict[str, Any]:
    """``body`` (a request's bytes) decoded as a JSON object, the one way every endpoint that
    takes an OpenAI body decodes it (the HTTP API, ``/v1/route``, the gateway's picker).
    Synchronous.

    Every field goes on to an engine as the client sent it (the chat's pass-through fields
    under engine postprocessing, the stop strings, a gateway's forwarded body), so one with a
    value that has no JSON or no UTF-8 to send is refused here, naming it, for every field.

    Raises:
        HttpError: 400 ``invalid_json`` when it is not JSON or nests deeper than
            `MAX_JSON_DEPTH`, 400 ``invalid_json`` or ``invalid_unicode`` naming a field that
            holds NaN, an infinity or a lone surrogate (`loads_json` with ``sendable``); 400
            when it is JSON but not an object.
    """
    data = loads_json(body, sendable=True)
    if type(data) is not dict:
        raise bad_request(f"the request body must be a JSON object, got {_kind(data)}")
    return data


def parse_request(
    kind: str, body: Any, *, max_model_len: int, engine_postprocessing: bool = False
) -> ParsedRequest:
    """Validate a decoded JSON body of ``/v1/chat/completions`` (``kind="chat"``) or
    ``/v1/completions`` (``kind="completion"``).

    ``engine_postprocessing``: the engine runs chats (``postprocessing='engine'``), so a chat may
    force tool calls (``tool_choice`` 'required' or a named function) and structured output
    (``response_format``); otherwise those are 400s, since the frontend cannot parse tool calls.

    Raises:
        HttpError: 400 naming the first missing, unknown or invalid field.
    """
    if type(body) is not dict:
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    parsed = ParsedRequest(kind)
    if kind == "completion":
        parsed.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    for key, value in body.items():
        handler = fields.get(key)
        if handler is None:
            raise bad_request(
                f"unknown field {key!r} in a {_NAMES[kind]} request; see docs/http.md for the "
                "fields interlock accepts",
                key,
                code="unknown_parameter",
            )
        if value is None and key not in ("model", "messages", "prompt"):
            continue  # OpenAI clients send null for "not given"
        handler(parsed, value, max_model_len)
    if not parsed.model:
        raise bad_request("model is required", "model")
    required = "messages" if kind == "chat" else "prompt"
    if required not in body:
        raise bad_request(f"{required} is required", required)
    if parsed.stream_options is not None and not parsed.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if kind == "chat" and "max_completion_tokens" in body and "max_tokens" in body:
        a, b = body["max_tokens"], body["max_completion_tokens"]
        if a is not None and b is not None and a != b:
            raise bad_request(
                f"max_tokens={a} and max_completion_tokens={b} disagree; send one of them",
                "max_completion_tokens",
            )
    if parsed.max_tokens is not None and parsed.min_tokens > parsed.max_tokens:
        raise bad_request(
            f"min_tokens={parsed.min_tokens} exceeds max_tokens={parsed.max_tokens}",
            "min_tokens",
        )
    if kind == "chat":
        _check_tool_fields(parsed, engine_postprocessing)
    return parsed


def needs_engine_chat(parsed: ParsedRequest) -> str | None:
    """The field of a chat that only an engine running the chat can honour (a forced tool call,
    structured output), or None."""
    if parsed.tool_choice is not None and parsed.tool_choice not in ("none", "auto"):
        return "tool_choice"
    if parsed.response_format is not None and parsed.response_format.get("type") != "text":
        return "response_format"
    return None


def _check_tool_fields(parsed: ParsedRequest, engine_postprocessing: bool) -> None:
    field = needs_engine_chat(parsed)
    if field is not None and not engine_postprocessing:
        value = parsed.tool_choice if field == "tool_choice" else parsed.response_format
        what = "a tool call" if field == "tool_choice" else "structured output"
        raise bad_request(
            f"{field}={value!r:.100} asks for {what}, but this server postprocesses in the "
            "frontend (postprocessing='frontend'): interlock cannot parse tool calls or "
            "constrain output itself, so tool calls come back as text; send tool_choice "
            "'auto' or 'none' and no response_format, or start the server with "
            "--postprocessing engine so that the engine runs the chat (see docs/http.md)",
            field,
            code="unsupported_parameter",
        )
    choice = parsed.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    names = [
        t["function"].get("name") for t in parsed.tools or () if type(t.get("function")) is dict
    ]
    if choice == "required":
        if not names:
            raise bad_request("tool_choice='required' needs tools to choose from", "tool_choice")
        return
    name = choice["function"]["name"]
    if name not in names:
        raise bad_request(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(repr(n) for n in names) or 'none given'})",
            "tool_choice.function.name",
        )


def chat_request(parsed: ParsedRequest) -> ChatRequest:
    """The client's chat as the engine should run it (`PreprocessedRequest.chat`).

    Raises:
        HttpError: 400 naming the field the wire check refused.
    """
    assert parsed.messages is not None
    try:
        return ChatRequest(
            messages=parsed.messages,
            tools=parsed.tools or (),
            tool_choice=parsed.tool_choice,
            parallel_tool_calls=parsed.parallel_tool_calls,
            response_format=parsed.response_format,
            chat_template_kwargs=parsed.chat_template_kwargs,
            add_generation_prompt=parsed.add_generation_prompt,
        )
    except RequestError as exc:
        field = (exc.field or "messages").removeprefix("chat.")
        raise bad_request(str(exc).replace("chat.", ""), field) from None


# -- responses -----------------------------------------------------------------------------------


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    kind: str,
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    nvext: dict[str, Any] | None = None,
    message_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streaming response: ``chat.completion`` or ``text_completion``.
    ``message_fields``: what the engine added to a chat's message (`ChatDeltas.fields`:
    ``tool_calls``, reasoning); with tool calls and no text, ``content`` is null, as OpenAI
    answers."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if message_fields:
            if not text and "tool_calls" in message_fields:
                message["content"] = None
            message.update(message_fields)
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
    if nvext is not None:
        body["nvext"] = nvext
    return body


class ChatDeltas:
    """The passed-through fields of a chat stream's deltas (`EngineOutput.chat_delta`) merged
    into one message, as OpenAI's and vLLM's non-streaming answers have them: tool-call deltas
    merged by ``index`` (their ``function.arguments`` concatenated, other values kept from
    the first delta that has them; ``index`` itself dropped), string fields such as
    ``reasoning_content`` concatenated, any other field the last value sent."""

    __slots__ = ("_calls", "_fields")

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}
        self._fields: dict[str, Any] = {}

    def add(self, delta: dict[str, Any]) -> None:
        """Merge one delta's fields."""
        fields = self._fields
        for key, value in delta.items():
            if key == "tool_calls":
                for call in value:
                    self._add_call(call)
            elif type(value) is str and type(fields.get(key)) is str:
                fields[key] += value
            else:
                fields[key] = value

    def _add_call(self, delta: dict[str, Any]) -> None:
        index = delta["index"]
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = {}
        for key, value in delta.items():
            if key == "index" or value is None:
                continue
            if key == "function" and type(value) is dict:
                function = call.setdefault("function", {})
                for name, part in value.items():
                    if part is None:
                        continue
                    if name == "arguments" and type(function.get(name)) is str:
                        function[name] += part
                    else:
                        function.setdefault(name, part)
            else:
                call.setdefault(key, value)

    def fields(self) -> dict[str, Any]:
        """The merged fields (``tool_calls`` ordered by index, each with ``type``)."""
        fields = dict(self._fields)
        if self._calls:
            calls = []
            for index in sorted(self._calls):
                call = self._calls[index]
                call.setdefault("type", "function")
                call.setdefault("function", {}).setdefault("arguments", "")
                calls.append(call)
            fields["tool_calls"] = calls
        return fields
