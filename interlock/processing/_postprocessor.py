"""Postprocessing of one request's outputs: stop token ids, ``min_tokens``, ``max_tokens``,
incremental detokenization and stop strings.

Under ``postprocessing='frontend'`` the frontend owns all of it: the engine is sent none of the
stop conditions and `Postprocessor` cuts the stream. Under ``'engine'`` it only counts tokens.
"""

from __future__ import annotations

import attrs

from ..wire import EngineOutput, FinishReason, PreprocessedRequest
from ._detokenizer import IncrementalDetokenizer
from ._stop import StopStringMatcher
from ._tokenizer import Tokenizer


class Postprocessor:
    """Applies one request's stop conditions to its outputs and turns tokens into text, across
    migrations (one instance lives as long as the request).

    `process` returns the output to pass on (cut short, with a finish_reason, when a stop
    condition hit), or None when there is nothing to pass on yet. A stop token is hidden: it
    is not returned. Text held back (an unfinished UTF-8 character, a possible stop string)
    is released with the final output.
    """

    __slots__ = ("_detok", "_enforce", "_max", "_min", "_stop_text", "_stops", "count")

    def __init__(
        self,
        request: PreprocessedRequest,
        *,
        enforce: bool,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self._enforce = enforce
        stops = set(request.stop_token_ids)
        if not request.ignore_eos:
            stops.update(request.eos_token_ids)
        self._stops = frozenset(stops)
        self._min = request.min_tokens
        self._max = request.max_tokens
        self._detok: IncrementalDetokenizer | None = None
        self._stop_text: StopStringMatcher | None = None
        if enforce and request.detokenize:
            if tokenizer is None:
                raise ValueError("detokenizing needs a tokenizer")
            self._detok = IncrementalDetokenizer(tokenizer, prompt_ids=request.token_ids)
            if request.stop:
                self._stop_text = StopStringMatcher(
                    request.stop, include_stop_str_in_output=request.include_stop_str_in_output
                )
        #: Tokens passed on so far.
        self.count = 0

    def set_ids_checked(self, checked: bool) -> None:
        """Say whether the outputs about to be processed hold only ids in the tokenizer's
        vocabulary (their engine's worker proved it at its handshake: `RemoteEngine`'s
        ``vocab_checked``); True skips the per-token range check when detokenizing. Set per
        engine leg: a migrated request may continue on an engine without that proof."""
        if self._detok is not None:
            self._detok.ids_checked = checked

    def process(self, output: EngineOutput) -> EngineOutput | None:
        tokens = output.token_ids
        if not self._enforce:
            self.count += len(tokens)
            return output
        stops = self._stops
        limit = self._max
        cut: int | None = None
        reason: FinishReason | None = output.finish_reason
        count = self.count
        for i, token in enumerate(tokens):
            if token in stops and count >= self._min:
                cut, reason = i, "stop"
                break
            count += 1
            if limit is not None and count >= limit:
                cut, reason = i + 1, "length"
                break
        self.count = count
        if cut is not None:
            tokens = tokens[:cut]
        if self._detok is None:
            if tokens is output.token_ids and reason == output.finish_reason:
                return output
            return attrs.evolve(output, token_ids=tokens, finish_reason=reason)
        return self._with_text(output, tokens, reason)

    def _with_text(
        self, output: EngineOutput, tokens: tuple[int, ...], reason: FinishReason | None
    ) -> EngineOutput | None:
        assert self._detok is not None
        text = self._detok.push(tokens)
        if reason is not None:
            text += self._detok.flush()
        matcher = self._stop_text
        if matcher is not None:
            text, stopped = matcher.push(text)
            if stopped:
                reason = "stop"
            elif reason is not None:
                text += matcher.flush()
        if not tokens and not text and reason is None:
            return None
        # Built directly: attrs.evolve introspects the class on every call, per token here.
        return EngineOutput(
            token_ids=tokens,
            text=text,
            finish_reason=reason,
            usage=output.usage,
            prefill_result=output.prefill_result,
        )


def engine_leg_request(
    request: PreprocessedRequest, *, frontend_postprocessing: bool
) -> PreprocessedRequest:
    """The request as the engine should see it: under frontend postprocessing, without the stop
    conditions and detokenization the frontend does itself; under engine postprocessing,
    unchanged."""
    if frontend_postprocessing and (
        request.stop_token_ids
        or request.eos_token_ids
        or request.min_tokens
        or request.detokenize
        or request.stop
    ):
        return attrs.evolve(
            request,
            stop_token_ids=(),
            eos_token_ids=(),
            min_tokens=0,
            detokenize=False,
            stop=(),
            include_stop_str_in_output=False,
        )
    return request
