"""The exception types every part of interlock raises.

Each is narrow on purpose: a caller can tell a bad request from a bad configuration from a worker
that went away, and the message says what was wrong and what to change.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, choices: Iterable[str], *, n: int = 1) -> str:
    """The suggestion an error about an unknown ``word`` ends with: ``"; did you mean 'x'?"``
    naming the (up to ``n``) closest of ``choices``, or ``""`` when none is close. Pure."""
    close = difflib.get_close_matches(str(word), list(choices), n=n)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


class InterlockError(Exception):
    """Base class of every error interlock raises on purpose."""


class ConfigError(InterlockError, ValueError):
    """An invalid configuration: a bad value, an unknown key, or knobs that cannot go together.

    Raised by `PipelineConfig` construction and loading, `PipelineConfig.validate` and
    `build_pipeline`, always before anything starts. ``knobs`` names the settings involved.
    """

    def __init__(self, message: str, *, knobs: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.knobs = knobs


class RequestError(InterlockError, ValueError):
    """A request that cannot be served as given; ``field`` names the offending field.

    Raised before any worker sees the request, so nothing else is disturbed.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class NoWorkersAvailable(InterlockError):
    """No registered worker can take the request (none registered, or every one excluded).

    An HTTP frontend maps this to 503: the request was fine, the cluster was not ready.
    """


class EngineError(InterlockError):
    """A worker failed to serve a request. ``worker_id`` names it."""

    def __init__(self, message: str, *, worker_id: int) -> None:
        super().__init__(message)
        self.worker_id = worker_id


class WorkerGone(EngineError):
    """A stream broke before its final output: the worker crashed, disconnected or stalled.

    Migration handles it when enabled; otherwise (or once the limit is spent) it reaches the
    caller after every token that did arrive.
    """


class WorkerStalled(WorkerGone):
    """A stream stopped making progress: no first token within ``first_token_timeout``, or no
    output for ``engine_idle_timeout`` after it (a frozen engine, a stopped process, a network
    that drops packets without closing). Migrates like any broken stream, and the router
    leaves the worker out of routing for ``outlier_ejection_time``.
    """


class Overloaded(InterlockError):
    """Every worker that could take the request is at its in-flight limit
    (``max_inflight_per_worker``) and the frontend's queue is full (``max_queued_requests``),
    or the request is sheddable (negative priority) and could not start at once.

    Nothing was started: retry after ``retry_after`` seconds. An HTTP frontend answers 429
    with a ``Retry-After`` header.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WorkerRefused(EngineError):
    """A worker refused to open a new stream (draining, overloaded, or down).

    Nothing was generated, so the request may be sent elsewhere.
    """


class PrefillFailed(InterlockError):
    """The prefill leg of a disaggregated request failed under ``enforce_disagg=True``,
    or no prefill worker was available for it."""


class SelectionPolicyError(InterlockError):
    """The selection policy given as ``Components(selection_policy=...)`` misbehaved while
    choosing a worker for this request: it raised, returned something other than a
    `SelectionRecord` for the leg asked, or chose a worker that was not among its candidates.

    Only this request fails; the Router actor carries on with the next one. ``policy`` is the
    policy's ``name``, ``leg`` the leg it was choosing for, ``candidates`` the worker ids it was
    offered; ``__cause__`` is the policy's own exception when it raised. An HTTP frontend maps
    this to 500: it is a bug in the server's policy, not the client's doing.
    """

    def __init__(
        self, message: str, *, policy: str, leg: str, candidates: tuple[int, ...] = ()
    ) -> None:
        super().__init__(message)
        self.policy = policy
        self.leg = leg
        self.candidates = candidates


class ActorCrashed(InterlockError):
    """An actor crashed while handling this message; the supervisor is restarting it.

    ``__cause__`` is the actor's original error.
    """


class PipelineClosed(InterlockError):
    """The pipeline (or the actor asked) has shut down; no new work is accepted."""


class IllegalTransition(InterlockError):
    """A request tried a transition its mode's graph does not have. This is always a bug."""

    def __init__(self, message: str, *, request_id: str, state: str, trigger: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.state = state
        self.trigger = trigger
