"""What a worker sends back: `EngineOutput` chunks."""

from __future__ import annotations

from typing import Literal

import attrs

from ._request import PrefillResult

FinishReason = Literal["stop", "length", "cancelled", "error"]


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
