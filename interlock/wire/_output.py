"""What a worker sends back: `EngineOutput` chunks."""

from __future__ import annotations

from collections import deque
from typing import Any, Literal, cast

import attrs

from ._request import PrefillResult

#: ``tool_calls``: the engine ended the answer with tool calls (postprocessing='engine' chats).
FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of a finished request (on its final output)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@attrs.frozen(kw_only=True, slots=True)
class EngineOutput:
    """One chunk of a stream: zero or more new tokens, optional text, and on the last chunk a
    ``finish_reason``. A stream that ends without a chunk carrying one is a broken stream.
    """

    token_ids: tuple[int, ...] = ()
    text: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    #: Set on the single output of a prefill leg.
    prefill_result: PrefillResult | None = None
    #: A chat run by the engine (`PreprocessedRequest.chat`): the fields of its delta other than
    #: ``role`` and ``content`` (which is ``text``), as the engine sent them, for the client:
    #: ``tool_calls`` (a list of tool-call deltas, each with its ``index``), ``reasoning`` or
    #: ``reasoning_content``, ... None when there are none.
    chat_delta: dict[str, Any] | None = None


#: `join_outputs` joins nothing to an output of this many tokens or more: a reader stuck for
#: long gets a few outputs of this size, not one that grows (and is copied) with every token.
MAX_JOINED_TOKENS = 256


def _can_join(first: EngineOutput, second: EngineOutput) -> bool:
    """``second`` may be joined after ``first`` (their sizes aside): ``first`` neither ends
    the stream nor carries usage, neither carries a prefill result or a chat delta, and both
    have text or neither has."""
    return (
        first.finish_reason is None
        and first.usage is None
        and first.prefill_result is None
        and first.chat_delta is None
        and second.prefill_result is None
        and second.chat_delta is None
        and (first.text is None) == (second.text is None)
    )


def join_outputs(first: EngineOutput, second: EngineOutput) -> EngineOutput | None:
    """One output carrying ``first`` then ``second`` (two consecutive outputs of a stream),
    or None when they cannot be one: ``first`` ends the stream, carries usage or already
    holds `MAX_JOINED_TOKENS` tokens, either carries a prefill result or a chat delta, or one
    has text and the other not.

    Joining is how a worker and a frontend that fall behind catch up: the stream's reader
    gets its tokens in fewer, larger outputs (as vLLM's do under load), never other tokens.
    """
    if len(first.token_ids) >= MAX_JOINED_TOKENS or not _can_join(first, second):
        return None
    return EngineOutput(
        token_ids=first.token_ids + second.token_ids,
        text=None if first.text is None else first.text + cast("str", second.text),
        finish_reason=second.finish_reason,
        usage=second.usage,
    )


def join_waiting(first: EngineOutput, waiting: deque[Any]) -> EngineOutput:
    """``first`` joined with the outputs at the front of ``waiting`` that `join_outputs`
    would join to it one by one (each one taken out of ``waiting``), built once rather than
    once per join; the first item it would not join, of any type, stays in ``waiting``."""
    size = len(first.token_ids)
    texts = None if first.text is None else [first.text]
    parts = [first.token_ids]
    last = first
    while waiting and size < MAX_JOINED_TOKENS:
        second = waiting[0]
        if type(second) is not EngineOutput or not _can_join(last, second):
            break
        waiting.popleft()
        parts.append(second.token_ids)
        size += len(second.token_ids)
        if texts is not None:
            texts.append(cast("str", second.text))
        last = second
    if len(parts) == 1:
        return first
    return EngineOutput(
        token_ids=tuple(token for part in parts for token in part),
        text=None if texts is None else "".join(texts),
        finish_reason=last.finish_reason,
        usage=last.usage,
    )
