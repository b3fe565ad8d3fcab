"""GAIE/llm-d's InferenceModelRewrite as ``[[model_rewrites]]``
(docs/gateway.md#model-rewrite-rules): a request naming a model a rule matches (exactly, else
the generic rule) goes to a target drawn by weight from a seeded generator, is picked and salted
as the target, recorded on its ``preprocess`` transition, counted per target, and answered under
the name the client sent.

The rules' checks and the draw as properties; the picker driven in-process under virtual time
with the messages Envoy sends; ``interlock serve`` over HTTP with the official ``openai``
client, in-process over mock engines serving LoRA adapters and as a real process reading the
rules from ``--config``.
"""

from __future__ import annotations

import json
import random
import re
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
import trio.testing
from helpers import frontend_parser
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_gateway_ext_proc import (
    body_back,
    chat_body,
    exchange,
    immediate,
    load_is_zero,
    picking,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)
from test_http_harness import serving
from test_lora_routing import serve
from test_overload_http import serving as serving_process

from interlock import Components, ConfigError, PipelineConfig, build_pipeline
from interlock._model_rewrites import INVALID_RULES, MAX_WEIGHT, ModelRewriteTarget
from interlock.cli import main as interlock_main
from interlock.engines.mock import MockEngine, MockTiming, mock_token_pool
from interlock.http import HttpMetrics, ModelRewrites, Preprocessor, build_app
from interlock.http._cli import resolve
from interlock.inspect._cli import main as inspect_main
from interlock.wire import ModelRewriteDecision

DESTINATION = "x-gateway-destination-endpoint"
TIMEOUT = 30.0

#: A canary: three in four requests for food-review go to adapter ad1, one to ad2.
CANARY = """\
[[model_rewrites]]
name = "food-review-canary"
matches = ["food-review"]
targets = [
  { model_rewrite = "ad1", weight = 3 },
  { model_rewrite = "ad2", weight = 1 },
]
"""


def rules(text: str) -> ModelRewrites:
    return ModelRewrites.from_table(tomllib.loads(text)["model_rewrites"])


def rule(name: str, matches: list[str], *targets: tuple[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "matches": matches,
        "targets": [{"model_rewrite": m, "weight": w} for m, w in targets],
    }


# -- the configuration ---------------------------------------------------------------------------


def test_serve_and_route_read_the_rules_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "interlock.toml"
    path.write_text('router_mode = "kv"\n' + CANARY)
    for command in ("serve", "route"):
        setup = resolve(frontend_parser().parse_args([command, "--config", str(path)]))
        assert setup.config.router_mode == "kv"  # the array holds no knobs
        (canary,) = setup.model_rewrites.rules
        assert canary.name == "food-review-canary" and canary.matches == ("food-review",)
        assert canary.targets == (ModelRewriteTarget("ad1", 3), ModelRewriteTarget("ad2", 1))
    assert not resolve(frontend_parser().parse_args(["serve"])).model_rewrites


def test_targets_without_weights_share_equally() -> None:
    even = rules('[[model_rewrites]]\nname = "r"\ntargets = [{ model_rewrite = "a" }, '
                 '{ model_rewrite = "b" }]\n')  # fmt: skip
    assert [t.weight for t in even.rules[0].targets] == [1, 1]


GOOD = rule("a", ["x"], ("t", 1))
BAD_TABLES = [
    (3, r"\[\[model_rewrites\]\] must be an array of tables"),
    ({"name": "a"}, "must be an array of tables"),
    ([{"matches": ["x"], "targets": [{"model_rewrite": "t"}]}], "name must be a non-empty"),
    ([GOOD, {**GOOD, "matches": ["y"]}], "'a': another rule has this name"),
    ([{**GOOD, "match": ["x"]}], "unknown key 'match'; did you mean 'matches'"),
    ([{**GOOD, "matches": "x"}], "matches must be a list of model names"),
    ([{**GOOD, "matches": ["x", "x"]}], "matches names 'x' twice"),
    ([{**GOOD, "matches": [""]}], "matches must be a list of model names"),
    ([{"name": "a", "matches": ["x"]}], "targets must be a non-empty array"),
    ([{**GOOD, "targets": []}], "targets must be a non-empty array"),
    ([{**GOOD, "targets": ["t"]}], r"targets\[0\] must be a table"),
    (
        [{**GOOD, "targets": [{"model": "t"}]}],
        r"unknown key 'model' \(the keys are model_rewrite, weight\)",
    ),
    ([{**GOOD, "targets": [{"weight": 1}]}], "model_rewrite must name the model"),
    ([rule("a", ["x"], ("t", -1))], r"targets\[0\]: weight must be a whole number from 0"),
    ([rule("a", ["x"], ("t", MAX_WEIGHT + 1))], "weight must be a whole number"),
    ([rule("a", ["x"], ("t", 1.5))], "weight must be a whole number"),  # type: ignore[arg-type]
    ([rule("a", ["x"], ("t", True))], "weight must be a whole number"),
    ([rule("a", ["x"], ("t", 0), ("u", 0))], "every target's weight is 0"),
    (
        [{**GOOD, "targets": [{"model_rewrite": "t", "weight": 1}, {"model_rewrite": "u"}]}],
        "some targets have a weight and some do not",
    ),
    ([rule("a", ["x"], ("t", 1), ("t", 2))], r"'t' is a target twice"),
    ([rule("a", [], ("t", 1)), rule("b", [], ("u", 1))], "'b': a second rule without matches"),
    ([rule("a", ["x"], ("t", 1)), rule("b", ["y", "x"], ("u", 1))], "'b': matches 'x'.*'a'"),
]


def test_rules_built_in_python_are_checked_as_a_file_is() -> None:
    # The lookups are built once, in the constructor, which refuses a rule that would
    # never apply as `from_table` does (it only adds the file to the message).
    rules = ModelRewrites.from_table([rule("a", ["x"], ("t", 1)), rule("b", [], ("u", 1))]).rules
    with pytest.raises(ConfigError, match=r"^\[\[model_rewrites\]\] 'c': matches 'x'.*'a'"):
        ModelRewrites((rules[0], attrs.evolve(rules[0], name="c")))
    with pytest.raises(ConfigError, match=r"'c': a second rule without matches.*'b' is one"):
        ModelRewrites((rules[1], attrs.evolve(rules[1], name="c")))
    assert ModelRewrites(rules).rule_for("x") is rules[0]
    assert ModelRewrites(rules).rule_for("y") is rules[1]


def test_a_rule_built_in_python_naming_a_model_twice_is_told_so() -> None:
    # `from_table` says "matches names 'x' twice; name it once"; the constructor, which now
    # checks rules built in Python, tells the same rule matching a model twice as if a second
    # rule (itself) matched it, with the fix for two rules ("name each model in one rule").
    (built,) = ModelRewrites.from_table([rule("a", ["x"], ("t", 1))]).rules
    twice = attrs.evolve(built, matches=("x", "x"))
    with pytest.raises(ConfigError) as refused:
        ModelRewrites((twice,))
    assert "twice" in str(refused.value), str(refused.value)
    assert "which the rule 'a' matches already" not in str(refused.value)


def test_two_rules_built_in_python_with_one_name_are_told_so_as_a_file_is() -> None:
    # The name labels the rule's metric and its transition records: two rules of one name
    # would share them. Only `from_table` refused them; the constructor does now, with the
    # same message (`from_table` adds the file), and before the checks that a second copy of
    # one rule would fail (it matches the same models).
    one, other = ModelRewrites.from_table(
        [rule("a", ["x"], ("t", 1)), rule("b", ["y"], ("u", 1))]
    ).rules
    message = "[[model_rewrites]] 'a': another rule has this name; give each rule its own"
    for rules in [(one, attrs.evolve(other, name="a")), (one, one)]:
        with pytest.raises(ConfigError) as refused:
            ModelRewrites(rules)
        assert str(refused.value) == message
        assert refused.value.knobs == ("model_rewrites",)
    with pytest.raises(ConfigError) as refused:
        ModelRewrites.from_table([rule("a", ["x"], ("t", 1)), rule("a", ["y"], ("u", 1))], "r.toml")
    assert str(refused.value) == f"r.toml: {message}"


@pytest.mark.parametrize(("table", "message"), BAD_TABLES)
def test_a_bad_rule_is_a_config_error_naming_the_file_rule_and_key(
    table: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        ModelRewrites.from_table(table, "rules.toml")
    assert caught.value.knobs == ("model_rewrites",)
    assert str(caught.value).startswith("rules.toml: [[model_rewrites]]")


def test_the_commands_refuse_a_bad_rule_before_anything_starts(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CANARY.replace("weight = 1", "weight = -1"))
    for command in ("serve", "route"):
        with pytest.raises(ConfigError, match=r"targets\[1\]: weight must be") as caught:
            resolve(frontend_parser().parse_args([command, "--config", str(path)]))
        assert str(caught.value).startswith(f"{path}: [[model_rewrites]] 'food-review-canary'")


@pytest.mark.parametrize(("what", "example"), INVALID_RULES, ids=[w for w, _ in INVALID_RULES])
def test_every_invalid_rule_the_reference_shows_is_refused(what: str, example: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelRewrites.from_table(tomllib.loads(example)["model_rewrites"])
    assert caught.value.knobs == ("model_rewrites",), what


DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_gateway_pages_example_is_a_valid_configuration(tmp_path: Path) -> None:
    # docs/gateway.md's [[model_rewrites]] example, as a user would save it.
    text = (DOCS / "gateway.md").read_text(encoding="utf-8")
    (example,) = [
        block
        for block in re.findall(r"^```toml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
        if "[[model_rewrites]]" in block
    ]
    path = tmp_path / "interlock.toml"
    path.write_text(example)
    found = resolve(frontend_parser().parse_args(["route", "--config", str(path)])).model_rewrites
    assert [r.name for r in found.rules] == ["food-review-canary", "everything-else"]
    # What the page says of it: three in four to ad1, the rest to ad2; other models to the base.
    assert found.rule_for("food-review").targets == (  # type: ignore[union-attr]
        ModelRewriteTarget("ad1", 3),
        ModelRewriteTarget("ad2", 1),
    )
    assert found.rule_for("anything").name == "everything-else"  # type: ignore[union-attr]


# -- matching and the draw ------------------------------------------------------------------


def test_an_exact_match_beats_the_generic_rule_wherever_it_is_listed() -> None:
    generic, exact = rule("any", [], ("base", 1)), rule("x", ["x", "y"], ("t", 1))
    for order in ([generic, exact], [exact, generic]):
        found = ModelRewrites.from_table(order)
        assert found.rule_for("x").name == "x" and found.rule_for("y").name == "x"  # type: ignore[union-attr]
        assert found.rule_for("z").name == "any"  # type: ignore[union-attr]
    assert ModelRewrites.from_table([exact]).rule_for("z") is None


class Draws(random.Random):
    """A generator whose ``randrange`` gives ``draws`` in turn (the rule asks for one each)."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__(0)
        self._draws: Iterator[int] = iter(draws)

    def randrange(self, stop: int, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        draw = next(self._draws)
        assert 0 <= draw < stop
        return draw


def test_a_draw_picks_the_first_target_whose_running_weight_exceeds_it() -> None:
    # llm-d's rule: a draw in [0, total); weights 2, 0, 1 cover [0, 2) and [2, 3).
    found = ModelRewrites.from_table([rule("r", ["x"], ("a", 2), ("z", 0), ("c", 1))])
    draws = Draws([0, 1, 2])
    picks = [found.choose("x", draws) for _ in range(3)]
    assert [p.target for p in picks if p is not None] == ["a", "a", "c"]
    assert picks[2] == ModelRewriteDecision(
        rule="r", model="x", target="c", weight=1, total_weight=3
    )
    assert found.choose("y", Draws([])) is None  # no rule: no draw taken


WEIGHTS = st.lists(st.integers(0, 50), min_size=1, max_size=5).filter(any)


@given(weights=WEIGHTS, seed=st.integers(0, 2**32))
def test_the_split_follows_the_weights_and_a_seed_repeats_it(weights: list[int], seed: int) -> None:
    found = ModelRewrites.from_table(
        [rule("r", ["x"], *((f"t{i}", w) for i, w in enumerate(weights)))]
    )
    draws = 2000
    rng = random.Random(seed)
    picks = [found.choose("x", rng) for _ in range(draws)]
    counts = Counter(p.target for p in picks if p is not None)
    total = sum(weights)
    for index, weight in enumerate(weights):
        share = weight / total
        got = counts[f"t{index}"]
        if weight == 0:
            assert got == 0, f"t{index} has weight 0 and was drawn {got} times"
            continue
        # Six standard deviations of the binomial: a seeded run, so no flakiness either way.
        spread = 6 * (draws * share * (1 - share)) ** 0.5 + 1
        assert abs(got - draws * share) <= spread, (weights, index, got)
    again = random.Random(seed)
    assert [found.choose("x", again) for _ in range(draws)] == picks


# -- through the endpoint picker ------------------------------------------------------------------


def answer_body(model: str) -> bytes:
    return json.dumps({"id": "c", "model": model, "choices": [{"text": model}]}).encode()


def rewrites_of(p: Any) -> dict[str, ModelRewriteDecision]:
    return {
        r.request_id: r.decision
        for r in p.pipeline.transition_log.records()
        if r.trigger == "preprocess" and r.decision is not None
    }


@settings(max_examples=8)
@given(weights=st.tuples(st.integers(0, 3), st.integers(1, 3)), seed=st.integers(0, 1000))
async def test_each_pick_goes_where_its_drawn_target_is_served(
    autojump_clock: trio.testing.MockClock, weights: tuple[int, int], seed: int
) -> None:
    canary = ModelRewrites.from_table(
        [rule("canary", ["food-review"], ("ad1", weights[0]), ("ad2", weights[1]))]
    )
    config = PipelineConfig(routing="query_only", router_mode="kv", router_seed=seed)
    async with picking(config, model_rewrites=canary) as p:
        serve(p, {1: "ad1", 2: "ad2", 3: "ad1,ad2"})
        served = {"ad1": {p.endpoint(1), p.endpoint(3)}, "ad2": {p.endpoint(2), p.endpoint(3)}}
        for n in range(4):
            answers = await exchange(
                p.picker,
                [
                    request_headers(extra=[("x-request-id", f"r{n}")]),
                    request_body(chat_body(model="food-review"), True),
                ],
            )
            decision = rewrites_of(p)[f"r{n}"]
            assert decision.model == "food-review" and decision.rule == "canary"
            if weights[0] == 0:
                assert decision.target == "ad2"
            forwarded, _, _ = body_back(answers)
            assert json.loads(forwarded)["model"] == decision.target
            headers = set_headers(answers[0], "request_headers")
            # The pick and its fallbacks: engines serving the target only.
            assert set(headers[DESTINATION].split(",")) <= served[decision.target]
            assert headers["content-length"] == str(len(forwarded))
        assert await load_is_zero(p.pipeline)


ONE_WAY = ModelRewrites.from_table([rule("review", ["food-review"], ("ad1", 1))])


async def test_the_picker_forwards_the_target_and_restores_the_clients_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(model_rewrites=ONE_WAY) as p:
        serve(p, {2: "ad1"})
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=[("x-request-id", "r")]),
                request_body(chat_body(model="food-review"), True),
                response_headers(),
                response_body(answer_body("ad1")[:20]),
                response_body(answer_body("ad1")[20:], True),
            ],
        )
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(2)
        assert json.loads(body_back(answers)[0])["model"] == "ad1"
        back = b"".join(
            r.response_body.response.body_mutation.streamed_response.body
            for r in answers
            if r.WhichOneof("response") == "response_body"
        )
        # The field names the client's model; the text that says "ad1" stays.
        assert json.loads(back) == {"id": "c", "model": "food-review", "choices": [{"text": "ad1"}]}
        assert rewrites_of(p)["r"] == ModelRewriteDecision(
            rule="review", model="food-review", target="ad1", weight=1, total_weight=1
        )
        metrics = p.picker.frontend.metrics.render().decode()
        assert (
            'interlock_model_rewrite_decisions_total{model_name="food-review",'
            'model_rewrite_name="review",target_model="ad1"} 1.0'
        ) in metrics
        assert await load_is_zero(p.pipeline)


async def test_a_rule_for_the_bodys_model_wins_over_the_rewrite_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As llm-d's picker: the header sets the target, and a rule for the body's model replaces it.
    async with picking(model_rewrites=ONE_WAY) as p:
        serve(p, {2: "ad1", 3: "ad2"})
        header = [("x-llm-d-model-name-rewrite", "ad2")]
        answers = await exchange(
            p.picker,
            [request_headers(extra=header), request_body(chat_body(model="food-review"), True)],
        )
        assert json.loads(body_back(answers)[0])["model"] == "ad1"
        # No rule for the body's model: the header's name stands, and nothing is recorded.
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=[*header, ("x-request-id", "h")]),
                request_body(chat_body(), True),
            ],
        )
        assert json.loads(body_back(answers)[0])["model"] == "ad2"
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(3)
        assert "h" not in rewrites_of(p)
        assert await load_is_zero(p.pipeline)


async def test_a_target_not_served_now_is_a_404_naming_the_rule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Checked per request, not at start: the engine serving ad1 may come (and go) later.
    async with picking(model_rewrites=ONE_WAY) as p:
        status, error = immediate(
            await exchange(
                p.picker, [request_headers(), request_body(chat_body(model="food-review"), True)]
            )
        )
        assert status == 404 and error["error"]["code"] == "model_not_found"
        assert error["error"]["message"].startswith(
            "the model_rewrites rule 'review' sent this request for 'food-review' to 'ad1', "
            "which does not exist; this pool serves 'mock'"
        )
        serve(p, {1: "ad1"})
        answers = await exchange(
            p.picker, [request_headers(), request_body(chat_body(model="food-review"), True)]
        )
        assert set_headers(answers[0], "request_headers")[DESTINATION] == p.endpoint(1)
        assert await load_is_zero(p.pipeline)


async def test_a_rule_sending_a_model_to_itself_leaves_the_body_as_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A canary's stable share: the body names the target already, so it passes byte for byte
    # (and the response is not touched); the rule is still recorded.
    stable = ModelRewrites.from_table([rule("stay", ["mock"], ("mock", 1))])
    sent = b'{ "model" : "mock",  "messages": [{"role": "user", "content": "as sent"}] }'
    async with picking(model_rewrites=stable) as p:
        answers = await exchange(
            p.picker, [request_headers(extra=[("x-request-id", "s")]), request_body(sent, True)]
        )
        assert body_back(answers)[0] == sent
        assert rewrites_of(p)["s"].target == "mock"
        assert await load_is_zero(p.pipeline)


# -- through interlock serve ----------------------------------------------------------------


async def test_serve_runs_a_rewritten_request_on_the_targets_engine_and_answers_as_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "transitions.jsonl"
    config = PipelineConfig(router_mode="round_robin", router_seed=7, transition_log_path=str(log))
    async with serving(config, workers=3, model_rewrites=rules(CANARY)) as served:
        for engine, adapters in zip(served.workers, ("ad1", "ad2", ""), strict=True):
            engine.adapters = frozenset(a for a in [adapters] if a)  # type: ignore[attr-defined]

        def calls() -> tuple[list[Any], list[Any]]:
            with openai.OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0) as client:
                answers = [
                    client.chat.completions.create(
                        model="food-review",
                        messages=[{"role": "user", "content": f"review {n}"}],
                        max_tokens=3,
                    )
                    for n in range(6)
                ]
                stream = client.completions.create(
                    model="food-review", prompt="stream it", max_tokens=3, stream=True
                )
                return answers, list(stream)

        answers, chunks = await trio.to_thread.run_sync(calls)
        assert {a.model for a in answers} == {"food-review"}
        assert chunks and {c.model for c in chunks} == {"food-review"}
        records = served.pipeline.transition_log.records()
        drawn = {r.request_id: r.decision for r in records if r.trigger == "preprocess"}
        routed = {r.request_id: r.worker_id for r in records if r.trigger == "route"}
        engine_of = {"ad1": 1, "ad2": 2}
        for answer in answers:
            decision = drawn[answer.id]
            assert decision.model == "food-review" and decision.rule == "food-review-canary"
            assert routed[answer.id] == engine_of[decision.target]
        counted = Counter(d.target for d in drawn.values())
        async with httpx.AsyncClient(base_url=served.url) as http:
            text = (await http.get("/metrics")).text
        for target, count in counted.items():
            assert (
                'interlock_model_rewrite_decisions_total{model_name="food-review",'
                f'model_rewrite_name="food-review-canary",target_model="{target}"}} {count}.0'
            ) in text
        first = answers[0]
    # interlock inspect --request shows the rule's choice.
    assert inspect_main([str(log), "--request", first.id]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    target = drawn[first.id].target
    assert re.search(
        rf"Model rewrite: rule 'food-review-canary' sent this request for 'food-review' to "
        rf"'{target}' \(weight \d of 4\)",
        shown,
    ), shown


async def test_interlock_serve_reads_the_rules_from_its_config_and_answers_as_asked(
    tmp_path: Path,
) -> None:
    # The real command: the rules from --config, the official client, the counter on /metrics.
    path = tmp_path / "interlock.toml"
    path.write_text(
        """\
router_seed = 3
[[model_rewrites]]
name = "alias"
matches = ["food-review"]
targets = [{ model_rewrite = "mock" }]
[[model_rewrites]]
name = "gone"
matches = ["old"]
targets = [{ model_rewrite = "retired-adapter" }]
"""
    )
    async with serving_process("--config", str(path), "--workers", "1") as url:

        def calls() -> tuple[Any, str]:
            with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
                answer = client.chat.completions.create(
                    model="food-review", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                with pytest.raises(openai.NotFoundError) as refused:
                    client.completions.create(model="old", prompt="hi", max_tokens=2)
                return answer, str(refused.value)

        answer, refused = await trio.to_thread.run_sync(calls)
        assert answer.model == "food-review"
        assert (
            "the model_rewrites rule 'gone' sent this request for 'old' to 'retired-adapter'"
        ) in refused
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            text = (await http.get("/metrics")).text
        assert (
            'interlock_model_rewrite_decisions_total{model_name="food-review",'
            'model_rewrite_name="alias",target_model="mock"} 1.0'
        ) in text


@pytest.mark.parametrize("target", ["ad1", "mock"], ids=["to-an-adapter", "to-the-base-model"])
async def test_a_rewritten_request_is_traced_under_the_clients_name_whatever_its_target(
    autojump_clock: trio.testing.MockClock, target: str
) -> None:
    # The SERVER span's gen_ai.request.model is the name the client asked for when a rule
    # sends it to an adapter; a rule sending it to the base model must not make it
    # --model-name instead (the same request, traced differently by where the draw went).
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    preprocessor = Preprocessor.default()
    engine = MockEngine(
        1,
        "agg",
        token_pool=mock_token_pool(preprocessor.tokenizer),
        tokenizer=preprocessor.tokenizer,
        timing=MockTiming.zero(),
    )
    engine.adapters = frozenset({"ad1"})  # type: ignore[attr-defined]
    metrics = HttpMetrics()
    components = Components(
        workers=[engine],
        tokenizer=preprocessor.tokenizer,
        transition_sinks=[metrics],
        tracer_provider=provider,
    )
    alias = ModelRewrites.from_table([rule("alias", ["food-review"], (target, 1))])
    async with build_pipeline(PipelineConfig(), components) as pipeline:
        app = build_app(pipeline, preprocessor=preprocessor, metrics=metrics, model_rewrites=alias)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "food-review",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
            )
    assert answer.status_code == 200 and answer.json()["model"] == "food-review"
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert (server.attributes or {})["gen_ai.request.model"] == "food-review", target
    # The model that ran is the target, on the SERVER span as the response's model and on the
    # engine leg (a CLIENT span: its request to the engine names the target), the same way
    # for an adapter and for the base model.
    assert (server.attributes or {})["gen_ai.response.model"] == target
    assert (server.attributes or {})["interlock.model_rewrite_name"] == "alias"
    legs = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert [leg.name for leg in legs] == [f"chat {target}"]
    assert [(leg.attributes or {})["gen_ai.request.model"] for leg in legs] == [target]


def test_config_check_refuses_a_file_whose_rules_serve_and_route_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `interlock config check FILE` "validates one" (docs/configuration.md, the page that
    # documents [[model_rewrites]]); saying "valid" for a file serve then refuses at start
    # defeats the check.

    path = tmp_path / "interlock.toml"
    path.write_text(CANARY.replace("weight = 1", "weight = -1"))
    with pytest.raises(ConfigError):
        resolve(frontend_parser().parse_args(["serve", "--config", str(path)]))
    assert interlock_main(["config", "check", str(path)]) == 2, capsys.readouterr().out


async def test_an_empty_model_name_is_a_400_in_the_picker_with_a_generic_rule_as_in_serve(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # `"model": ""` names no model: the picker answers 400 without rules, and interlock serve
    # answers 400 with the same generic rule (it checks the body before drawing). A generic
    # rule must not turn the bad body into one served under the rule's target.
    generic = ModelRewrites.from_table([rule("all", [], ("mock", 1))])
    body = json.loads(chat_body())
    body["model"] = ""
    async with picking(model_rewrites=generic) as p:
        answers = await exchange(
            p.picker,
            [request_headers(), request_body(json.dumps(body).encode(), True)],
        )
        assert answers[0].WhichOneof("response") == "immediate_response", body_back(answers)[0]
        status, error = immediate(answers)
        assert status == 400 and error["error"]["param"] == "model", (status, error)
        assert await load_is_zero(p.pipeline)
