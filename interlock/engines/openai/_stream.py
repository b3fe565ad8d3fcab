"""Reading one engine response: SSE chunks of an OpenAI-compatible completions (or, for a chat
the engine runs, chat completions) stream, turned into `EngineOutput` values, and every way
such a stream can end badly turned into `WorkerGone`.

What a real vLLM does when it fails (measured, reference/vllm-cpu.md section 5): a killed API
server ends the body with a clean EOF and no ``[DONE]``; a dead engine core sends an in-band
``data: {"error": ...}`` and then ``[DONE]``; a frozen one sends nothing (the pipeline's
``engine_idle_timeout`` covers that). After a stall one chunk can carry 100+ tokens.

Chunks are decoded by msgspec into the few fields read (`StreamChunk`), in C: what else a
chunk carries (vLLM's completions chunks repeat the whole prompt's ids on the first one, ids,
model, logprobs, ...) is skipped without building Python objects. ``json.loads`` took 5 % of
``interlock serve``'s CPU per streamed request in front of HTTP engines; this is about a
tenth of it.
"""

from __future__ import annotations

from typing import Any

import attrs
import msgspec

from ..._errors import WorkerGone
from ...wire import EngineOutput, FinishReason, Usage

#: Engine finish reasons that end a request normally, as interlock names them. vLLM also says
#: "abort" (the engine dropped the request) and "error": a broken stream, not an end.
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "repetition": "stop",
    "tool_calls": "tool_calls",
}
#: Keys of a chat delta that are not passed through: the role, and the content (the text).
_NOT_PASSED = frozenset({"role", "content"})


def usage_from(body: dict[str, Any] | None) -> Usage | None:
    """The `Usage` of an OpenAI ``usage`` object; None when absent or malformed: the whole
    usage is ignored when ``prompt_tokens`` or ``completion_tokens`` is missing, or when any of
    them or ``prompt_tokens_details.cached_tokens`` (absent or null: 0) is not a non-negative
    int (a bool, a float, a negative count), since a count that goes down breaks the
    Prometheus counters it is added to."""
    if type(body) is not dict:
        return None
    prompt = body.get("prompt_tokens")
    completion = body.get("completion_tokens")
    if not _count(prompt) or not _count(completion):
        return None
    details = body.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    if cached is None:
        cached = 0
    elif not _count(cached):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


def _count(value: Any) -> bool:
    """Whether ``value`` is a token count: an int (not a bool), not negative."""
    return type(value) is int and value >= 0


def engine_error_message(body: Any) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``, vLLM's
    ``{"message": ...}``), or the body itself, shortened."""
    if type(body) is dict:
        error = body.get("error", body)
        if type(error) is dict and type(error.get("message")) is str:
            return str(error["message"])[:500]
        if type(error) is str:
            return error[:500]
    return repr(body)[:500]


class Choice(msgspec.Struct):
    """The fields of a ``choices[0]`` object that are read (the others are skipped)."""

    token_ids: list[int] | None = None
    #: A completions choice's text.
    text: str | None = None
    #: A chat choice's delta: an object, checked by `ChunkReader` (its fields pass through).
    delta: Any = None
    finish_reason: str | None = None


class StreamChunk(msgspec.Struct):
    """The fields of a completions stream chunk that are read."""

    choices: list[Choice] | None = None
    usage: Any = None
    #: An in-band error (vLLM's dead engine core): any value, present or not.
    error: Any = msgspec.UNSET


class ChatStreamChunk(StreamChunk):
    """A chat stream chunk: vLLM sends the rendered prompt's ids on the first one."""

    prompt_token_ids: list[int] | None = None


class Answer(msgspec.Struct):
    """The fields of a whole (non-stream) completions answer that are read."""

    choices: list[Choice] | None = None
    usage: Any = None
    kv_transfer_params: Any = None


_CHUNK = msgspec.json.Decoder(StreamChunk)
_CHAT_CHUNK = msgspec.json.Decoder(ChatStreamChunk)
_ANSWER = msgspec.json.Decoder(Answer)


class SseSplitter:
    """Splits an SSE body into its ``data:`` payloads as its bytes arrive.

    Lines end at line feeds only (a trailing CR is dropped): not `str.splitlines`, which also
    splits at U+2028, U+2029, U+0085 and more, which vLLM writes unescaped inside its JSON
    chunks (pydantic does not escape them). Each piece of the body is split in one pass, and
    every complete event in it comes out of one `feed`.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        """The payloads of the ``data:`` lines that ``data`` completes (other lines, such as
        comments and the blank lines between events, are skipped)."""
        if b"\n" not in data:
            self._pending += data
            return []
        lines = (self._pending + data if self._pending else data).split(b"\n")
        self._pending = lines.pop()
        return [
            line[5:].strip().decode("utf-8", "replace")
            for line in lines
            if line.startswith(b"data:")
        ]

    def end(self) -> list[str]:
        """The payload of a last line the body ended without a line feed, if a data line."""
        rest, self._pending = self._pending, b""
        return self.feed(rest + b"\n") if rest else []


class ChunkReader:
    """Turns one request's decoded SSE ``data:`` payloads into outputs.

    `feed` takes each payload (``[DONE]`` included) and returns the output to pass on, or None.
    The chunk carrying the finish reason is held back until ``[DONE]`` (or the end of the body),
    so that the usage chunk vLLM sends in between reaches the same, final, output.
    """

    __slots__ = (
        "_chat",
        "_describe",
        "_final",
        "_text",
        "_usage",
        "_worker_id",
        "done",
        "prompt_token_ids",
        "tokens",
    )

    def __init__(self, worker_id: int, *, text: bool, describe: str, chat: bool = False) -> None:
        self._worker_id = worker_id
        self._text = text
        self._chat = chat
        self._describe = describe
        self._final: EngineOutput | None = None
        self._usage: Usage | None = None
        #: Saw ``[DONE]``.
        self.done = False
        #: Tokens received so far.
        self.tokens = 0
        #: A chat stream's ``prompt_token_ids`` (vLLM sends them on its first chunk), until the
        #: caller takes them.
        self.prompt_token_ids: list[int] | None = None

    def broken(self, why: str) -> WorkerGone:
        return WorkerGone(
            f"engine {self._worker_id} at {self._describe} {why} after {self.tokens} tokens",
            worker_id=self._worker_id,
        )

    def feed(self, data: str | bytes) -> EngineOutput | None:
        """One SSE ``data:`` payload. Raises `WorkerGone` for an in-band error, an aborted
        request, a chunk that is not a stream chunk (not JSON, fields of the wrong type,
        nested too deeply to decode), or one without token ids."""
        if data == "[DONE]" or data == b"[DONE]":
            self.done = True
            return self.finish()
        try:
            chunk = (_CHAT_CHUNK if self._chat else _CHUNK).decode(data)
        except msgspec.ValidationError as exc:
            raise self.broken(
                f"sent a chunk that is not a stream chunk ({exc}): {data[:80]!r}"
            ) from None
        except msgspec.DecodeError:
            raise self.broken(f"sent a chunk that is not JSON ({data[:80]!r})") from None
        except RecursionError:
            # msgspec nests on the C stack even through the fields it skips: a chunk nested
            # about a thousand levels runs out of Python's recursion limit.
            raise self.broken(f"sent a chunk nested too deeply to read: {data[:80]!r}") from None
        if chunk.error is not msgspec.UNSET:
            message = engine_error_message({"error": chunk.error})
            raise self.broken(f"reported an error in the stream: {message}")
        if chunk.usage is not None:
            usage = usage_from(chunk.usage)
            if usage is not None:
                self._usage = usage
        if self._chat:
            assert isinstance(chunk, ChatStreamChunk)
            if chunk.prompt_token_ids is not None:
                self.prompt_token_ids = chunk.prompt_token_ids
        choices = chunk.choices
        if not choices:
            return None
        return self.choice(choices[0])

    def answer(self, data: bytes) -> tuple[EngineOutput, Usage | None, Any]:
        """A whole (non-stream) answer: its output (with its finish reason), its usage, and
        its ``kv_transfer_params`` (any value the engine sent, None when absent). Raises
        `WorkerGone` as `feed` does, and when the answer has no choices."""
        try:
            body = _ANSWER.decode(data)
        except (msgspec.MsgspecError, RecursionError) as exc:
            # RecursionError: nested about a thousand levels deep, even in a field not read.
            raise self.broken(f"sent an unreadable answer ({exc}): {data[:200]!r}") from None
        if not body.choices:
            raise self.broken(f"sent an answer without choices: {data[:200]!r}")
        self.choice(body.choices[0])
        return self.finish(), usage_from(body.usage), body.kv_transfer_params

    def choice(self, choice: Choice) -> EngineOutput | None:
        """One ``choices[0]`` (of a stream chunk or a whole answer)."""
        ids = choice.token_ids
        if ids is None:
            ids = []
            if choice.text and not self._text:
                raise self.broken(
                    "sent text without token_ids; interlock needs the generated token ids "
                    "(vLLM's return_token_ids, vLLM >= 0.10.2; other engines: see "
                    "docs/engines.md)"
                )
        tokens = tuple(ids)
        self.tokens += len(tokens)
        passed: dict[str, Any] | None = None
        if self._chat:
            text, passed = self._delta(choice.delta)
        else:
            text = choice.text if self._text else None
        reason = choice.finish_reason
        if reason is None:
            if not tokens and not text and passed is None:
                return None
            return EngineOutput(token_ids=tokens, text=text or None, chat_delta=passed)
        finish = _FINISH.get(reason)
        if finish is None:
            raise self.broken(f"ended the request with finish_reason={reason!r}")
        self._final = EngineOutput(
            token_ids=tokens, text=text or None, finish_reason=finish, chat_delta=passed
        )
        return None

    def _delta(self, delta: Any) -> tuple[str | None, dict[str, Any] | None]:
        """A chat delta's content, and its other fields to pass through (None when it has
        none: vLLM sends ``"tool_calls": []`` and nulls for what a delta lacks)."""
        if delta is None:
            return None, None
        if type(delta) is not dict:
            raise self.broken("sent a chat delta that is not an object")
        content = delta.get("content")
        if content is not None and type(content) is not str:
            raise self.broken(f"sent a chat delta whose content is not a string: {content!r:.80}")
        passed = {
            key: value
            for key, value in delta.items()
            if key not in _NOT_PASSED and value is not None and value != []
        }
        if not passed:
            return content, None
        calls = passed.get("tool_calls")
        if calls is not None and (
            type(calls) is not list
            or not all(type(c) is dict and type(c.get("index")) is int for c in calls)
        ):
            # The client merges tool-call deltas by index: without one they cannot be merged.
            raise self.broken(
                f"sent tool_calls that are not indexed tool-call deltas: {calls!r:.120}"
            )
        return content, passed

    def finish(self) -> EngineOutput:
        """The final output, once the body ended: raises `WorkerGone` if no finish reason came."""
        final = self._final
        if final is None:
            why = "ended the stream with [DONE]" if self.done else "closed the stream"
            raise self.broken(f"{why} without a finish_reason")
        self._final = None
        if self._usage is not None:
            return attrs.evolve(final, usage=self._usage)
        return final

    @property
    def finished(self) -> bool:
        """A finish reason arrived (the output is held until `finish`)."""
        return self._final is not None
