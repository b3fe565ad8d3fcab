"""`PipelineConfig`: the knobs, their validation, and loading from TOML, dicts and the environment.

Field values are checked when a config is constructed (a wrong type or an unknown value names
the field). Combinations are checked by `PipelineConfig.validate`, which `build_pipeline` calls:
each rule in `COMBINATION_RULES` names its knobs, says why the combination cannot work and what
to change. docs/configuration.md is generated from these two tables.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, get_args

import attrs

from ._errors import ConfigError, did_you_mean
from ._model_rewrites import MODEL_REWRITES_TABLE, ModelRewrites

#: The TOML table naming the workers and engines to serve over, and its keys' types: the flags
#: of the same meaning (``--engine``, ``--remote-worker``, ``--kv-events-bind``, ...).
WORKERS_TABLE = "workers"
WORKERS_KEYS: dict[str, type] = {
    "engines": list,
    "remote_workers": list,
    "kv_events_bind": str,
    "kv_replay": list,
    "engine_api_key": str,
}
#: The TOML table of the HTTP server's own settings, and its keys' types: the API keys
#: (``--api-key``, ``--api-key-file``, ``--trusted-api-key``, ``--trusted-api-key-file``).
SERVER_TABLE = "server"
SERVER_KEYS: dict[str, type] = {
    "api_keys": list,
    "api_key_file": str,
    "trusted_api_keys": list,
    "trusted_api_key_file": str,
    "processes": int,
}

#: The TOML table of ``interlock route``'s endpoint picker (``--ext-proc-port`` ...), and its
#: keys' types: the flags of the same names; a flag wins over its key.
GATEWAY_TABLE = "gateway"
GATEWAY_KEYS: dict[str, type] = {
    "ext_proc_port": int,
    "ext_proc_health_port": int,
    "ext_proc_fallbacks": int,
    "ext_proc_tls": str,
    "ext_proc_tls_cert": str,
    "ext_proc_tls_key": str,
}
#: ``--ext-proc-tls``'s values (``[gateway] ext_proc_tls``'s too): h2c (the default), or TLS
#: with a certificate made at start. A certificate of your own (``--ext-proc-tls-cert`` and
#: ``--ext-proc-tls-key``) needs no mode. Here, not in `interlock.gateway._tls`: the command
#: line reads them without loading the gRPC stack.
EXT_PROC_TLS_OFF: Final = "off"
EXT_PROC_TLS_SELF_SIGNED: Final = "self-signed"
EXT_PROC_TLS_MODES: Final = (EXT_PROC_TLS_OFF, EXT_PROC_TLS_SELF_SIGNED)
#: `EXT_PROC_TLS_MODES` as errors list them.
EXT_PROC_TLS_MODES_TEXT: Final = " or ".join(repr(mode) for mode in EXT_PROC_TLS_MODES)
#: The ``[gateway]`` keys (and flags, ``_`` for ``-``) that choose the ext_proc port's TLS:
#: together one setting, which the command line's flags replace as a whole.
EXT_PROC_TLS_KEYS: Final = ("ext_proc_tls", "ext_proc_tls_cert", "ext_proc_tls_key")

#: The TOML table of InferenceObjective priorities (``--objective NAME=PRIORITY``): each key
#: names an objective (the value of a request's ``x-gateway-inference-objective`` header),
#: each value is its priority, a whole number (higher goes first; negative is sheddable).
OBJECTIVES_TABLE = "objectives"
#: The priority of a request naming no objective, or one not configured (GAIE's: an
#: InferenceObjective without a priority counts as 0).
DEFAULT_OBJECTIVE_PRIORITY = 0

Preprocessing = Literal["frontend", "engine"]
Postprocessing = Literal["frontend", "engine"]
Routing = Literal["discover", "direct_to_known", "query_only"]
RouterMode = Literal[
    "round_robin", "random", "kv", "predicted_ttft", "direct", "direct_from_request"
]

#: router_mode values a routing mode that selects workers may use.
SELECTING_ROUTER_MODES: tuple[str, ...] = (
    "round_robin",
    "random",
    "kv",
    "predicted_ttft",
    "direct",
)
#: router_mode values that keep an index of the workers' KV caches.
KV_ROUTER_MODES: tuple[str, ...] = ("kv", "predicted_ttft")


def _choice(values: tuple[str, ...]) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in values:
            raise ConfigError(
                f"{attribute.name}={value!r} is not one of {', '.join(map(repr, values))}"
                f"{did_you_mean(value, values)}",
                knobs=(attribute.name,),
            )

    return check


def _typed(
    kind: type, *, optional: bool = False, minimum: float | None = None
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            expected = kind.__name__ + (" or None" if optional else "")
            raise ConfigError(
                f"{attribute.name} must be {expected}, got {type(value).__name__} {value!r}",
                knobs=(attribute.name,),
            )
        if kind is float and not _finite(value):
            raise ConfigError(
                f"{attribute.name} must be a finite number, got {value!r}",
                knobs=(attribute.name,),
            )
        if minimum is not None and value < minimum:
            raise ConfigError(
                f"{attribute.name} must be >= {minimum:g}, got {value!r}",
                knobs=(attribute.name,),
            )

    return check


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to be a float
        return False


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


def _read_toml(p: Path) -> dict[str, Any]:
    """The TOML file at ``p``, parsed. Raises `ConfigError` naming the file and what is wrong."""
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{str(p)!r} is a directory, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(p)!r} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(p)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {str(p)!r}: {exc.strerror}") from None


@attrs.frozen(kw_only=True)
class PipelineConfig:
    """Every knob of a pipeline. Defaults reproduce the reference system's default behaviour:
    discover routing, round-robin selection, frontend postprocessing, migration off.

    Construction checks each value on its own and raises `ConfigError` naming the field;
    `validate` checks the combinations.
    """

    preprocessing: str = attrs.field(
        default="frontend",
        validator=_choice(get_args(Preprocessing)),
        metadata=_doc(
            "Where chat templating and tokenization run. Only 'frontend' is legal: KV routing "
            "and the query-only answer need the prompt's tokens in the frontend."
        ),
    )
    postprocessing: str = attrs.field(
        default="frontend",
        validator=_choice(get_args(Postprocessing)),
        metadata=_doc(
            "'frontend': the frontend owns stop conditions (stop token ids, min/max tokens) and "
            "text; the engine is sent none of them. 'engine': the engine applies them and its "
            "text passes through untouched."
        ),
    )
    routing: str = attrs.field(
        default="discover",
        validator=_choice(get_args(Routing)),
        metadata=_doc(
            "'discover': the frontend selects workers with router_mode. 'direct_to_known': the "
            "request names its workers (backend_instance_id / prefill_worker_id / "
            "decode_worker_id) and no selection runs. 'query_only': select workers and return "
            "the decision with the prompt tokens; nothing executes."
        ),
    )
    router_mode: str = attrs.field(
        default="round_robin",
        validator=_choice(get_args(RouterMode)),
        metadata=_doc(
            "Selection policy: 'round_robin', 'random', 'kv' (prefix-cache overlap and load, "
            "the reference cost), 'predicted_ttft' (prefix-cache overlap and each worker's "
            "prefill queue, by predicted time to first token), 'direct' (always "
            "direct_worker_id), or 'direct_from_request' (the worker ids the request names; "
            "the policy of routing='direct_to_known')."
        ),
    )
    direct_worker_id: int | None = attrs.field(
        default=None,
        validator=_typed(int, optional=True, minimum=0),
        metadata=_doc("The worker every request goes to under router_mode='direct'."),
    )
    migration_limit: int = attrs.field(
        default=0,
        validator=_typed(int, minimum=0),
        metadata=_doc(
            "How many times a broken stream may move to another worker (0 = migration off). "
            "Generated tokens are folded into the prompt and max_tokens lowered."
        ),
    )
    migration_max_seq_len: int | None = attrs.field(
        default=None,
        validator=_typed(int, optional=True, minimum=1),
        metadata=_doc(
            "Stop migrating a request once prompt + generated tokens exceed this many tokens."
        ),
    )
    enforce_disagg: bool = attrs.field(
        default=False,
        validator=_typed(bool),
        metadata=_doc(
            "Fail a request instead of serving it aggregated when no prefill worker is "
            "available or its prefill leg fails."
        ),
    )
    allow_request_worker_ids: bool = attrs.field(
        default=False,
        validator=_typed(bool),
        metadata=_doc(
            "Under routing='discover', honour worker ids a request names instead of refusing "
            "the request (off by default, so a client cannot pin load onto one worker)."
        ),
    )
    kv_block_size: int = attrs.field(
        default=16,
        validator=_typed(int, minimum=1),
        metadata=_doc(
            "Tokens per KV block; must equal the engines' page size or prefix matches are lost."
        ),
    )
    overlap_score_weight: float = attrs.field(
        default=1.0,
        validator=_typed(float, minimum=0.0),
        metadata=_doc(
            "router_mode='kv': weight of the prefill cost against decode load (0 = pure load "
            "balancing)."
        ),
    )
    router_temperature: float = attrs.field(
        default=0.0,
        validator=_typed(float, minimum=0.0),
        metadata=_doc(
            "router_mode='kv': 0 picks the cheapest worker; above 0 samples a softmax of costs."
        ),
    )
    kv_events: bool = attrs.field(
        default=True,
        validator=_typed(bool),
        metadata=_doc(
            "router_mode='kv': the engines publish KV events and the router mirrors their "
            "caches exactly. False: approximate mode for engines that publish none; the index "
            "learns from the router's own decisions and forgets after kv_approx_ttl seconds."
        ),
    )
    kv_approx_ttl: float = attrs.field(
        default=120.0,
        validator=_typed(float, minimum=0.0),
        metadata=_doc("Approximate mode: seconds a routed prefix is assumed to stay cached."),
    )
    kv_approx_max_blocks: int = attrs.field(
        default=2**20,
        validator=_typed(int, minimum=1),
        metadata=_doc("Approximate mode: blocks the index holds before pruning the oldest to 80%."),
    )
    router_seed: int = attrs.field(
        default=0,
        validator=_typed(int),
        metadata=_doc(
            "Seed of the router's random choices (router_mode='random', temperature) and of "
            "the [[model_rewrites]] rules' weighted draws (with `--processes N`, each process "
            "mixes its index into it)."
        ),
    )
    first_token_timeout: float | None = attrs.field(
        default=30.0,
        validator=_typed(float, optional=True, minimum=0.0),
        metadata=_doc(
            "Seconds a leg may take to send its first token (its time queued in the engine and "
            "its prefill included; for a prefill leg, its whole answer) before its stream "
            "counts as stalled: it migrates where migration is on, and the worker is ejected "
            "(outlier_ejection_time). None waits forever."
        ),
    )
    engine_idle_timeout: float | None = attrs.field(
        default=20.0,
        validator=_typed(float, optional=True, minimum=0.0),
        metadata=_doc(
            "Seconds without output, once the first token arrived, after which a stream counts "
            "as stalled (as with first_token_timeout). None waits forever."
        ),
    )
    outlier_ejection_time: float = attrs.field(
        default=30.0,
        validator=_typed(float, minimum=0.0),
        metadata=_doc(
            "Seconds a worker is left out of routing after it stalled a stream, or broke "
            "outlier_failures streams within that many seconds; each further ejection lasts "
            "one more such period (at most 10), and a period without failures takes one "
            "back. While every candidate is ejected the router uses them anyway. 0: never eject."
        ),
    )
    outlier_failures: int = attrs.field(
        default=5,
        validator=_typed(int, minimum=1),
        metadata=_doc(
            "Broken streams (crashes, resets, 5xx; never a client's 4xx) within "
            "outlier_ejection_time seconds that eject a worker. A stalled stream ejects at once."
        ),
    )
    max_inflight_per_worker: int | None = attrs.field(
        default=None,
        validator=_typed(int, optional=True, minimum=0),
        metadata=_doc(
            "Requests in flight on one worker at most; more wait in the frontend "
            "(max_queued_requests). None: the worker's own max_num_seqs where it reports one "
            "(interlock workers and mock engines); an OpenAI-compatible engine counts as full "
            "while its /metrics show 5 or more requests waiting or its KV cache 95 % used. "
            "0: no limit (admission control off)."
        ),
    )
    max_queued_requests: int | None = attrs.field(
        default=None,
        validator=_typed(int, optional=True, minimum=0),
        metadata=_doc(
            "Requests waiting in the frontend for a worker slot at most, highest priority "
            "first (nvext.agent_hints.priority, or the objective named by "
            "x-gateway-inference-objective: --objective / [objectives]), the flows "
            "(x-gateway-inference-fairness-id) of a priority in turn; beyond, 429 with "
            "Retry-After. None: a quarter of the workers' slots together (64 for a worker "
            "without a known limit), at least 8."
        ),
    )
    actor_max_restarts: int = attrs.field(
        default=5,
        validator=_typed(int, minimum=0),
        metadata=_doc(
            "Restarts of one actor allowed within actor_restart_window before the supervisor "
            "gives up and the pipeline fails with the actor's original error."
        ),
    )
    actor_restart_window: float = attrs.field(
        default=10.0,
        validator=_typed(float, minimum=0.0),
        metadata=_doc("Seconds over which actor restarts are counted."),
    )
    actor_restart_backoff: float = attrs.field(
        default=0.01,
        validator=_typed(float, minimum=0.0),
        metadata=_doc(
            "Seconds before the first restart of a crashed actor; doubles with each restart "
            "in the window."
        ),
    )
    transition_log_capacity: int = attrs.field(
        default=100_000,
        validator=_typed(int, minimum=1),
        metadata=_doc("Transition records kept in memory at most (oldest dropped first)."),
    )
    transition_log_memory_bytes: int | None = attrs.field(
        default=32 * 1024 * 1024,
        validator=_typed(int, optional=True, minimum=1),
        metadata=_doc(
            "Bytes of memory the in-memory transition records may take at most, estimated "
            "(a routing decision keeps its prompt's token ids, counted as 40 bytes a token, "
            "what a tuple of a real vocabulary's ids takes, and 4 for a gateway or /v1/route "
            "pick's packed ones; a tuple of the byte tokenizer's ids takes 8, its ids being "
            "CPython's cached small ints); the oldest are dropped first. None: bounded by "
            "transition_log_capacity alone."
        ),
    )
    transition_log_path: str | None = attrs.field(
        default=None,
        validator=_typed(str, optional=True),
        metadata=_doc("Also append every transition record to this JSONL file."),
    )
    transition_log_max_bytes: int | None = attrs.field(
        default=None,
        validator=_typed(int, optional=True, minimum=1),
        metadata=_doc(
            "Rotate the JSONL file when it exceeds this size (to .1, .2, ...); None never rotates."
        ),
    )
    transition_log_backups: int = attrs.field(
        default=5,
        validator=_typed(int, minimum=0),
        metadata=_doc("Rotated JSONL files kept (the oldest is deleted)."),
    )

    # -- combinations -------------------------------------------------------------------------

    def validate(self) -> PipelineConfig:
        """Check every combination rule; return ``self`` so calls chain.

        Raises:
            ConfigError: for the first rule the configuration breaks, naming its knobs.
        """
        for rule in COMBINATION_RULES:
            if rule.applies(self):
                raise ConfigError(rule.message(self), knobs=rule.knobs)
        return self

    @property
    def effective_router_mode(self) -> str:
        """The selection policy actually used: direct_to_known always uses the request's ids."""
        if self.routing == "direct_to_known":
            return "direct_from_request"
        return self.router_mode

    @property
    def uses_kv_events(self) -> bool:
        """The router mirrors the workers' KV caches from their events (a KV router mode
        with ``kv_events``): only then are the events worth decoding."""
        return self.effective_router_mode in KV_ROUTER_MODES and self.kv_events

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        """Build a config from a mapping of knob names to values (as in a TOML file).

        Raises:
            ConfigError: naming an unknown key (with the closest known one) or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a configuration must be a table of knobs, got {type(data).__name__}"
            )
        names = knob_names()
        for key in data:
            if key not in names:
                raise ConfigError(
                    f"unknown configuration key {key!r}{did_you_mean(key, names)}", knobs=(key,)
                )
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> PipelineConfig:
        """Read a TOML file whose top-level keys are knobs (or whose ``[interlock]`` table is).

        Raises:
            ConfigError: the file is missing or not TOML, or a key or value is bad; the message
                names the file.
        """
        p = Path(path)
        data = _read_toml(p)
        # The [workers] table names the workers and engines to serve over, the [server] table
        # the server's API keys: the commands read them (`workers_table`, `server_table`);
        # they hold no knobs.
        data = {key: value for key, value in data.items() if key not in _COMMAND_TABLES}
        table = data.get("interlock", data) if set(data) <= {"interlock"} else data
        try:
            return cls.from_dict(table)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}", knobs=exc.knobs) from None

    @staticmethod
    def workers_table(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``[workers]`` table of a TOML configuration file (empty when it has none): the
        workers and engines ``interlock serve`` and ``route`` serve over, under the names of
        their flags (``engines``, ``remote_workers``, ``kv_events_bind``, ``kv_replay``,
        ``engine_api_key``). Only the types are checked here: the commands check a value
        when they use it (a flag given instead replaces it unchecked), and
        ``interlock config check`` checks each with the same functions.

        Raises:
            ConfigError: the file cannot be read, or the table holds an unknown key or a value of
                the wrong type (the message names the file and the key).
        """
        return _command_table(Path(path), WORKERS_TABLE, WORKERS_KEYS)

    @staticmethod
    def server_table(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``[server]`` table of a TOML configuration file (empty when it has none): the
        HTTP server's API keys and process count, under the names of their flags
        (``api_keys``, ``api_key_file``, ``trusted_api_keys``, ``trusted_api_key_file``,
        ``processes``). Only the types are checked here, as for `workers_table`.

        Raises:
            ConfigError: the file cannot be read, or the table holds an unknown key or a value of
                the wrong type (the message names the file and the key).
        """
        return _command_table(Path(path), SERVER_TABLE, SERVER_KEYS)

    @staticmethod
    def gateway_table(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``[gateway]`` table of a TOML configuration file (empty when it has none):
        ``interlock route``'s endpoint picker settings under the names of their flags
        (``ext_proc_port``, ``ext_proc_health_port``, ``ext_proc_fallbacks``, ``ext_proc_tls``,
        ``ext_proc_tls_cert``, ``ext_proc_tls_key``). Only the types are checked here, as for
        `workers_table`.

        Raises:
            ConfigError: the file cannot be read, or the table holds an unknown key or a value of
                the wrong type (the message names the file and the key).
        """
        return _command_table(Path(path), GATEWAY_TABLE, GATEWAY_KEYS)

    @staticmethod
    def objectives_table(path: str | os.PathLike[str]) -> dict[str, int]:
        """The ``[objectives]`` table of a TOML configuration file (empty when it has none):
        each InferenceObjective's name and its priority, as ``--objective NAME=PRIORITY``
        gives them (`resolve_objectives` merges the two).

        Raises:
            ConfigError: the file cannot be read, the table is not a table, or an entry's
                name is empty or its priority not a whole number (the message names the file
                and the entry). TOML itself refuses a name given twice.
        """
        p = Path(path)
        table = _read_toml(p).get(OBJECTIVES_TABLE, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"{p}: [{OBJECTIVES_TABLE}] must be a table of NAME = PRIORITY, got {table!r}",
                knobs=(OBJECTIVES_TABLE,),
            )
        for name, value in table.items():
            where = f"{p}: [{OBJECTIVES_TABLE}] {name!r}"
            _check_objective(name, value, where)
        return dict(table)

    @staticmethod
    def model_rewrites_table(path: str | os.PathLike[str]) -> ModelRewrites:
        """The ``[[model_rewrites]]`` rules of a TOML configuration file (none when it has
        none): GAIE's InferenceModelRewrite, for ``interlock serve`` and ``route`` alike
        (`ModelRewrites`).

        Raises:
            ConfigError: the file cannot be read, or a rule is invalid (the message names the
                file, the rule and the key: `ModelRewrites.from_table`).
        """
        p = Path(path)
        table = _read_toml(p).get(MODEL_REWRITES_TABLE)
        return ModelRewrites() if table is None else ModelRewrites.from_table(table, str(p))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, prefix: str = "INTERLOCK_"
    ) -> dict[str, Any]:
        """Read knobs from ``INTERLOCK_<KNOB>`` variables; return them as overrides for
        `evolve` or `from_dict` (so the caller decides what they override).

        Raises:
            ConfigError: a variable's text does not parse as its knob's type.
        """
        env = os.environ if environ is None else environ
        found: dict[str, Any] = {}
        for name in knob_names():
            text = env.get(prefix + name.upper())
            if text is not None:
                found[name] = parse_knob_text(name, text)
        return found

    def evolve(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` applied (checked like a new config)."""
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every knob and its value, in declaration order."""
        return attrs.asdict(self)


_COMMAND_TABLES = frozenset(
    {WORKERS_TABLE, SERVER_TABLE, OBJECTIVES_TABLE, GATEWAY_TABLE, MODEL_REWRITES_TABLE}
)


def _check_objective(name: str, priority: Any, where: str) -> None:
    if not name or name != name.strip() or "," in name:
        raise ConfigError(
            f"{where}: an objective's name must be the x-gateway-inference-objective header's "
            "value: not empty, without spaces around it or commas",
            knobs=(OBJECTIVES_TABLE,),
        )
    if type(priority) is not int:
        raise ConfigError(
            f"{where}: the priority must be a whole number (higher goes first, 0 is the "
            f"default, negative is sheddable), got {priority!r}",
            knobs=(OBJECTIVES_TABLE,),
        )


def resolve_objectives(flags: Sequence[str], table: Mapping[str, int]) -> dict[str, int]:
    """The InferenceObjective priorities: the ``[objectives]`` ``table`` of the configuration
    file, then each ``--objective NAME=PRIORITY`` of ``flags`` (a flag wins over the file's
    entry of the same name). Pure.

    Raises:
        ConfigError: a flag that is not ``NAME=PRIORITY`` with a whole-number priority, or
            two flags naming one objective (the message quotes the flag and says the fix).
    """
    objectives = dict(table)
    given: set[str] = set()
    for text in flags:
        name, equals, value = text.partition("=")
        where = f"--objective {text!r}"
        if not equals:
            raise ConfigError(
                f"{where}: no '=' between the objective's name and its priority; the form is "
                "NAME=PRIORITY, e.g. --objective critical=10 --objective batch=-1",
                knobs=(OBJECTIVES_TABLE,),
            )
        try:
            priority: Any = int(value.strip())
        except ValueError:
            priority = value
        _check_objective(name, priority, where)
        if name in given:
            raise ConfigError(
                f"{where}: the objective {name!r} is given twice; give each objective once",
                knobs=(OBJECTIVES_TABLE,),
            )
        given.add(name)
        objectives[name] = priority
    return objectives


def _command_table(p: Path, name: str, keys: dict[str, type]) -> dict[str, Any]:
    """The table ``name`` of the TOML file at ``p``, its keys and their types checked against
    ``keys`` (each a string, a list of strings or a whole number)."""
    table = _read_toml(p).get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: [{name}] must be a table")
    for key, value in table.items():
        kind = keys.get(key)
        if kind is None:
            raise ConfigError(
                f"{p}: unknown key {key!r} in [{name}]{did_you_mean(key, keys)} (the keys are "
                f"{', '.join(keys)})"
            )
        if kind is list:
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            what = {list: "a list of strings", int: "a whole number"}.get(kind, "a string")
            raise ConfigError(f"{p}: [{name}] {key} must be {what}, got {value!r}")
    return dict(table)


def knob_names() -> list[str]:
    """All knob names, in declaration order."""
    return [f.name for f in attrs.fields(PipelineConfig)]


def parse_knob_text(name: str, text: str) -> Any:
    """Parse a knob's value from text (environment variables, command-line flags).

    Raises:
        ConfigError: the text is not a value of the knob's type.
    """
    field = attrs.fields_dict(PipelineConfig).get(name)
    if field is None:
        raise ConfigError(f"unknown configuration key {name!r}", knobs=(name,))
    annotation = str(field.type)
    stripped = text.strip()
    if "None" in annotation and stripped.lower() in ("", "none", "null"):
        return None
    try:
        if annotation.startswith("bool"):
            lowered = stripped.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation.startswith("int"):
            return int(stripped)
        if annotation.startswith("float"):
            return float(stripped)
    except ValueError:
        kind = annotation.split(" ")[0]
        raise ConfigError(f"{name}={text!r} is not a valid {kind}", knobs=(name,)) from None
    return stripped


@attrs.frozen
class CombinationRule:
    """One invalid combination: when ``applies`` holds, ``message`` explains it.

    ``example`` is a minimal invalid configuration, used by the docs and the tests.
    """

    knobs: tuple[str, ...]
    applies: Callable[[PipelineConfig], bool]
    message: Callable[[PipelineConfig], str]
    example: Mapping[str, Any]


COMBINATION_RULES: tuple[CombinationRule, ...] = (
    CombinationRule(
        knobs=("preprocessing",),
        applies=lambda c: c.preprocessing != "frontend",
        message=lambda c: (
            f"preprocessing={c.preprocessing!r}: KV-aware routing and the query-only answer need "
            "the prompt's token ids in the frontend, so templating and tokenization cannot move "
            "to the engine; set preprocessing='frontend' (postprocessing may move to the engine)"
        ),
        example={"preprocessing": "engine"},
    ),
    CombinationRule(
        knobs=("routing", "migration_limit"),
        applies=lambda c: c.routing == "query_only" and c.migration_limit > 0,
        message=lambda c: (
            f"routing='query_only' with migration_limit={c.migration_limit}: a query-only "
            "pipeline never executes a request, so there is no stream to migrate; set "
            "migration_limit=0 or routing='discover'"
        ),
        example={"routing": "query_only", "migration_limit": 1},
    ),
    CombinationRule(
        knobs=("routing", "migration_limit"),
        applies=lambda c: c.routing == "direct_to_known" and c.migration_limit > 0,
        message=lambda c: (
            f"routing='direct_to_known' with migration_limit={c.migration_limit}: a migrated "
            "request needs a new worker, but this mode forbids selection; set migration_limit=0 "
            "or routing='discover'"
        ),
        example={"routing": "direct_to_known", "migration_limit": 3},
    ),
    CombinationRule(
        knobs=("routing", "router_mode"),
        applies=lambda c: (
            c.routing == "direct_to_known"
            and c.router_mode not in ("round_robin", "direct_from_request")
        ),
        message=lambda c: (
            f"routing='direct_to_known' with router_mode={c.router_mode!r}: this routing mode "
            "never selects a worker (each request names its own), so a selection policy would "
            "be silently ignored; remove router_mode (or set 'direct_from_request'), or use "
            "routing='discover' to select with it"
        ),
        example={"routing": "direct_to_known", "router_mode": "kv"},
    ),
    CombinationRule(
        knobs=("routing", "router_mode"),
        applies=lambda c: c.routing != "direct_to_known" and c.router_mode == "direct_from_request",
        message=lambda c: (
            f"routing={c.routing!r} with router_mode='direct_from_request': "
            + (
                "a query-only answer would only echo the caller's own worker ids back"
                if c.routing == "query_only"
                else "taking every request's workers from the request is what "
                "routing='direct_to_known' does, and discover mode refuses client-chosen ids"
            )
            + "; set routing='direct_to_known', or pick a selecting router_mode "
            f"({', '.join(SELECTING_ROUTER_MODES)})"
        ),
        example={"router_mode": "direct_from_request"},
    ),
    CombinationRule(
        knobs=("router_mode", "direct_worker_id"),
        applies=lambda c: c.router_mode == "direct" and c.direct_worker_id is None,
        message=lambda c: (
            "router_mode='direct' without direct_worker_id: the direct policy sends every "
            "request to one fixed worker, and none is named; set direct_worker_id=<worker id>"
        ),
        example={"router_mode": "direct"},
    ),
    CombinationRule(
        knobs=("router_mode", "direct_worker_id"),
        applies=lambda c: c.router_mode != "direct" and c.direct_worker_id is not None,
        message=lambda c: (
            f"direct_worker_id={c.direct_worker_id} with router_mode={c.router_mode!r}: the "
            "fixed worker is only used by router_mode='direct', so it would be silently "
            "ignored; set router_mode='direct' or remove direct_worker_id"
        ),
        example={"direct_worker_id": 3},
    ),
    CombinationRule(
        knobs=("router_mode", "migration_limit"),
        applies=lambda c: c.router_mode == "direct" and c.migration_limit > 0,
        message=lambda c: (
            f"router_mode='direct' with migration_limit={c.migration_limit}: a migrated request "
            "must continue on a different worker, and this policy only ever picks "
            f"direct_worker_id={c.direct_worker_id}; set migration_limit=0, or a policy that "
            "selects among workers (round_robin, random, kv)"
        ),
        example={"router_mode": "direct", "direct_worker_id": 1, "migration_limit": 2},
    ),
    CombinationRule(
        knobs=("router_mode", "kv_events"),
        applies=lambda c: not c.kv_events and c.router_mode not in KV_ROUTER_MODES,
        message=lambda c: (
            f"kv_events=False with router_mode={c.router_mode!r}: approximate KV tracking "
            "only serves the KV-aware policies, so the switch would be silently ignored; set "
            "router_mode='kv' (or 'predicted_ttft') or remove kv_events"
        ),
        example={"kv_events": False},
    ),
    CombinationRule(
        knobs=("migration_limit", "migration_max_seq_len"),
        applies=lambda c: c.migration_limit == 0 and c.migration_max_seq_len is not None,
        message=lambda c: (
            f"migration_max_seq_len={c.migration_max_seq_len} with migration_limit=0: the "
            "length cap only limits migration, which is off; set migration_limit > 0 or "
            "remove migration_max_seq_len"
        ),
        example={"migration_max_seq_len": 4096},
    ),
    CombinationRule(
        knobs=("routing", "allow_request_worker_ids"),
        applies=lambda c: c.routing != "discover" and c.allow_request_worker_ids,
        message=lambda c: (
            f"allow_request_worker_ids=True with routing={c.routing!r}: the switch only "
            "governs whether routing='discover' honours worker ids sent by clients ("
            "direct_to_known always requires them; query_only selects for the caller); "
            "remove allow_request_worker_ids or set routing='discover'"
        ),
        example={"routing": "query_only", "allow_request_worker_ids": True},
    ),
)
