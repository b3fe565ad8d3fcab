"""OpenAI-style error bodies, and the one place that maps interlock's exceptions to statuses.

Client mistakes are 4xx with ``type: "invalid_request_error"`` and ``param`` naming the field.
Server-side conditions are 5xx and never blamed on the client: 503 when no worker can take the
request now (retry later), 502 when the worker serving it failed, 504 when it stopped making
progress. 429 (with ``Retry-After``) when every worker is at its in-flight limit and the queue is
full: overload, which a client retries. 500 is reserved for bugs:
interlock's (``internal_error``) or the server's own selection policy's
(``selection_policy_error``).
"""

from __future__ import annotations

import json
import math
from typing import Final

from .._errors import (
    ActorCrashed,
    EngineError,
    NoWorkersAvailable,
    Overloaded,
    PipelineClosed,
    PrefillFailed,
    RequestError,
    SelectionPolicyError,
    WorkerGone,
    WorkerRefused,
    WorkerStalled,
)
from ..processing import ChatTemplateError, TokenizerError

INVALID_REQUEST: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"


class HttpError(Exception):
    """An error answered as an OpenAI-style JSON body with ``status``.

    ``param`` names the offending field (``"messages[1].content"``, ``"nvext.token_data"``,
    or a header name such as ``"x-worker-instance-id"``); ``code`` is a stable machine-readable
    string or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        #: Extra response headers (``Retry-After`` on a 429).
        self.headers = headers

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> HttpError:
    return HttpError(400, message, param=param, code=code)


def http_error_for(
    exc: BaseException, *, field_prefix: str = "", preprocessing: bool = False
) -> HttpError:
    """The HTTP error for an exception raised while serving a request.

    ``preprocessing``: raised while turning the request into tokens, where a tokenizer or
    template error is the request's fault (400); later it is the server's (502).

    ``field_prefix`` is prepended to a `RequestError`'s field when it names a field of the
    translated request rather than of the HTTP body (kept empty when the names agree).
    """
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, RequestError):
        field = exc.field
        return HttpError(400, str(exc), param=field_prefix + field if field else None)
    if isinstance(exc, TokenizerError | ChatTemplateError):
        if preprocessing:
            # A template that rejects the conversation (raise_exception) or text that cannot be
            # encoded (a lone surrogate) is the request's fault; the message says what was wrong.
            return HttpError(
                400, str(exc), param="messages" if isinstance(exc, ChatTemplateError) else None
            )
        # Turning the worker's tokens into text failed: the worker and the tokenizer disagree.
        return HttpError(
            502,
            f"the worker's output could not be detokenized: {exc}",
            type=SERVER_ERROR,
            code="detokenization_failed",
        )
    if isinstance(exc, Overloaded):
        # Too many requests for the workers' capacity now: the client may retry (OpenAI's
        # clients honour Retry-After on a 429). 503 stays for "no worker can serve at all".
        return HttpError(
            429,
            str(exc),
            type=SERVER_ERROR,
            code="overloaded",
            headers=((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()),),
        )
    if isinstance(exc, NoWorkersAvailable):
        return HttpError(503, str(exc), type=SERVER_ERROR, code="no_workers_available")
    if isinstance(exc, PrefillFailed):
        return HttpError(503, str(exc), type=SERVER_ERROR, code="prefill_failed")
    if isinstance(exc, WorkerRefused):
        return HttpError(503, str(exc), type=SERVER_ERROR, code="worker_refused")
    if isinstance(exc, WorkerStalled):
        return HttpError(504, str(exc), type=SERVER_ERROR, code="worker_stalled")
    if isinstance(exc, WorkerGone):
        return HttpError(502, str(exc), type=SERVER_ERROR, code="worker_gone")
    if isinstance(exc, EngineError):
        return HttpError(502, str(exc), type=SERVER_ERROR, code="engine_error")
    if isinstance(exc, ActorCrashed):
        return HttpError(
            503, f"the router is restarting: {exc}", type=SERVER_ERROR, code="router_restarting"
        )
    if isinstance(exc, PipelineClosed):
        return HttpError(
            503, "the server is shutting down", type=SERVER_ERROR, code="shutting_down"
        )
    if isinstance(exc, SelectionPolicyError):
        # A bug in the server's own policy (Components.selection_policy), not the client's
        # doing; the message names the policy so its owner can find it.
        return HttpError(500, str(exc), type=SERVER_ERROR, code="selection_policy_error")
    return HttpError(
        500,
        f"internal error ({type(exc).__name__}); this is a bug in interlock, please report it",
        type=SERVER_ERROR,
        code="internal_error",
    )
