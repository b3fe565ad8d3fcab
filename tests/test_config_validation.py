"""Configuration: each knob checked on its own, the combination rules, and loading from TOML,
dicts and the environment. Every failure is a `ConfigError` naming the knobs involved."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import attrs
import pytest
from helpers import frontend_parser
from hypothesis import given
from hypothesis import strategies as st

from interlock import (
    COMBINATION_RULES,
    CombinationRule,
    Components,
    ConfigError,
    PipelineConfig,
    build_pipeline,
)
from interlock._config import (
    Postprocessing,
    Preprocessing,
    RouterMode,
    Routing,
    knob_names,
    parse_knob_text,
)
from interlock.cli import main as interlock_main
from interlock.http._cli import resolve

FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in attrs.fields(PipelineConfig)}
INT_FIELDS = sorted(name for name, kind in FIELD_TYPES.items() if kind.startswith("int"))
FLOAT_FIELDS = sorted(name for name, kind in FIELD_TYPES.items() if kind.startswith("float"))

# One value of the wrong type per knob (the table must list every knob: see the first test).
WRONG_TYPE: dict[str, Any] = {
    "preprocessing": 3,
    "postprocessing": None,
    "routing": 3,
    "router_mode": 1.5,
    "direct_worker_id": "3",
    "migration_limit": 1.0,
    "migration_max_seq_len": "4096",
    "enforce_disagg": "yes",
    "allow_request_worker_ids": 1,
    "kv_block_size": 16.0,
    "overlap_score_weight": "1",
    "router_temperature": None,
    "kv_events": "false",
    "kv_approx_ttl": "120",
    "kv_approx_max_blocks": 1e6,
    "router_seed": 0.5,
    "engine_idle_timeout": "10",
    "first_token_timeout": "30",
    "outlier_ejection_time": None,
    "outlier_failures": 5.0,
    "max_inflight_per_worker": "8",
    "max_queued_requests": 1.5,
    "actor_max_restarts": 5.0,
    "actor_restart_window": [10.0],
    "actor_restart_backoff": "0.01",
    "transition_log_capacity": 1.5,
    "transition_log_memory_bytes": "32MiB",
    "transition_log_path": 42,
    "transition_log_max_bytes": "1MB",
    "transition_log_backups": 2.0,
}

# One value of the right type that is out of range, for every knob that has a range. Knobs not
# listed accept every value of their type (bools, any int seed, any path).
OUT_OF_RANGE: dict[str, Any] = {
    "preprocessing": "gpu",
    "postprocessing": "client",
    "routing": "discovr",
    "router_mode": "round_robbin",
    "direct_worker_id": -1,
    "migration_limit": -1,
    "migration_max_seq_len": 0,
    "kv_block_size": 0,
    "overlap_score_weight": -0.5,
    "router_temperature": -1e-9,
    "engine_idle_timeout": -1.0,
    "first_token_timeout": -1.0,
    "outlier_ejection_time": -1.0,
    "outlier_failures": 0,
    "max_inflight_per_worker": -1,
    "max_queued_requests": -1,
    "actor_max_restarts": -1,
    "actor_restart_window": -0.001,
    "actor_restart_backoff": -0.01,
    "transition_log_capacity": 0,
    "transition_log_memory_bytes": 0,
    "kv_approx_ttl": -1.0,
    "kv_approx_max_blocks": 0,
    "transition_log_max_bytes": 0,
    "transition_log_backups": -1,
}
UNRANGED = {
    "enforce_disagg",
    "allow_request_worker_ids",
    "kv_events",
    "router_seed",
    "transition_log_path",
}


def assert_config_error(exc: ConfigError, *knobs: str) -> None:
    assert exc.knobs == knobs, f"knobs {exc.knobs} != {knobs} for: {exc}"
    for knob in knobs:
        assert knob in str(exc), f"{knob!r} not named in: {exc}"


# --- Defaults ---------------------------------------------------------------------------------


def test_value_tables_cover_every_knob() -> None:
    # A new knob must be added to these tables, so its checks are tested too.
    assert set(WRONG_TYPE) == set(knob_names())
    assert set(OUT_OF_RANGE) | UNRANGED == set(knob_names())
    assert not set(OUT_OF_RANGE) & UNRANGED


def test_defaults_reproduce_discover_round_robin_frontend_with_migration_off() -> None:
    config = PipelineConfig()
    assert config.routing == "discover"
    assert config.router_mode == "round_robin"
    assert config.effective_router_mode == "round_robin"
    assert config.preprocessing == "frontend"
    assert config.postprocessing == "frontend"
    assert config.migration_limit == 0
    assert config.migration_max_seq_len is None
    assert config.direct_worker_id is None
    assert config.enforce_disagg is False
    assert config.allow_request_worker_ids is False
    assert config.validate() is config


def test_to_dict_lists_every_knob_in_declaration_order_and_round_trips() -> None:
    config = PipelineConfig(routing="query_only", router_mode="random", router_seed=7)
    data = config.to_dict()
    assert list(data) == knob_names()
    assert PipelineConfig.from_dict(data) == config


def test_direct_to_known_always_uses_the_request_worker_ids() -> None:
    config = PipelineConfig(routing="direct_to_known")
    assert config.effective_router_mode == "direct_from_request"


# --- Single knobs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("knob", "value"), sorted(WRONG_TYPE.items()))
def test_wrong_type_is_rejected_naming_the_knob(knob: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: value})
    assert_config_error(info.value, knob)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("knob", "value"), sorted(OUT_OF_RANGE.items()))
def test_out_of_range_value_is_rejected_naming_the_knob(knob: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: value})
    assert_config_error(info.value, knob)


@pytest.mark.parametrize("knob", INT_FIELDS + FLOAT_FIELDS)
@pytest.mark.parametrize("flag", [True, False])
def test_bools_are_not_accepted_as_numbers(knob: str, flag: bool) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: flag})
    assert_config_error(info.value, knob)
    assert "bool" in str(info.value)


@pytest.mark.parametrize("knob", ["enforce_disagg", "allow_request_worker_ids"])
@pytest.mark.parametrize("value", [0, 1])
def test_ints_are_not_accepted_as_bools(knob: str, value: int) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: value})
    assert_config_error(info.value, knob)


@pytest.mark.parametrize("knob", FLOAT_FIELDS)
def test_float_knobs_accept_ints(knob: str) -> None:
    config = PipelineConfig(**{knob: 2})
    assert getattr(config, knob) == 2


@pytest.mark.parametrize("knob", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_knobs_reject_non_finite_values(knob: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: value})
    assert_config_error(info.value, knob)


@pytest.mark.parametrize("knob", sorted(k for k, t in FIELD_TYPES.items() if "None" in t))
def test_optional_knobs_accept_none(knob: str) -> None:
    assert getattr(PipelineConfig(**{knob: None}), knob) is None


@pytest.mark.parametrize("knob", sorted(k for k, t in FIELD_TYPES.items() if "None" not in t))
def test_required_knobs_reject_none(knob: str) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(**{knob: None})
    assert_config_error(info.value, knob)


def test_any_int_is_a_valid_router_seed() -> None:
    assert PipelineConfig(router_seed=-(2**70)).router_seed == -(2**70)


def test_unknown_choice_suggests_the_closest_value() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'discover'\?") as info:
        PipelineConfig(routing="discovr")
    assert_config_error(info.value, "routing")


def test_evolve_checks_the_new_value() -> None:
    config = PipelineConfig()
    assert config.evolve(migration_limit=2).migration_limit == 2
    with pytest.raises(ConfigError) as info:
        config.evolve(kv_block_size=0)
    assert_config_error(info.value, "kv_block_size")


def test_float_knob_given_an_int_too_large_for_a_float_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig(router_temperature=10**400)
    assert_config_error(info.value, "router_temperature")


# --- from_dict --------------------------------------------------------------------------------


def test_from_dict_builds_a_config() -> None:
    config = PipelineConfig.from_dict({"routing": "query_only", "kv_block_size": 32})
    assert config == PipelineConfig(routing="query_only", kv_block_size=32)


def test_from_dict_rejects_an_unknown_key_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"'routng'.*did you mean 'routing'\?") as info:
        PipelineConfig.from_dict({"routng": "discover"})
    assert info.value.knobs == ("routng",)


def test_from_dict_rejects_an_unknown_key_without_a_close_match() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'zzzzzz'") as info:
        PipelineConfig.from_dict({"zzzzzz": 1})
    assert info.value.knobs == ("zzzzzz",)
    assert "did you mean" not in str(info.value)


def test_from_dict_rejects_a_bad_value_naming_the_knob() -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_dict({"migration_limit": "2"})
    assert_config_error(info.value, "migration_limit")


@pytest.mark.parametrize("data", [["routing"], "routing=discover", 3])
def test_from_dict_rejects_a_non_mapping(data: Any) -> None:
    with pytest.raises(ConfigError, match="table of knobs"):
        PipelineConfig.from_dict(data)


# --- from_toml --------------------------------------------------------------------------------


def test_from_toml_reads_top_level_knobs(tmp_path: Path) -> None:
    path = tmp_path / "interlock.toml"
    path.write_text(
        'routing = "discover"\nrouter_mode = "random"\nrouter_seed = 11\n'
        "migration_limit = 2\noverlap_score_weight = 0.5\n",
        encoding="utf-8",
    )
    config = PipelineConfig.from_toml(path)
    assert config == PipelineConfig(
        router_mode="random", router_seed=11, migration_limit=2, overlap_score_weight=0.5
    )


def test_from_toml_accepts_a_str_path(tmp_path: Path) -> None:
    path = tmp_path / "interlock.toml"
    path.write_text("kv_block_size = 64\n", encoding="utf-8")
    assert PipelineConfig.from_toml(str(path)).kv_block_size == 64


def test_from_toml_accepts_a_top_level_interlock_table(tmp_path: Path) -> None:
    path = tmp_path / "pyproject-like.toml"
    path.write_text('[interlock]\nrouting = "query_only"\nkv_block_size = 8\n', encoding="utf-8")
    assert PipelineConfig.from_toml(path) == PipelineConfig(routing="query_only", kv_block_size=8)


def test_from_toml_of_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert PipelineConfig.from_toml(path) == PipelineConfig()


def test_from_toml_reports_a_missing_file_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        PipelineConfig.from_toml(path)
    assert str(path) in str(info.value)


def test_from_toml_reports_invalid_toml_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('routing = "discover\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        PipelineConfig.from_toml(path)
    assert str(path) in str(info.value)


def test_from_toml_reports_an_unknown_key_with_the_path_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("migration_limt = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"did you mean 'migration_limit'\?") as info:
        PipelineConfig.from_toml(path)
    assert str(path) in str(info.value)
    assert info.value.knobs == ("migration_limt",)


def test_from_toml_reports_a_bad_value_with_the_path_and_the_knob(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("kv_block_size = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_toml(path)
    assert str(path) in str(info.value)
    assert_config_error(info.value, "kv_block_size")


def test_from_toml_interlock_table_beside_other_keys_is_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "mixed.toml"
    path.write_text('routing = "discover"\n[interlock]\nkv_block_size = 8\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_toml(path)
    assert info.value.knobs == ("interlock",)


def test_from_toml_reports_a_non_utf8_file_as_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe routing = 1\n")
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_toml(path)
    assert str(path) in str(info.value)


# --- from_env and parse_knob_text ---------------------------------------------------------------


def test_from_env_parses_each_variable_by_its_knob_type() -> None:
    environ = {
        "INTERLOCK_ROUTING": "query_only",
        "INTERLOCK_MIGRATION_LIMIT": " 2 ",
        "INTERLOCK_MIGRATION_MAX_SEQ_LEN": "none",
        "INTERLOCK_ENFORCE_DISAGG": "yes",
        "INTERLOCK_ALLOW_REQUEST_WORKER_IDS": "off",
        "INTERLOCK_ROUTER_TEMPERATURE": "0.25",
        "INTERLOCK_ENGINE_IDLE_TIMEOUT": "",
        "INTERLOCK_TRANSITION_LOG_PATH": "/tmp/log.jsonl",
        "OTHER_ROUTING": "discover",
        "PATH": "/usr/bin",
    }
    assert PipelineConfig.from_env(environ) == {
        "routing": "query_only",
        "migration_limit": 2,
        "migration_max_seq_len": None,
        "enforce_disagg": True,
        "allow_request_worker_ids": False,
        "router_temperature": 0.25,
        "engine_idle_timeout": None,
        "transition_log_path": "/tmp/log.jsonl",
    }


def test_from_env_with_no_variables_overrides_nothing() -> None:
    assert PipelineConfig.from_env({"HOME": "/root"}) == {}


def test_from_env_honours_a_custom_prefix() -> None:
    environ = {"MYAPP_KV_BLOCK_SIZE": "32", "INTERLOCK_KV_BLOCK_SIZE": "64"}
    assert PipelineConfig.from_env(environ, prefix="MYAPP_") == {"kv_block_size": 32}


def test_from_env_overrides_feed_evolve() -> None:
    overrides = PipelineConfig.from_env({"INTERLOCK_ROUTER_MODE": "random"})
    assert PipelineConfig().evolve(**overrides).router_mode == "random"


@pytest.mark.parametrize(
    ("variable", "text", "knob"),
    [
        ("INTERLOCK_KV_BLOCK_SIZE", "sixteen", "kv_block_size"),
        ("INTERLOCK_MIGRATION_LIMIT", "1.5", "migration_limit"),
        ("INTERLOCK_ENFORCE_DISAGG", "maybe", "enforce_disagg"),
        ("INTERLOCK_OVERLAP_SCORE_WEIGHT", "heavy", "overlap_score_weight"),
        ("INTERLOCK_ACTOR_MAX_RESTARTS", "none", "actor_max_restarts"),
    ],
)
def test_from_env_rejects_text_that_does_not_parse(variable: str, text: str, knob: str) -> None:
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_env({variable: text})
    assert_config_error(info.value, knob)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("knob", "text", "expected"),
    [
        ("migration_limit", "3", 3),
        ("router_seed", "-7", -7),
        ("direct_worker_id", "null", None),
        ("direct_worker_id", "12", 12),
        ("enforce_disagg", "TRUE", True),
        ("enforce_disagg", "1", True),
        ("enforce_disagg", "on", True),
        ("enforce_disagg", "No", False),
        ("enforce_disagg", "0", False),
        ("overlap_score_weight", "2", 2.0),
        ("router_temperature", "1e-3", 0.001),
        ("engine_idle_timeout", "None", None),
        ("engine_idle_timeout", "30", 30.0),
        ("routing", "  direct_to_known\n", "direct_to_known"),
        ("transition_log_path", "logs/t.jsonl", "logs/t.jsonl"),
    ],
)
def test_parse_knob_text_parses_by_type(knob: str, text: str, expected: Any) -> None:
    value = parse_knob_text(knob, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("knob", "text"),
    [
        ("migration_limit", ""),
        ("migration_limit", "two"),
        ("kv_block_size", "16.0"),
        ("enforce_disagg", "2"),
        ("router_temperature", "hot"),
    ],
)
def test_parse_knob_text_rejects_bad_text_naming_the_knob(knob: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_knob_text(knob, text)
    assert_config_error(info.value, knob)


def test_parse_knob_text_rejects_an_unknown_knob() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'routng'") as info:
        parse_knob_text("routng", "discover")
    assert info.value.knobs == ("routng",)


# --- Combination rules ------------------------------------------------------------------------


def rule_id(rule: CombinationRule) -> str:
    return "+".join(rule.knobs) + ":" + ",".join(f"{k}={v}" for k, v in rule.example.items())


@pytest.mark.parametrize("rule", COMBINATION_RULES, ids=rule_id)
def test_each_rule_example_fails_validate_with_exactly_that_rule(rule: CombinationRule) -> None:
    config = PipelineConfig(**rule.example)  # every value is fine on its own
    assert rule.applies(config)
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert_config_error(info.value, *rule.knobs)
    assert str(info.value) == rule.message(config)
    assert "set " in str(info.value), f"the message does not say what to set: {info.value}"


@pytest.mark.parametrize("rule", COMBINATION_RULES, ids=rule_id)
def test_each_rule_example_is_refused_by_build_pipeline_before_anything_starts(
    rule: CombinationRule,
) -> None:
    # Called outside trio: an invalid configuration must fail at the call, not on entry.
    with pytest.raises(ConfigError) as info:
        build_pipeline(PipelineConfig(**rule.example), Components())
    assert info.value.knobs == rule.knobs


def test_rules_name_only_real_knobs() -> None:
    names = set(knob_names())
    for rule in COMBINATION_RULES:
        assert rule.knobs, rule
        assert set(rule.knobs) <= names, rule.knobs
        assert set(rule.example) <= names, rule.example


OPTIONAL_FLOAT = st.none() | st.integers(0, 100) | st.floats(0, 100, allow_nan=False)
NON_NEGATIVE = st.integers(0, 100) | st.floats(0, 100, allow_nan=False)

FIELD_VALID: dict[str, st.SearchStrategy[Any]] = {
    "preprocessing": st.sampled_from(get_args(Preprocessing)),
    "postprocessing": st.sampled_from(get_args(Postprocessing)),
    "routing": st.sampled_from(get_args(Routing)),
    "router_mode": st.sampled_from(get_args(RouterMode)),
    "direct_worker_id": st.none() | st.integers(0, 2**64 - 1),
    "migration_limit": st.integers(0, 4),
    "migration_max_seq_len": st.none() | st.integers(1, 10_000),
    "enforce_disagg": st.booleans(),
    "allow_request_worker_ids": st.booleans(),
    "kv_block_size": st.integers(1, 128),
    "overlap_score_weight": NON_NEGATIVE,
    "router_temperature": NON_NEGATIVE,
    "router_seed": st.integers(-(2**63), 2**63),
    "engine_idle_timeout": OPTIONAL_FLOAT,
    "first_token_timeout": OPTIONAL_FLOAT,
    "outlier_ejection_time": NON_NEGATIVE,
    "outlier_failures": st.integers(1, 10),
    "max_inflight_per_worker": st.none() | st.integers(0, 1000),
    "max_queued_requests": st.none() | st.integers(0, 1000),
    "actor_max_restarts": st.integers(0, 10),
    "actor_restart_window": NON_NEGATIVE,
    "actor_restart_backoff": NON_NEGATIVE,
    "transition_log_capacity": st.integers(1, 1_000_000),
    "transition_log_memory_bytes": st.none() | st.integers(1, 10**9),
    "transition_log_path": st.none() | st.just("transitions.jsonl"),
    "transition_log_max_bytes": st.none() | st.integers(1, 10**9),
    "transition_log_backups": st.integers(0, 10),
    "kv_events": st.booleans(),
    "kv_approx_ttl": NON_NEGATIVE,
    "kv_approx_max_blocks": st.integers(1, 2**20),
}


@st.composite
def few_knobs(draw: st.DrawFn) -> dict[str, Any]:
    """A handful of knobs changed from the defaults: valid about half the time."""
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALID)), max_size=4, unique=True))
    return {name: draw(FIELD_VALID[name]) for name in names}


# Every knob drawn at once is almost always invalid; a few knobs at a time is often valid.
FIELD_VALID_CONFIGS = (st.fixed_dictionaries(FIELD_VALID) | few_knobs()).map(
    lambda kw: PipelineConfig(**kw)
)


def test_the_generator_covers_every_knob() -> None:
    assert set(FIELD_VALID) == set(knob_names())


@given(FIELD_VALID_CONFIGS)
def test_validate_fails_iff_some_rule_applies_and_names_real_knobs(config: PipelineConfig) -> None:
    applying = [rule for rule in COMBINATION_RULES if rule.applies(config)]
    if applying:
        with pytest.raises(ConfigError) as info:
            config.validate()
        assert info.value.knobs == applying[0].knobs
        assert set(info.value.knobs) <= set(knob_names())
        for knob in info.value.knobs:
            assert knob in str(info.value)
        with pytest.raises(ConfigError):
            build_pipeline(config, Components())
    else:
        assert config.validate() is config
        if config.router_mode != "kv":
            context = build_pipeline(config, Components())  # not entered: nothing starts
            assert hasattr(context, "__aenter__")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"routing": "query_only"},
        {"routing": "direct_to_known"},
        {"routing": "direct_to_known", "router_mode": "direct_from_request"},
        {"router_mode": "random", "migration_limit": 3, "migration_max_seq_len": 100},
        {"router_mode": "direct", "direct_worker_id": 0},
        {"enforce_disagg": True, "allow_request_worker_ids": True},
        {"postprocessing": "engine"},
    ],
)
def test_valid_configurations_validate_and_build(changes: dict[str, Any]) -> None:
    config = PipelineConfig(**changes)
    assert config.validate() is config
    assert hasattr(build_pipeline(config, Components()), "__aenter__")


# -- interlock config check --------------------------------------------------------------------

# A file's table each command refuses at start, the command, and the message both give.
REFUSED_TABLES = [
    ("[objectives]\ncritical = 1.5\n", "serve", "the priority must be a whole number"),
    ("[server]\nprocesses = 0\n", "serve", "[server] processes must be at least 1, got 0"),
    ('[server]\nprocesses = "2"\n', "serve", "[server] processes must be a whole number"),
    ("[workers]\nengine = []\n", "serve", "unknown key 'engine' in [workers]; did you mean"),
    ("[gateway]\next_proc_port = 70000\n", "route", "must be a port 0-65535, got 70000"),
    ("[gateway]\next_proc_fallbacks = -1\n", "route", "must be 0 or more, got -1"),
    ('[gateway]\next_proc_tls = "on"\n', "route", "must be 'off' or 'self-signed', got 'on'"),
    (
        '[[model_rewrites]]\nname = "r"\ntargets = [{ model_rewrite = "a", weight = -1 }]\n',
        "serve",
        "weight must be a whole number from 0",
    ),
    ('routing = "query_only"\nmigration_limit = 2\n', "serve", "migration_limit=2"),
]


@pytest.mark.parametrize(
    ("text", "command", "message"),
    REFUSED_TABLES,
    ids=[
        "objectives-priority",
        "server-processes-0",
        "server-processes-type",
        "workers-unknown-key",
        "gateway-port",
        "gateway-fallbacks",
        "gateway-tls-mode",
        "model-rewrites-weight",
        "knobs-combination",
    ],
)
def test_config_check_refuses_what_serve_or_route_refuse_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, command: str, message: str
) -> None:
    # `interlock config check FILE` says "valid" only for a file the commands start with: it
    # reads each table with the function serve and route read it with.
    path = tmp_path / "interlock.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        resolve(frontend_parser().parse_args([command, "--config", str(path)]))
    assert message in str(refused.value), refused.value
    assert interlock_main(["config", "check", str(path)]) == 2
    assert f"interlock: invalid configuration: {refused.value}" in capsys.readouterr().err


def test_config_check_passes_a_file_with_every_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "interlock.toml"
    path.write_text(
        'router_mode = "kv"\n\n[workers]\nengines = ["1=http://127.0.0.1:8000"]\n\n'
        "[server]\nprocesses = 2\n\n[gateway]\next_proc_port = 9002\next_proc_fallbacks = 1\n\n"
        "[objectives]\ncritical = 10\n\n"
        '[[model_rewrites]]\nname = "r"\ntargets = [{ model_rewrite = "mock" }]\n'
    )
    assert interlock_main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid\n")


def test_config_check_leaves_files_and_combinations_to_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each value is checked on its own; what depends on the machine (the files named, read
    # where the file is served) or on the flags a command adds (kv_replay's engine and bind,
    # several processes beside in-process workers, the TLS certificate's key) is not: serve
    # and route check it at start. docs/configuration.md says so.
    path = tmp_path / "interlock.toml"
    path.write_text(
        '[workers]\nremote_workers = ["1=127.0.0.1:7001/prefill"]\n'
        'kv_replay = ["2=tcp://127.0.0.1:5558"]\nengine_api_key = "any text"\n\n'
        f'[server]\nprocesses = 3\napi_keys = ["k1"]\napi_key_file = "{tmp_path}/absent"\n\n'
        f'[gateway]\next_proc_tls_cert = "{tmp_path}/absent.pem"\n'
    )
    assert interlock_main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    with pytest.raises(ConfigError, match="no --engine has id 2"):
        resolve(frontend_parser().parse_args(["serve", "--config", str(path)]))


# A value of a [workers] or [server] key that `interlock serve --config FILE` refuses at start
# whatever the command line and the machine (the form of an address or an API key, read from
# the file alone), and the message serve gives.
REFUSED_VALUES = [
    ('[workers]\nengines = ["nonsense"]\n', "no '=' between the engine id and its URL"),
    ('[workers]\nremote_workers = ["nonsense"]\n', "no '=' between the worker id"),
    ('[workers]\nkv_events_bind = "nonsense"\n', "is not a ZMQ endpoint"),
    ('[workers]\nkv_replay = ["nonsense"]\n', "the form is ID=ENDPOINT"),
    ('[server]\napi_keys = ["has space"]\n', "an API key must be visible ASCII"),
    ('[server]\ntrusted_api_keys = [""]\n', "an API key must not be empty"),
    (
        '[workers]\nengines = ["1=http://127.0.0.1:8000", "1=http://127.0.0.1:8001"]\n',
        "id 1 is taken by --engine 1=http://127.0.0.1:8000",
    ),
    (
        '[workers]\nremote_workers = ["1=127.0.0.1:7001", "1=127.0.0.1:7002"]\n',
        "both have worker id 1",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    REFUSED_VALUES,
    ids=[
        "engines",
        "remote-workers",
        "kv-events-bind",
        "kv-replay",
        "api-keys",
        "trusted-api-keys-empty",
        "engines-one-id-twice",
        "remote-workers-one-id-twice",
    ],
)
def test_config_check_refuses_a_table_value_serve_refuses_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    # docs/configuration.md: `interlock config check FILE` "checks one as `interlock serve`
    # and `route` do at start: its knobs and its `[workers]`, `[server]` ... tables". These
    # values depend on neither the command line nor the machine, yet serve refuses the file
    # at start and config check said it was valid.
    path = tmp_path / "interlock.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        resolve(frontend_parser().parse_args(["serve", "--config", str(path)]))
    assert message in str(refused.value), refused.value
    assert interlock_main(["config", "check", str(path)]) == 2, capsys.readouterr().out
    # Config check names the file's table and key (each text holds one), then serve's words.
    table, key = text[1:].partition("]")[0], text.split("\n")[1].partition(" =")[0]
    error = capsys.readouterr().err
    assert f"{path}: [{table}] {key}" in error, error
    assert message in error, error
