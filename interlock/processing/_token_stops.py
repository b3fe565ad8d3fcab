"""Token-level postprocessing: stop token ids, ``min_tokens`` and ``max_tokens``.

Under ``postprocessing='frontend'`` the frontend owns these conditions: the engine is sent
none of them and `TokenStops` cuts the stream. Under ``'engine'`` it only counts.
"""

from __future__ import annotations

import attrs

from ..wire import EngineOutput, PreprocessedRequest


class TokenStops:
    """Applies one request's token stop conditions to its outputs, across migrations.

    `process` returns the output to pass on (possibly cut short, with a finish_reason), or
    None when nothing is left to pass on. A stop token is hidden: it is not returned.
    """

    __slots__ = ("_enforce", "_max", "_min", "_stops", "count")

    def __init__(self, request: PreprocessedRequest, *, enforce: bool) -> None:
        self._enforce = enforce
        stops = set(request.stop_token_ids)
        if not request.ignore_eos:
            stops.update(request.eos_token_ids)
        self._stops = frozenset(stops)
        self._min = request.min_tokens
        self._max = request.max_tokens
        #: Tokens passed on so far.
        self.count = 0

    def process(self, output: EngineOutput) -> EngineOutput | None:
        tokens = output.token_ids
        if not self._enforce:
            self.count += len(tokens)
            return output
        stops = self._stops
        limit = self._max
        cut: int | None = None
        reason = None
        count = self.count
        for i, token in enumerate(tokens):
            if token in stops and count >= self._min:
                cut, reason = i, "stop"
                break
            count += 1
            if limit is not None and count >= limit:
                cut, reason = i + 1, "length"
                break
        if cut is None:
            self.count = count
            return output
        self.count = count
        if cut == len(tokens) and output.finish_reason == reason:
            return output
        return attrs.evolve(output, token_ids=tokens[:cut], finish_reason=reason)


def engine_leg_request(
    request: PreprocessedRequest, *, frontend_postprocessing: bool
) -> PreprocessedRequest:
    """The request as the engine should see it: under frontend postprocessing, without the
    stop conditions the frontend enforces itself; under engine postprocessing, asking for
    text."""
    if frontend_postprocessing:
        if request.stop_token_ids or request.eos_token_ids or request.min_tokens:
            return attrs.evolve(request, stop_token_ids=(), eos_token_ids=(), min_tokens=0)
        return request
    if not request.detokenize:
        return attrs.evolve(request, detokenize=True)
    return request
