"""postprocessing='frontend' owns stop conditions; 'engine' passes the engine's output through."""

from __future__ import annotations

from helpers import prompt, run_request

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, mock_token_text
from interlock.wire import PreprocessedRequest

BASE = PreprocessedRequest(token_ids=prompt(16), max_tokens=10)


async def _reference() -> list[int]:
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(1)])) as p:
        return (await run_request(p, BASE))[0]


class _Recorder(MockEngine):
    """A mock engine that remembers the requests it was sent."""

    def __init__(self, instance_id: int) -> None:
        super().__init__(instance_id)
        self.seen: list[PreprocessedRequest] = []

    def open_stream(self, request: PreprocessedRequest):  # type: ignore[no-untyped-def]
        self.seen.append(request)
        return super().open_stream(request)


async def test_frontend_cuts_at_a_hidden_stop_token(autojump_clock: object) -> None:
    reference = await _reference()
    stop = reference[4]
    request = PreprocessedRequest(token_ids=prompt(16), max_tokens=10, stop_token_ids=[stop])
    worker = _Recorder(1)
    async with build_pipeline(PipelineConfig(), Components(workers=[worker])) as pipeline:
        tokens, final = await run_request(pipeline, request)
    assert tokens == reference[: reference.index(stop)]
    assert final.finish_reason == "stop"
    assert final.usage is not None and final.usage.completion_tokens == len(tokens)
    assert worker.seen[0].stop_token_ids == (), "frontend postprocessing sent stops to the engine"
    assert worker.requests_cancelled == 1, "the engine must stop once the frontend stopped"


async def test_min_tokens_defers_stop_tokens(autojump_clock: object) -> None:
    reference = await _reference()
    stop = reference[1]
    request = PreprocessedRequest(
        token_ids=prompt(16), max_tokens=10, stop_token_ids=[stop], min_tokens=5
    )
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(1)])) as pipeline:
        tokens, _ = await run_request(pipeline, request)
    assert tokens[:5] == reference[:5]


async def test_eos_is_ignored_with_ignore_eos(autojump_clock: object) -> None:
    reference = await _reference()
    eos = reference[2]
    request = PreprocessedRequest(
        token_ids=prompt(16), max_tokens=10, eos_token_ids=[eos], ignore_eos=True
    )
    async with build_pipeline(PipelineConfig(), Components(workers=[MockEngine(1)])) as pipeline:
        tokens, final = await run_request(pipeline, request)
    assert tokens == reference
    assert final.finish_reason == "length"


async def test_engine_postprocessing_passes_text_and_stops_through(
    autojump_clock: object,
) -> None:
    reference = await _reference()
    stop = reference[6]
    request = PreprocessedRequest(
        token_ids=prompt(16), max_tokens=10, stop_token_ids=[stop], detokenize=True
    )
    worker = _Recorder(1)
    config = PipelineConfig(postprocessing="engine")
    async with build_pipeline(config, Components(workers=[worker])) as pipeline:
        texts: list[str] = []
        async for output in pipeline.generate(request):
            texts.append(output.text or "")
            last = output
    assert worker.seen[0].stop_token_ids == (stop,)
    assert worker.seen[0].detokenize
    assert "".join(texts) == "".join(mock_token_text(t) for t in reference[:6])
    assert last.finish_reason == "stop"
