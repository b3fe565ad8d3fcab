"""Exceptions raised by the preprocessing/postprocessing layer."""

from __future__ import annotations

from .._errors import InterlockError, RequestError

__all__ = ["ChatMessageError", "ChatTemplateError", "TokenizerError"]


class TokenizerError(InterlockError):
    """A tokenizer could not be loaded, or was asked to encode or decode invalid input.

    The message names the file or the offending input and says what to do about it.
    """


class ChatTemplateError(InterlockError):
    """A chat template failed to compile or to render.

    Rendering fails when the template calls ``raise_exception`` (it rejected the conversation),
    uses a variable in a way that needs it to be defined, tries an operation the sandbox forbids,
    or raises anything else. The message names the template and, when known, the template line.
    """


class ChatMessageError(ChatTemplateError, RequestError):
    """A chat message does not have the shape a chat template may rely on.

    ``field`` is the path of the offending value, e.g. ``"messages[2].content"``. It is a
    `RequestError` too: the request is at fault, not the template.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
