"""Validation and normalisation of OpenAI-style chat messages before a template sees them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Final

from ._errors import ChatMessageError

__all__ = ["kind", "validate_messages", "validate_tools"]

_ROLES: Final = ("system", "user", "assistant", "tool")
_MESSAGE_FIELDS: Final = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
)


def validate_messages(messages: object) -> list[dict[str, object]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatMessageError("messages", f"expected a list of messages, got {kind(messages)}")
    if not messages:
        raise ChatMessageError("messages", "is empty; a chat needs at least one message")
    return [_validate_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _validate_message(message: object, where: str) -> dict[str, object]:
    if not isinstance(message, Mapping):
        raise ChatMessageError(where, f"expected an object, got {kind(message)}")
    for key in message:
        if key not in _MESSAGE_FIELDS:
            raise ChatMessageError(
                f"{where}.{key}",
                f"unknown field; a message may have {', '.join(sorted(_MESSAGE_FIELDS))}",
            )
    role = message.get("role")
    if role not in _ROLES:
        problem = "missing" if role is None else f"is {role!r}"
        raise ChatMessageError(f"{where}.role", f"{problem}; expected one of {', '.join(_ROLES)}")
    clean: dict[str, object] = {"role": role}

    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise ChatMessageError(
                f"{where}.content", f"missing; a {role} message needs text content"
            )
        clean["content"] = ""
    else:
        clean["content"] = _text_content(content, f"{where}.content")

    for key in ("name", "tool_call_id"):
        if key in message:
            clean[key] = _string(message[key], f"{where}.{key}")
    if message.get("reasoning_content") is not None:
        clean["reasoning_content"] = _string(
            message["reasoning_content"], f"{where}.reasoning_content"
        )
    if message.get("tool_calls") is not None:
        if role != "assistant":
            raise ChatMessageError(f"{where}.tool_calls", f"only assistant messages, not {role}")
        clean["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    return clean


def _text_content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise ChatMessageError(where, f"expected a string or a list of parts, got {kind(content)}")
    texts = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        if not isinstance(part, Mapping):
            raise ChatMessageError(here, f"expected a content part object, got {kind(part)}")
        if part.get("type") != "text":
            raise ChatMessageError(
                f"{here}.type",
                f"is {part.get('type')!r}; only 'text' parts are supported by a text-only model",
            )
        texts.append(_string(part.get("text"), f"{here}.text"))
    return "\n".join(texts)


def _tool_calls(tool_calls: object, where: str) -> list[dict[str, object]]:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str | bytes):
        raise ChatMessageError(where, f"expected a list of tool calls, got {kind(tool_calls)}")
    clean = []
    for i, call in enumerate(tool_calls):
        here = f"{where}[{i}]"
        if not isinstance(call, Mapping):
            raise ChatMessageError(here, f"expected a tool call object, got {kind(call)}")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ChatMessageError(f"{here}.function", f"expected an object, got {kind(function)}")
        name = _string(function.get("name"), f"{here}.function.name")
        arguments: object = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ChatMessageError(
                    f"{here}.function.arguments", f"is not valid JSON: {exc}"
                ) from exc
        if not isinstance(arguments, Mapping):
            raise ChatMessageError(
                f"{here}.function.arguments", f"expected a JSON object, got {kind(arguments)}"
            )
        clean_call: dict[str, object] = {
            "type": call.get("type", "function"),
            "function": {"name": name, "arguments": dict(arguments)},
        }
        if "id" in call:
            clean_call["id"] = _string(call["id"], f"{here}.id")
        clean.append(clean_call)
    return clean


def validate_tools(tools: object) -> list[Mapping[str, object]] | None:
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise ChatMessageError("tools", f"expected a list of tool objects, got {kind(tools)}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatMessageError(f"tools[{i}]", f"expected an object, got {kind(tool)}")
    return list(tools)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        problem = "missing" if value is None else f"expected a string, got {kind(value)}"
        raise ChatMessageError(where, problem)
    return value


def kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
