"""``interlock serve`` and ``interlock route``: the HTTP frontend on in-process mock workers
and/or ``interlock worker`` processes (``--remote-worker``).

`add_serve_parser` and `add_route_parser` register the commands on the top-level parser's
subparsers; each sets ``run=`` to a function taking the parsed namespace and returning the exit
code. Configuration comes from, lowest to highest precedence: the defaults, ``--config FILE``,
``INTERLOCK_<KNOB>`` environment variables, and one flag per knob.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig

from .._argtypes import non_negative_float, non_negative_int, port, positive_float
from .._config import (
    EXT_PROC_TLS_KEYS,
    EXT_PROC_TLS_MODES,
    EXT_PROC_TLS_MODES_TEXT,
    EXT_PROC_TLS_SELF_SIGNED,
    GATEWAY_TABLE,
    SERVER_TABLE,
    WORKERS_TABLE,
    PipelineConfig,
    knob_names,
    parse_knob_text,
    resolve_objectives,
)
from .._errors import ConfigError
from .._model_rewrites import ModelRewrites
from .._pipeline import (
    Components,
    Pipeline,
    SelectionPolicyFactory,
    build_pipeline,
    check_selection_policy,
)
from .._plugins import import_from_working_directory, import_policy_factory
from ..discovery import (
    DEFAULT_PREFIX,
    EtcdError,
    WorkerWatcher,
    watch_workers,
    workers_prefix,
)
from ..discovery._engine_address import EngineAddress  # interlock register's --engine too
from ..discovery._etcd import DEFAULT_NEW_STORE_GRACE
from ..discovery._etcd_options import EtcdOptions, add_etcd_arguments, etcd_options
from ..engines import ROLES, Engine, EngineContext, Role, engine_from_record
from ..engines.mock import MOCK_TEXT as MOCK_TEXT  # re-exported: it lived here before
from ..engines.mock import MockEngine, MockTiming
from ..engines.mock import mock_token_pool as mock_token_pool  # re-exported, as MOCK_TEXT
from ..engines.openai import KvEventFeed, KvFeedBindError
from ..engines.openai._kv_feed import KvEventRelay
from ..engines.remote import RemoteEngine, TokenizerMismatch, WorkerMismatch, WorkerUnreachable
from ..engines.remote._auth import SECRET_ENV, load_secret
from ..engines.remote._tls import client_context
from ..processing import (
    ByteTokenizer,
    ChatTemplateError,
    TokenizerError,
    tokenizer_fingerprint,
)
from ..processing._byte_tokenizer import BUILTIN_TOKENIZER
from ..wire import ProtocolError
from ._app import HttpLimits, build_app, build_metrics_app
from ._auth import (
    OPEN_PATHS,
    ApiKeys,
    check_key,
    describe,
    exposure_warning,
    read_key_file,
    split_keys,
)
from ._drain import Drain
from ._metrics import HttpMetrics
from ._preprocess import Preprocessor
from ._processes import (
    CHILD_FLAG,
    ChildSpec,
    Supervisor,
    child_seed,
    share_of,
    signal_when_supervisor_exits,
    with_process_header,
)
from ._serve import HttpServer, serve_http
from ._tracing import configure_otlp

if TYPE_CHECKING:
    from ..gateway._tls import ExtProcTLS

#: ``--drain-timeout``'s default: seconds the requests in flight get after SIGTERM (the
#: Kubernetes default terminationGracePeriodSeconds is 30).
DEFAULT_DRAIN_TIMEOUT = 30.0

#: What ``--remote-worker`` takes, for error messages.
REMOTE_WORKER_FORM = "ID=HOST:PORT or ID=HOST:PORT/ROLE (ROLE: agg, prefill or decode)"
_REMOTE_WORKER_EXAMPLE = "e.g. 1=127.0.0.1:7001, 2=[::1]:7002/prefill"


@attrs.frozen
class RemoteWorkerAddress:
    """One ``--remote-worker ID=HOST:PORT[/ROLE]``: the ``interlock worker`` the frontend
    reaches at ``host:port``, which must report instance id ``worker_id`` and ``role`` (its
    ``--id`` and ``--role``) in its handshake."""

    worker_id: int
    host: str
    port: int
    role: Role = "agg"

    @classmethod
    def parse(cls, text: str) -> RemoteWorkerAddress:
        """Parse ``ID=HOST:PORT`` or ``ID=HOST:PORT/ROLE``; an IPv6 host goes in brackets
        (``1=[::1]:7001``). Pure; no I/O.

        Raises:
            ConfigError: ``text`` is not of that form, the id is not a whole number, the port
                is not 1-65535, or the role is not agg, prefill or decode (the message quotes
                ``text`` and shows the form).
        """

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"--remote-worker {text!r}: {why}; the form is {REMOTE_WORKER_FORM}, "
                f"{_REMOTE_WORKER_EXAMPLE}"
            )

        ident, equals, rest = text.partition("=")
        if not equals:
            raise bad("no '=' between the worker id and the address")
        if not (ident.isascii() and ident.isdigit()):
            raise bad(f"the worker id {ident!r} is not a whole number (the worker's --id)")
        address, slash, role_text = rest.partition("/")
        role = next((r for r in ROLES if r == role_text), None) if slash else "agg"
        if role is None:
            raise bad(f"the role {role_text!r} is not agg, prefill or decode")
        if address.startswith("["):
            host, _, after = address[1:].partition("]")
            port_text = after[1:] if after.startswith(":") else None
        else:
            host, colon, port_text_or_empty = address.rpartition(":")
            port_text = port_text_or_empty if colon else None
            if ":" in host:
                raise bad(f"an IPv6 host goes in brackets: {ident}=[{host}]:{port_text}")
        if port_text is None:
            raise bad(f"no ':PORT' in the address {address!r}")
        if not host:
            raise bad(f"no host before ':{port_text}'")
        if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise ConfigError(
                f"--remote-worker {text!r}: the port {port_text!r} is not a whole number "
                "1-65535 (the port the worker printed in its JSON line, or its --port)"
            )
        return cls(int(ident), host, int(port_text), role)

    @property
    def address(self) -> str:
        """``HOST:PORT`` (``[HOST]:PORT`` for an IPv6 host)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.worker_id}={self.address}/{self.role}"


@attrs.frozen(kw_only=True)
class ServeSetup:
    """Everything ``serve`` and ``route`` resolved from their flags, before trio starts."""

    config: PipelineConfig
    preprocessor: Preprocessor
    limits: HttpLimits
    host: str
    port: int
    model: str
    #: In-process mock workers (ids 1..workers) and prefill workers (the next ids).
    workers: int
    prefill_workers: int
    timing: MockTiming
    route_api: bool
    command: str
    #: ``--write-timeout``: seconds a client may take no response bytes before it is dropped.
    write_timeout: float = 60.0
    #: ``--http-server``: which HTTP/1.1 server `serve_http` runs (``h1`` or ``hypercorn``).
    http_server: HttpServer = "h1"
    #: ``interlock worker`` processes to serve over (``--remote-worker``).
    remote_workers: tuple[RemoteWorkerAddress, ...] = ()
    #: ``--selection-policy MODULE:FACTORY``: the text, and the factory it imported.
    selection_policy_path: str | None = None
    selection_policy: SelectionPolicyFactory | None = None
    #: ``--etcd URL`` and its flags: discover workers registered in etcd (None: no etcd).
    etcd: EtcdOptions | None = None
    #: OpenAI-compatible servers to serve over (``--engine``), and where their KV events
    #: arrive (``--kv-events-bind``), with each engine's replay endpoint (``--kv-replay``).
    openai_engines: tuple[EngineAddress, ...] = ()
    kv_events_bind: str | None = None
    kv_replay: dict[int, str] = attrs.field(factory=dict)
    engine_api_key: str | None = None
    engine_connect_timeout: float = 30.0
    #: ``--worker-secret-file`` (or INTERLOCK_WORKER_SECRET): what the remote workers must
    #: share with this frontend (None: no authentication).
    worker_secret: bytes | None = attrs.field(default=None, repr=False)
    #: ``--worker-heartbeat-interval`` / ``--worker-heartbeat-timeout``.
    worker_heartbeat_interval: float = 2.0
    worker_heartbeat_timeout: float = 10.0
    #: ``--worker-connect-timeout``: how long each ``--remote-worker`` gets to complete its
    #: first handshake at start.
    worker_connect_timeout: float = 10.0
    #: ``--etcd-new-store-grace``: how long the workers etcd lost the records of (it lost its
    #: data) stay, for them to register again.
    etcd_new_store_grace: float = DEFAULT_NEW_STORE_GRACE
    #: ``--worker-tls`` (with ``--worker-ca-file`` ...): TLS toward every remote worker
    #: (None: plain TCP).
    worker_tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)
    #: The keys clients must send (``--api-key`` ...; none: no key needed), and where they
    #: came from, for the banner.
    api_keys: ApiKeys = attrs.field(factory=ApiKeys)
    api_key_sources: tuple[str, ...] = ()
    #: ``--metrics-port``: serve ``/metrics`` there (on ``metrics_host``) instead of on ``port``.
    metrics_host: str | None = None
    metrics_port: int | None = None
    #: ``--drain-timeout``: seconds the requests in flight get after SIGTERM.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    #: ``--processes``: frontend processes sharing the port (1: this process serves).
    processes: int = 1
    #: In one of those processes: what its supervisor told it (None: not a child).
    process: ChildSpec | None = None
    #: ``interlock route --ext-proc-port`` / ``--ext-proc-health-port``: serve Envoy's ext_proc
    #: as a GAIE endpoint picker there, and gRPC health (None: not served).
    ext_proc_port: int | None = None
    ext_proc_health_port: int | None = None
    #: ``--ext-proc-fallbacks``: other candidates named after the pick.
    ext_proc_fallbacks: int = 0
    #: ``--ext-proc-tls`` / ``--ext-proc-tls-cert`` and ``--ext-proc-tls-key``: the ext_proc
    #: port's certificate and key (None: h2c).
    ext_proc_tls: ExtProcTLS | None = attrs.field(default=None, repr=False)
    #: ``--objective NAME=PRIORITY`` (and ``[objectives]``): each InferenceObjective's priority.
    objectives: dict[str, int] = attrs.field(factory=dict)
    #: ``[[model_rewrites]]`` in ``--config``: GAIE's InferenceModelRewrite rules.
    model_rewrites: ModelRewrites = attrs.field(factory=ModelRewrites)

    @property
    def etcd_url(self) -> str | None:
        """``--etcd``: etcd's client URL (None: no etcd)."""
        return None if self.etcd is None else self.etcd.url

    @property
    def etcd_prefix(self) -> str:
        """``--etcd-prefix``: the workers' records are under ``{etcd_prefix}/workers/``."""
        return DEFAULT_PREFIX if self.etcd is None else self.etcd.prefix

    @property
    def decodes_kv_events(self) -> bool:
        """Whether the workers' KV events are worth decoding: the router mirrors caches from
        them (``router_mode='kv'`` with ``kv_events``), or the policy is the application's
        own (``--selection-policy``), which may read them."""
        return self.selection_policy is not None or self.config.uses_kv_events

    def engine_context(self, kv_events: Any = None) -> EngineContext:
        """What the engines of ``--engine`` and of etcd are built with: this frontend's block
        size, tokenizer and timeouts, its KV-event feed and the engines' API key."""
        resources: dict[str, Any] = {}
        if kv_events is not None:
            resources["kv_events"] = kv_events
        if self.engine_api_key is not None:
            resources["engine_api_key"] = self.engine_api_key
        return EngineContext(
            block_size=self.config.kv_block_size,
            tokenizer=self.preprocessor.tokenizer,
            connect_timeout=self.engine_connect_timeout,
            idle_timeout=self.config.engine_idle_timeout,
            resources=resources,
            worker_secret=self.worker_secret,
            heartbeat_interval=self.worker_heartbeat_interval,
            heartbeat_timeout=self.worker_heartbeat_timeout,
            worker_tls=self.worker_tls,
            decode_kv_events=self.decodes_kv_events,
        )

    def components(self, metrics: HttpMetrics, *, kv_events: Any = None) -> Components:
        """Fresh engines (`engines`) and everything else the pipeline is built from."""
        workers, prefill = self.engines(kv_events=kv_events)
        return Components(
            workers=workers,
            prefill_workers=prefill,
            tokenizer=self.preprocessor.tokenizer,
            transition_sinks=[metrics],
            selection_policy=self.selection_policy,
        )

    @property
    def has_prefill(self) -> bool:
        """Any prefill worker, in-process or remote (then the mock workers serve decode legs)."""
        return (
            bool(self.prefill_workers)
            or any(r.role == "prefill" for r in self.remote_workers)
            or any(e.role == "prefill" for e in self.openai_engines)
        )

    def engines(self, *, kv_events: Any = None) -> tuple[list[Engine], list[Engine]]:
        """Fresh engines, as ``(workers, prefill_workers)`` for `Components`: the in-process
        mock workers (ids 1..workers, then the prefill workers), then a `RemoteEngine` per
        ``--remote-worker`` (prefill ones with the prefill workers). Nothing connects yet: the
        pipeline runs each engine's ``run``, which connects (and raises `WorkerUnreachable` or
        `WorkerMismatch`), then an `OpenAIEngine` per ``--engine`` (fed by ``kv_events``, the
        `KvEventFeed` bound at ``--kv-events-bind``). Each `RemoteEngine` checks that its worker
        has this frontend's tokenizer, whatever the postprocessing: the worker reads the prompt
        ids the frontend encoded, and its ids reach clients as ``token_ids`` even when it makes
        the text (an `OpenAIEngine` checks the same through the engine's ``/tokenize``). Never
        blocks (fingerprinting a tokenizer takes a fraction of a second, once).
        """
        tokenizer = self.preprocessor.tokenizer
        pool = mock_token_pool(tokenizer)
        common: dict[str, Any] = {
            "timing": self.timing,
            "block_size": self.config.kv_block_size,
            "max_model_len": self.limits.max_model_len,
            "vocab_size": tokenizer.vocab_size,
            "token_pool": pool,
            "tokenizer": tokenizer,
        }
        role: Role = "decode" if self.has_prefill else "agg"
        workers: list[Engine] = [MockEngine(i, role, **common) for i in range(1, self.workers + 1)]
        first = self.workers + 1
        prefill: list[Engine] = [
            MockEngine(i, "prefill", **common) for i in range(first, first + self.prefill_workers)
        ]
        for remote in self.remote_workers:
            engine = RemoteEngine(
                remote.host,
                remote.port,
                instance_id=remote.worker_id,
                role=remote.role,
                block_size=self.config.kv_block_size,
                tokenizer=tokenizer_fingerprint(tokenizer),
                vocab_size=tokenizer.vocab_size,
                heartbeat_interval=self.worker_heartbeat_interval,
                heartbeat_timeout=self.worker_heartbeat_timeout,
                connect_timeout=self.worker_connect_timeout,
                worker_secret=self.worker_secret,
                tls=self.worker_tls,
                decode_kv_events=self.decodes_kv_events,
            )
            (prefill if remote.role == "prefill" else workers).append(engine)
        context = self.engine_context(kv_events)
        for address in self.openai_engines:
            record = address.record(
                kv_replay=self.kv_replay.get(address.worker_id),
                block_size=self.config.kv_block_size,
            )
            http_engine = engine_from_record(record, context)
            (prefill if address.role == "prefill" else workers).append(http_engine)
        return workers, prefill


# -- parsers -----------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``interlock serve`` (sets ``run=``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API on mock workers (in-process or interlock worker)",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /live and "
            "/metrics on in-process mock workers and/or `interlock worker` processes "
            "(--remote-worker), until Ctrl-C. Point any OpenAI client at http://HOST:PORT/v1."
        ),
    )
    _add_common(parser)
    parser.add_argument(
        "--route-api",
        action="store_true",
        help="also serve the route-only API (POST /v1/route ...; see docs/route-api.md)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="export OpenTelemetry traces over OTLP/HTTP to this collector (http://HOST:4318; "
        "default: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no export); needs "
        "pip install 'interlock[otel]' (see docs/operations.md#tracing)",
    )
    parser.set_defaults(run=run_serve)
    return parser


def add_route_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``interlock route`` (sets ``run=``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "route",
        help="the standalone router: the route-only API (routing='query_only')",
        description=(
            "Serve the route-only API (POST /v1/route, /v1/route/{id}/prefill_complete, "
            "/v1/route/{id}/free) and query-only chat/completions answers over a set of "
            "workers; nothing is executed. With --once, answer one route request and exit."
        ),
    )
    _add_common(parser)
    parser.add_argument(
        "--once",
        metavar="JSON",
        help="answer this route request body (or '-' to read it from stdin), print the "
        "decision as JSON and exit",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help="with --once: send the request to the router running at URL instead of starting one",
    )
    gateway = parser.add_argument_group("gateway endpoint picker (interlock.gateway)")
    gateway.add_argument(
        "--ext-proc-port",
        type=port,
        metavar="PORT",
        help="also serve Envoy's ext_proc (envoy.service.ext_proc.v3.ExternalProcessor/Process, "
        "gRPC over h2c, or TLS with --ext-proc-tls) on --host:PORT, as the Gateway API "
        "Inference Extension endpoint picker of the --engine workers (9002 is the EPP "
        "convention; 0 = any free port; default: off)",
    )
    gateway.add_argument(
        "--ext-proc-health-port",
        type=port,
        metavar="PORT",
        help="with --ext-proc-port: serve gRPC health (grpc.health.v1.Health/Check; services "
        "liveness, readiness, envoy.service.ext_proc.v3.ExternalProcessor) on --host:PORT too "
        "(9003 by the EPP convention; the ext_proc port answers it as well)",
    )
    gateway.add_argument(
        "--ext-proc-fallbacks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="with --ext-proc-port: after the endpoint picked, name up to N other candidates, "
        "best first, in x-gateway-destination-endpoint (GAIE's ordered fallback list), for a "
        "gateway that walks the list on failure. 0 (default): the pick alone, which is what "
        "an Envoy ORIGINAL_DST cluster routes on (a list there is a 503; docs/gateway.md)",
    )
    gateway.add_argument(
        "--ext-proc-tls",
        choices=EXT_PROC_TLS_MODES,
        default=None,
        help="with --ext-proc-port: serve it over TLS with a self-signed certificate made at "
        "start (self-signed: what GAIE's picker does by default, --secure-serving, and what "
        "gateways that skip verification expect: Istio, kgateway), or over h2c (off, the "
        "default). The health port stays h2c (docs/gateway.md#tls-on-the-ext_proc-port)",
    )
    gateway.add_argument(
        "--ext-proc-tls-cert",
        metavar="FILE",
        default=None,
        help="with --ext-proc-port: serve it over TLS with this PEM certificate chain (needs "
        "--ext-proc-tls-key; an RSA key of 2048 bits or more, or ECDSA on P-256); "
        "checked at start",
    )
    gateway.add_argument(
        "--ext-proc-tls-key",
        metavar="FILE",
        default=None,
        help="the unencrypted PEM private key of --ext-proc-tls-cert",
    )
    parser.set_defaults(run=run_route)
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_common(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0 = any)")
    server.add_argument(
        "--model-name",
        default="mock",
        help="the model name clients use (mock); the LoRA adapters the engines list in their "
        "/v1/models are served under their own names too",
    )
    server.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="serve with N frontend processes on the one port, each with its own router fed "
        "by the same workers, under a supervisor that starts a dead one again (1; or "
        "[server] processes in --config); needs workers outside the process (--remote-worker, "
        "--engine or --etcd) and Linux (docs/operations.md#several-frontend-processes)",
    )
    server.add_argument(CHILD_FLAG, dest="process_child", default=None, help=argparse.SUPPRESS)
    server.add_argument(
        "--max-model-len",
        type=int,
        default=32_768,
        metavar="TOKENS",
        help="context length: prompt + max_tokens above it is a 400 (32768)",
    )
    server.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="larger request bodies get 413 (8 MiB)",
    )
    server.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, /health turns 503 and new requests get 503 while the "
        "requests in flight get this long to finish; then the rest end with an error and the "
        "server exits (30; 0 = at once; a second signal stops at once; docs/operations.md)",
    )
    server.add_argument(
        "--request-read-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a request's headers must arrive within SECONDS of their first byte, and its body "
        "within SECONDS of the headers; else 408 and the connection is closed (60, nginx's)",
    )
    server.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a client that takes no response bytes for SECONDS is disconnected and its "
        "request cancelled (60, nginx's send_timeout)",
    )
    server.add_argument(
        "--http-server",
        choices=("h1", "hypercorn"),
        default="h1",
        help="the HTTP/1.1 server: h1, llhttp parsing on trio sockets (the default, 1.4-1.6x "
        "less frontend CPU per request), or hypercorn (Hypercorn's trio worker; "
        "docs/operations.md)",
    )
    server.add_argument(
        "--max-stream-buffer-bytes",
        type=int,
        default=256 * 1024,
        metavar="BYTES",
        help="a stream's client that falls more than BYTES behind is sent an error and its "
        "request cancelled (256 KiB)",
    )
    server.add_argument(
        "--max-messages",
        type=int,
        default=8192,
        metavar="N",
        help="a chat with more messages gets 400 (8192)",
    )
    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="in-process mock workers, ids 1..N (4; 0 when any --remote-worker or --etcd is given)",
    )
    workers.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        metavar="M",
        help="in-process prefill workers, ids N+1..N+M (0); with any prefill worker, the N "
        "workers serve decode legs",
    )
    workers.add_argument(
        "--remote-worker",
        dest="remote_workers",
        action="append",
        default=[],
        metavar="ID=HOST:PORT[/ROLE]",
        help="also serve over the `interlock worker --id ID [--role ROLE]` listening at "
        "HOST:PORT (ROLE: agg (default), prefill or decode); repeat for each worker. It must "
        "run with --block-size equal to --kv-block-size, and with --tokenizer naming this "
        "frontend's tokenizer ('builtin' for the default) for answers to decode",
    )
    workers.add_argument(
        "--engine",
        dest="engines",
        action="append",
        default=[],
        metavar="ID=URL[/ROLE]",
        help="also serve over the OpenAI-compatible server (a vLLM) at URL as worker ID "
        "(ROLE: agg (default), prefill or decode); repeat for each engine. Its KV events, "
        "published with topic kv@ID to --kv-events-bind, feed the router (docs/engines.md)",
    )
    workers.add_argument(
        "--kv-events-bind",
        metavar="ENDPOINT",
        help="bind one ZMQ SUB socket here (e.g. tcp://127.0.0.1:5557) for the --engine "
        "servers' KV events: each vLLM's --kv-events-config endpoint, topic kv@ID",
    )
    workers.add_argument(
        "--kv-replay",
        action="append",
        default=[],
        metavar="ID=ENDPOINT",
        help="engine ID's KV-event replay socket (its replay_endpoint), from which missed "
        "event batches are fetched again; repeat per engine",
    )
    workers.add_argument(
        "--engine-api-key",
        metavar="KEY",
        default=None,
        help="bearer token for the --engine servers (their --api-key; or INTERLOCK_ENGINE_API_KEY)",
    )
    workers.add_argument(
        "--engine-connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for each --engine to answer /health at start (30)",
    )
    workers.add_argument(
        "--worker-secret-file",
        metavar="PATH",
        default=None,
        help="the shared secret of the `interlock worker --secret-file` workers (at least 16 "
        f"bytes; or {SECRET_ENV} holding the secret itself): this frontend proves it knows it "
        "without sending it, and refuses workers that cannot prove the same "
        "(docs/wire-protocol.md#authentication)",
    )
    workers.add_argument(
        "--worker-tls",
        action="store_true",
        help="speak TLS to every remote worker (--remote-worker and etcd's; they run with "
        "--tls-cert-file), checking that each certificate names the worker's host "
        "(docs/wire-protocol.md#tls)",
    )
    workers.add_argument(
        "--worker-ca-file",
        metavar="PATH",
        default=None,
        help="with --worker-tls: trust the workers' certificates this PEM CA signed "
        "(default: the system's CAs)",
    )
    workers.add_argument(
        "--worker-cert-file",
        metavar="PATH",
        default=None,
        help="with --worker-tls: show this PEM certificate to the workers (mutual TLS, for "
        "workers with --tls-client-ca-file); needs --worker-key-file",
    )
    workers.add_argument(
        "--worker-key-file",
        metavar="PATH",
        default=None,
        help="the PEM private key of --worker-cert-file",
    )
    workers.add_argument(
        "--worker-heartbeat-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="ping each remote worker this often (2)",
    )
    workers.add_argument(
        "--worker-heartbeat-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a remote worker that sends nothing, not even a pong, for this long is dropped: "
        "its streams migrate and it leaves routing until it answers again (10)",
    )
    workers.add_argument(
        "--worker-connect-timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for each --remote-worker's first handshake at start; one not "
        "reached by then stops the frontend with status 1 (10)",
    )
    add_etcd_arguments(
        workers,
        url_help="also serve over every `interlock worker --etcd URL` registered in etcd at URL "
        "(e.g. http://127.0.0.1:2379), adding and removing them as they come and go; may "
        "start with none yet (docs/deploying.md)",
        prefix_help=f"the workers' records are under PREFIX/workers/ ({DEFAULT_PREFIX}; the "
        "workers' --etcd-prefix)",
    )
    workers.add_argument(
        "--etcd-new-store-grace",
        type=non_negative_float,
        default=None,
        metavar="SECONDS",
        help="when etcd lost its data, keep the workers it has no record of this long for them "
        f"to register again ({DEFAULT_NEW_STORE_GRACE:g}: the workers' default --etcd-ttl; give "
        "at least the workers' --etcd-ttl)",
    )
    workers.add_argument(
        "--speedup",
        type=float,
        default=10.0,
        help="run the in-process mock model's timing this many times faster than a real GPU (10)",
    )
    workers.add_argument(
        "--zero-time",
        action="store_true",
        help="in-process mock steps take no time (benchmarks)",
    )
    text = parser.add_argument_group("text")
    text.add_argument(
        "--tokenizer",
        metavar="PATH|builtin",
        help="a tokenizer.json or Hugging Face model directory, or 'builtin' for the built-in "
        "byte tokenizer (the default); remote workers need the same one (interlock worker "
        "--tokenizer PATH|builtin)",
    )
    text.add_argument(
        "--chat-template",
        metavar="PATH",
        help="a chat template (.jinja, tokenizer_config.json or directory) to use instead of "
        "the tokenizer's",
    )
    config = parser.add_argument_group("configuration (docs/configuration.md)")
    config.add_argument("--config", metavar="FILE.toml", help="read knobs from a TOML file")
    config.add_argument(
        "--selection-policy",
        metavar="MODULE:FACTORY",
        help="choose workers with your own policy: a factory in an importable module (the "
        "current directory included), called with the configuration; it replaces "
        "router_mode's policy (docs/embedding.md#your-own-selection-policy)",
    )
    config.add_argument(
        "--objective",
        dest="objectives",
        action="append",
        default=[],
        metavar="NAME=PRIORITY",
        help="a request whose x-gateway-inference-objective header names NAME gets PRIORITY in "
        "the admission queue (GAIE's InferenceObjective: higher goes first, negative is "
        "sheddable: 429 at once when every worker is full); an objective not given counts as "
        "0. Repeat for each objective (or [objectives] NAME = PRIORITY in --config; the flag "
        "wins; docs/operations.md#inferenceobjective-priorities-and-fairness)",
    )
    config.add_argument(
        "--log-transitions",
        metavar="PATH.jsonl",
        help="append every transition record to this JSONL file (= --transition-log-path)",
    )
    for name, field in attrs.fields_dict(PipelineConfig).items():
        doc = field.metadata.get("doc", "").replace("%", "%%")  # argparse formats help with %
        if str(field.type).startswith("bool"):
            config.add_argument(
                _flag(name), dest=f"knob_{name}", action=argparse.BooleanOptionalAction, help=doc
            )
        else:
            config.add_argument(_flag(name), dest=f"knob_{name}", metavar="VALUE", help=doc)
    _add_security_flags(parser)


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    keys = parser.add_argument_group(
        "API keys and metrics (docs/operations.md#api-keys-and-trusted-callers)"
    )
    keys.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="clients must send 'Authorization: Bearer KEY' (401 otherwise) everywhere but "
        "/health, /live and /metrics; repeat for more keys (or INTERLOCK_API_KEY=KEY[,KEY...], "
        "or [server] api_keys in --config). Without any key, every caller may call",
    )
    keys.add_argument(
        "--api-key-file",
        dest="api_key_files",
        action="append",
        default=[],
        metavar="PATH",
        help="read --api-key keys from a file, one a line ('#' starts a comment line)",
    )
    keys.add_argument(
        "--trusted-api-key",
        dest="trusted_api_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="a key that may also pin requests to workers (nvext worker ids, "
        "x-worker-instance-id ...), send x-enable-local-updates, ask for query-only answers "
        "and use the route-only API; other keys get 403 for those (or "
        "INTERLOCK_TRUSTED_API_KEY); repeat for more keys",
    )
    keys.add_argument(
        "--trusted-api-key-file",
        dest="trusted_api_key_files",
        action="append",
        default=[],
        metavar="PATH",
        help="read --trusted-api-key keys from a file, one a line",
    )
    keys.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics on this port (0 = any) instead of on --port, which then does not "
        "serve it",
    )
    keys.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="with --metrics-port: the address to serve /metrics on (--host)",
    )


# -- resolving ---------------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, *, environ: Any = None) -> PipelineConfig:
    """The effective configuration: defaults < --config < INTERLOCK_* < flags.

    Raises:
        ConfigError: a bad file, variable, flag value or combination.
    """
    config = PipelineConfig.from_toml(args.config) if args.config else PipelineConfig()
    changes: dict[str, Any] = dict(PipelineConfig.from_env(environ))
    for name in knob_names():
        value = getattr(args, f"knob_{name}", None)
        if value is None:
            continue
        changes[name] = value if isinstance(value, bool) else parse_knob_text(name, value)
    if args.log_transitions is not None:
        changes["transition_log_path"] = args.log_transitions
    if changes:
        config = config.evolve(**changes)
    if args.command == "route":
        if config.routing == "direct_to_known":
            raise ConfigError(
                "interlock route never executes requests, so routing must be 'query_only' "
                f"(got routing={config.routing!r}); drop the routing setting",
                knobs=("routing",),
            )
        if config.routing != "query_only":
            config = config.evolve(routing="query_only")
    return config.validate()


def resolve_remote_workers(
    texts: Sequence[str], *, workers: int, prefill_workers: int
) -> tuple[RemoteWorkerAddress, ...]:
    """Parse every ``--remote-worker``, and check their ids against each other and against the
    in-process mock workers' (1..workers, then the next prefill_workers ids). Pure; no I/O.

    Raises:
        ConfigError: a malformed item, two items with one id or one address, or an id a mock
            worker has (the message quotes the item).
    """
    remote: list[RemoteWorkerAddress] = []
    by_id: dict[int, str] = {}
    by_address: dict[str, str] = {}
    mock_ids = workers + prefill_workers
    for text in texts:
        item = RemoteWorkerAddress.parse(text)
        if item.worker_id in by_id:
            raise ConfigError(
                f"--remote-worker {by_id[item.worker_id]!r} and {text!r} both have worker id "
                f"{item.worker_id}; every worker needs its own id (the worker's --id)"
            )
        if item.address in by_address:
            raise ConfigError(
                f"--remote-worker {by_address[item.address]!r} and {text!r} both point at "
                f"{item.address}; one `interlock worker` is one worker"
            )
        if 1 <= item.worker_id <= mock_ids:
            kind = "prefill worker" if item.worker_id > workers else "worker"
            ranges = f"ids 1-{workers}" if workers else "no ids"
            if prefill_workers:
                ranges += f", prefill workers ids {workers + 1}-{mock_ids}"
            raise ConfigError(
                f"--remote-worker {text!r}: worker id {item.worker_id} is taken by in-process "
                f"mock {kind} {item.worker_id} (--workers {workers} and --prefill-workers "
                f"{prefill_workers} take {ranges}); start the remote worker with another --id "
                "(one above the mock workers'), or give fewer --workers/--prefill-workers"
            )
        by_id[item.worker_id] = by_address[item.address] = text
        remote.append(item)
    return tuple(remote)


def _check_engine_ids(
    engines: Sequence[EngineAddress],
    remote: Sequence[RemoteWorkerAddress],
    *,
    workers: int,
    prefill_workers: int,
) -> None:
    """Every ``--engine`` needs an id no other worker has, and its own URL."""
    taken: dict[int, str] = {r.worker_id: f"--remote-worker {r}" for r in remote}
    for i in range(1, workers + prefill_workers + 1):
        taken.setdefault(i, f"in-process mock worker {i} (--workers/--prefill-workers)")
    urls: dict[str, EngineAddress] = {}
    for engine in engines:
        other = taken.get(engine.worker_id)
        if other is not None:
            raise ConfigError(
                f"--engine {engine}: id {engine.worker_id} is taken by {other}; every worker "
                "and engine needs its own id"
            )
        if engine.url in urls:
            raise ConfigError(
                f"--engine {urls[engine.url]} and --engine {engine} both point at {engine.url}; "
                "one server is one engine"
            )
        taken[engine.worker_id] = f"--engine {engine}"
        urls[engine.url] = engine


def _resolve_kv_events(
    args: argparse.Namespace, engines: Sequence[EngineAddress]
) -> tuple[str | None, dict[int, str]]:
    bind: str | None = args.kv_events_bind
    if bind is not None:
        _check_kv_events_bind(bind, "--kv-events-bind")
    ids = {e.worker_id for e in engines}
    replay: dict[int, str] = {}
    for text in args.kv_replay or []:
        ident, endpoint = _parse_kv_replay(text, "--kv-replay")
        if ident not in ids:
            raise ConfigError(f"--kv-replay {text!r}: no --engine has id {ident}")
        replay[ident] = endpoint
    if replay and bind is None:
        raise ConfigError("--kv-replay needs --kv-events-bind: replays fill gaps in that feed")
    return bind, replay


def _check_kv_events_bind(bind: str, where: str) -> None:
    """``--kv-events-bind`` (or ``[workers] kv_events_bind``, which ``where`` names) is a ZMQ
    endpoint interlock can bind.

    Raises:
        ConfigError: it is not, naming ``where`` and the forms.
    """
    if not bind.startswith(("tcp://", "ipc://")):
        raise ConfigError(
            f"{where} {bind!r} is not a ZMQ endpoint interlock can bind: give "
            "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5557) or ipc://PATH"
        )


def _parse_kv_replay(text: str, where: str) -> tuple[int, str]:
    """One ``--kv-replay ID=ENDPOINT`` (or item of ``[workers] kv_replay``, which ``where``
    names): the engine id and its replay endpoint. Pure.

    Raises:
        ConfigError: ``text`` is not of that form, naming ``where`` and the form.
    """
    ident, equals, endpoint = text.partition("=")
    if not equals or not ident.isdigit() or not endpoint.startswith(("tcp://", "ipc://")):
        raise ConfigError(
            f"{where} {text!r}: the form is ID=ENDPOINT, e.g. "
            "1=tcp://127.0.0.1:5558 (the engine's replay_endpoint)"
        )
    return int(ident), endpoint


def resolve_api_keys(
    args: argparse.Namespace, *, environ: Any = None
) -> tuple[list[str], list[str], tuple[str, ...]]:
    """The ordinary and trusted keys the command was given, and where they came from. For each
    kind the first source that gives any wins: flags (``--api-key`` and ``--api-key-file``
    together), then the environment (``INTERLOCK_API_KEY``, comma-separated), then
    ``--config``'s ``[server]`` table.

    Raises:
        ConfigError: a key file cannot be read or holds no key, or a key is not one a client
            can send (the message names where it came from, never the key).
    """
    env = os.environ if environ is None else environ
    table = PipelineConfig.server_table(args.config) if getattr(args, "config", None) else {}
    found: list[list[str]] = []
    sources: list[str] = []
    for kind in ("api", "trusted_api"):
        flag = _flag(f"{kind}_key")
        variable = f"INTERLOCK_{kind.upper()}_KEY"
        flag_keys: list[str] = getattr(args, f"{kind}_keys", None) or []
        flag_files: list[str] = getattr(args, f"{kind}_key_files", None) or []
        listed: list[str] = table.get(f"{kind}_keys", [])
        file: str | None = table.get(f"{kind}_key_file")
        keys: list[str] = []
        if flag_keys or flag_files:
            keys = [check_key(k, flag) for k in flag_keys]
            keys += [k for path in flag_files for k in read_key_file(path)]
            where = [flag] * bool(flag_keys) + [f"{flag}-file"] * bool(flag_files)
        elif env.get(variable):
            keys = split_keys(env[variable], variable)
            where = [variable]
        elif listed or file:
            keys = [check_key(k, f"{args.config}: [{SERVER_TABLE}] {kind}_keys") for k in listed]
            keys += read_key_file(file) if file else []
            where = [f"{args.config} [server]"]
        if keys:
            sources.append(
                f"{'trusted ' if kind == 'trusted_api' else ''}from {' and '.join(where)}"
            )
        found.append(keys)
    return found[0], found[1], tuple(sources)


def _worker_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context toward remote workers from ``--worker-tls`` and its files (None: no
    TLS). Reads the files.

    Raises:
        ConfigError: a file flag without ``--worker-tls``, only one of ``--worker-cert-file``
            and ``--worker-key-file``, or a file that cannot be read (naming the flag).
    """
    files = {
        "--worker-ca-file": getattr(args, "worker_ca_file", None),
        "--worker-cert-file": getattr(args, "worker_cert_file", None),
        "--worker-key-file": getattr(args, "worker_key_file", None),
    }
    if not getattr(args, "worker_tls", False):
        given = [flag for flag, value in files.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --worker-tls (TLS toward the workers)")
        return None
    return client_context(*files.values())


def resolve(args: argparse.Namespace) -> ServeSetup:
    """Everything the command needs, checked before anything starts (reads the tokenizer and
    config files; connects to nothing: remote workers are reached when the pipeline starts).

    Raises:
        ConfigError, TokenizerError, ChatTemplateError: with a message saying what to fix.
    """
    config = resolve_config(args)
    objectives = resolve_objectives(
        getattr(args, "objectives", None) or [],
        PipelineConfig.objectives_table(args.config) if args.config else {},
    )
    # Flags (and INTERLOCK_ENGINE_API_KEY) win over the configuration file's [workers] table,
    # key by key; the file's replay endpoints belong to the file's engines only.
    table = PipelineConfig.workers_table(args.config) if args.config else {}
    if args.engines:
        table.pop("kv_replay", None)
    if os.environ.get("INTERLOCK_ENGINE_API_KEY"):
        table.pop("engine_api_key", None)
    for key in ("engines", "remote_workers", "kv_replay"):
        if not getattr(args, key, None) and key in table:
            setattr(args, key, table[key])
    for key in ("kv_events_bind", "engine_api_key"):
        if getattr(args, key, None) is None and key in table:
            setattr(args, key, table[key])
    texts: list[str] = args.remote_workers or []
    etcd = etcd_options(args)
    engines = tuple(EngineAddress.parse(text) for text in args.engines or [])
    default_workers = 0 if texts or engines or etcd is not None else 4
    workers: int = args.workers if args.workers is not None else default_workers
    for flag, value, minimum in (
        ("--workers", workers, 0),
        ("--prefill-workers", args.prefill_workers, 0),
        ("--max-model-len", args.max_model_len, 2),
        ("--max-body-bytes", args.max_body_bytes, 1024),
        ("--max-stream-buffer-bytes", args.max_stream_buffer_bytes, 1024),
        ("--max-messages", args.max_messages, 1),
    ):
        if value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")
    remote = resolve_remote_workers(texts, workers=workers, prefill_workers=args.prefill_workers)
    _check_engine_ids(engines, remote, workers=workers, prefill_workers=args.prefill_workers)
    kv_events_bind, kv_replay = _resolve_kv_events(args, engines)
    if (
        workers == 0
        and etcd is None
        and all(r.role == "prefill" for r in remote)
        and all(e.role == "prefill" for e in engines)
    ):
        if engines:
            raise ConfigError(
                "every --engine and --remote-worker is a prefill engine and --workers is 0: "
                "nothing could serve the decode legs; add an agg or decode engine "
                "(--engine ID=URL or ID=URL/decode)"
            )
        if not remote:
            raise ConfigError(
                "--workers must be at least 1 (or give --remote-worker ID=HOST:PORT): nothing "
                "could serve a request"
            )
        raise ConfigError(
            "every --remote-worker is a prefill worker and --workers is 0: nothing could serve "
            "the decode legs; add an agg or decode worker (--remote-worker ID=HOST:PORT or "
            "ID=HOST:PORT/decode) or --workers N"
        )
    if not args.speedup > 0:
        raise ConfigError(f"--speedup must be positive, got {args.speedup}")
    heartbeat = (args.worker_heartbeat_interval, args.worker_heartbeat_timeout)
    if not 0 < heartbeat[0] < heartbeat[1]:
        raise ConfigError(
            f"--worker-heartbeat-interval {heartbeat[0]:g} must be positive and below "
            f"--worker-heartbeat-timeout {heartbeat[1]:g} (several pings must be able to go "
            "unanswered before a worker counts as dead)"
        )
    grace = getattr(args, "etcd_new_store_grace", None)
    if grace is not None and etcd is None:
        raise ConfigError("--etcd-new-store-grace needs --etcd URL (it is about etcd's workers)")
    from_table = _apply_gateway_table(args)
    ext_proc_port, ext_proc_health_port = _resolve_ext_proc(args, workers, remote)
    ext_proc_tls = _resolve_ext_proc_tls(args, from_table)
    worker_secret = load_secret(args.worker_secret_file, flag="--worker-secret-file")
    worker_tls = _worker_tls(args)
    ordinary_keys, trusted_keys, key_sources = resolve_api_keys(args)
    metrics_port: int | None = getattr(args, "metrics_port", None)
    metrics_host: str | None = getattr(args, "metrics_host", None)
    if metrics_host is not None and metrics_port is None:
        raise ConfigError("--metrics-host needs --metrics-port: the port to serve /metrics on")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be 0-65535, got {metrics_port}")
    for flag, seconds in (
        ("--request-read-timeout", args.request_read_timeout),
        ("--write-timeout", args.write_timeout),
    ):
        if not seconds > 0:
            raise ConfigError(f"{flag} must be a positive number of seconds, got {seconds}")
    processes, child = _resolve_processes(
        args, workers=workers, prefill_workers=args.prefill_workers
    )
    if child is not None:
        # The limits are meant for the frontend as a whole: each process takes its share.
        # The seed is each process's own (`child_seed`), so their draws differ.
        config = config.evolve(
            max_inflight_per_worker=share_of(config.max_inflight_per_worker, processes),
            max_queued_requests=share_of(config.max_queued_requests, processes),
            router_seed=child_seed(config.router_seed, child.index),
        ).validate()
        if metrics_port:
            metrics_port += child.index
    factory = None
    if args.selection_policy is not None:
        what = f"--selection-policy {args.selection_policy!r}"
        import_from_working_directory()
        factory = import_policy_factory(args.selection_policy, what=what)
        try:
            check_selection_policy(config, factory)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}", knobs=exc.knobs) from None
    tokenizer = BUILTIN_TOKENIZER if args.tokenizer is None else args.tokenizer
    preprocessor = Preprocessor.load(tokenizer, chat_template=args.chat_template)
    return ServeSetup(
        config=config,
        preprocessor=preprocessor,
        limits=HttpLimits(
            max_body_bytes=args.max_body_bytes,
            max_model_len=args.max_model_len,
            request_read_timeout=args.request_read_timeout,
            max_stream_buffer_bytes=args.max_stream_buffer_bytes,
            max_messages=args.max_messages,
        ),
        write_timeout=args.write_timeout,
        http_server=getattr(args, "http_server", "h1"),
        host=args.host,
        port=args.port,
        model=args.model_name,
        workers=workers,
        prefill_workers=args.prefill_workers,
        remote_workers=remote,
        selection_policy_path=args.selection_policy,
        selection_policy=factory,
        etcd=etcd,
        openai_engines=engines,
        kv_events_bind=kv_events_bind,
        kv_replay=kv_replay,
        engine_api_key=args.engine_api_key or os.environ.get("INTERLOCK_ENGINE_API_KEY") or None,
        engine_connect_timeout=args.engine_connect_timeout,
        drain_timeout=args.drain_timeout,
        worker_secret=worker_secret,
        worker_tls=worker_tls,
        worker_heartbeat_interval=heartbeat[0],
        worker_heartbeat_timeout=heartbeat[1],
        worker_connect_timeout=args.worker_connect_timeout,
        etcd_new_store_grace=DEFAULT_NEW_STORE_GRACE if grace is None else grace,
        timing=MockTiming.zero() if args.zero_time else MockTiming(speedup_ratio=args.speedup),
        route_api=args.command == "route" or bool(getattr(args, "route_api", False)),
        command=args.command,
        api_keys=ApiKeys(ordinary_keys, trusted_keys),
        api_key_sources=key_sources,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        processes=processes,
        process=child,
        ext_proc_port=ext_proc_port,
        ext_proc_health_port=ext_proc_health_port,
        ext_proc_fallbacks=getattr(args, "ext_proc_fallbacks", None) or 0,
        ext_proc_tls=ext_proc_tls,
        objectives=objectives,
        model_rewrites=(
            PipelineConfig.model_rewrites_table(args.config) if args.config else ModelRewrites()
        ),
    )


def _resolve_processes(
    args: argparse.Namespace, *, workers: int, prefill_workers: int
) -> tuple[int, ChildSpec | None]:
    """``--processes`` (else ``[server] processes`` in ``--config``, else 1) and, in a child
    process, its `ChildSpec`.

    Raises:
        ConfigError: fewer than 1 process, or several with in-process mock workers, with
            ``--once``, or off Linux (the message names the flags and what to do).
    """
    flag: int | None = getattr(args, "processes", None)
    config_file = getattr(args, "config", None)
    table = PipelineConfig.server_table(config_file) if config_file and flag is None else {}
    processes: int = flag if flag is not None else table.get("processes", 1)
    _check_processes(
        processes, "--processes" if flag is not None else f"{config_file}: [server] processes"
    )
    where = "--processes" if flag is not None else f"{config_file} [server] processes ="
    spec: str | None = getattr(args, "process_child", None)
    if processes == 1:
        if spec is not None:
            raise ConfigError(f"{CHILD_FLAG} is internal to --processes N above 1: drop it")
        return 1, None
    if getattr(args, "once", None) is not None:
        raise ConfigError(
            f"{where} {processes} with --once: --once answers one request in this process; "
            "drop --processes"
        )
    if getattr(args, "ext_proc_port", None) is not None:
        raise ConfigError(
            f"{where} {processes} with --ext-proc-port: the endpoint picker's gRPC port is "
            "bound by one process only; run interlock route --ext-proc-port with --processes 1"
        )
    if workers or prefill_workers:
        raise ConfigError(
            f"{where} {processes} with in-process mock workers (--workers {workers}, "
            f"--prefill-workers {prefill_workers}): each process would have mock workers of "
            "its own, whose caches and loads the other processes never see; serve over "
            "`interlock worker` processes (--remote-worker ID=HOST:PORT), --engine or --etcd "
            "with --workers 0, or serve with --processes 1"
        )
    if not sys.platform.startswith("linux"):
        raise ConfigError(
            f"{where} {processes}: several frontend processes on one port need Linux; run "
            "one interlock serve per port behind a load balancer instead (docs/deploying.md)"
        )
    return processes, None if spec is None else ChildSpec.parse(spec)


def _check_processes(processes: int, where: str) -> None:
    """``--processes`` (or ``[server] processes``, which ``where`` names) is at least 1.

    Raises:
        ConfigError: it is not, naming ``where``.
    """
    if processes < 1:
        raise ConfigError(f"{where} must be at least 1, got {processes}")


def _resolve_ext_proc(
    args: argparse.Namespace, workers: int, remote: Sequence[RemoteWorkerAddress]
) -> tuple[int | None, int | None]:
    """``--ext-proc-port`` and ``--ext-proc-health-port``, checked: a gateway forwards HTTP,
    so every worker given must have an HTTP endpoint (``--engine``; etcd workers without one
    are left out of picks as they come, and logged).

    Raises:
        ConfigError: the health port without the ext_proc port, or a worker without HTTP.
    """
    ext_proc: int | None = getattr(args, "ext_proc_port", None)
    health: int | None = getattr(args, "ext_proc_health_port", None)
    if ext_proc is None:
        if health is not None:
            raise ConfigError("--ext-proc-health-port needs --ext-proc-port (the picker's port)")
        return None, None
    fix = (
        "a gateway forwards HTTP to the endpoint picked, so --ext-proc-port picks among "
        "OpenAI-compatible servers only: give them as --engine ID=URL (a vLLM, or an "
        "`interlock worker --openai-port PORT` at http://HOST:PORT)"
    )
    mocks = workers + args.prefill_workers
    if mocks:
        raise ConfigError(
            f"--ext-proc-port with {mocks} in-process mock worker(s) (ids 1-{mocks}, --workers "
            f"/--prefill-workers), which have no HTTP endpoint; {fix}, and --workers 0"
        )
    if remote:
        raise ConfigError(
            f"--ext-proc-port with --remote-worker {remote[0]}: an interlock worker reached over "
            f"the worker protocol has no HTTP endpoint known to the picker; {fix}"
        )
    return ext_proc, health


def _apply_gateway_table(args: argparse.Namespace) -> dict[str, str]:
    """``interlock route``: each key of ``--config``'s ``[gateway]`` table whose flag was not
    given sets it, checked as its flag (`_check_gateway_value`); a flag wins over its key,
    whose value is then neither used nor checked.
    The TLS keys (`EXT_PROC_TLS_KEYS`) are one setting: any TLS flag given replaces them all
    (``--ext-proc-tls off`` serves h2c whatever certificate the table names). Returns how each
    key the table set is named in errors (``[gateway] KEY of FILE``), by key.

    Raises:
        ConfigError: a bad table (`PipelineConfig.gateway_table`) or a bad value of a key the
            command uses (`_check_gateway_value`); the message names the file and the key.
    """
    config_file = getattr(args, "config", None)
    if args.command != "route" or not config_file:
        return {}
    tls_flagged = any(getattr(args, key, None) is not None for key in EXT_PROC_TLS_KEYS)
    names: dict[str, str] = {}
    for key, value in PipelineConfig.gateway_table(config_file).items():
        if getattr(args, key, None) is not None or (tls_flagged and key in EXT_PROC_TLS_KEYS):
            continue
        _check_gateway_value(key, value, f"{config_file}: [{GATEWAY_TABLE}] {key}")
        setattr(args, key, value)
        names[key] = f"[gateway] {key} of {config_file}"
    return names


def _check_gateway_value(key: str, value: Any, where: str) -> None:
    """A ``[gateway]`` key's value (``where`` names it) checked as argparse checks its flag's:
    a port 0-65535, fallbacks 0 or more, a TLS mode `EXT_PROC_TLS_MODES` lists (the other
    keys name certificate files, which `_resolve_ext_proc_tls` reads).

    Raises:
        ConfigError: the value is not one its flag takes, naming ``where``.
    """
    if key in ("ext_proc_port", "ext_proc_health_port") and not 0 <= value <= 65535:
        raise ConfigError(f"{where} must be a port 0-65535, got {value}")
    if key == "ext_proc_fallbacks" and value < 0:
        raise ConfigError(f"{where} must be 0 or more, got {value}")
    if key == "ext_proc_tls" and value not in EXT_PROC_TLS_MODES:
        raise ConfigError(
            f"{where} must be {EXT_PROC_TLS_MODES_TEXT}, got {value!r} (a certificate of your "
            "own: ext_proc_tls_cert and ext_proc_tls_key)"
        )


def _check_engines(texts: list[str], where: str) -> None:
    """``[workers] engines`` (``where`` names it) as `resolve` checks ``--engine``: each
    item's form, and its id and URL against the other items'.

    Raises:
        ConfigError: `EngineAddress.parse`'s or `_check_engine_ids`'s, after ``where``.
    """
    try:
        engines = [EngineAddress.parse(text) for text in texts]
        _check_engine_ids(engines, (), workers=0, prefill_workers=0)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_remote_workers(texts: list[str], where: str) -> None:
    """``[workers] remote_workers`` (``where`` names it) as `resolve` checks
    ``--remote-worker``: each item's form, and its id and address against the other items'.

    Raises:
        ConfigError: `resolve_remote_workers`'s, after ``where``.
    """
    try:
        resolve_remote_workers(texts, workers=0, prefill_workers=0)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_kv_replay(texts: list[str], where: str) -> None:
    for text in texts:
        _parse_kv_replay(text, where)


def _check_api_keys(keys: list[str], where: str) -> None:
    for key in keys:
        check_key(key, where)


#: What `check_config_file` checks each ``[workers]``, ``[server]`` and ``[gateway]`` key's value
#: with, given where it is: the function `resolve` checks it with when it uses it. A key not
#: here names a file (read where it is served) or a secret of any form (``engine_api_key``).
#: docs/configuration.md lists both kinds from here.
TABLE_VALUE_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "engines": _check_engines,
    "remote_workers": _check_remote_workers,
    "kv_events_bind": _check_kv_events_bind,
    "kv_replay": _check_kv_replay,
    "api_keys": _check_api_keys,
    "trusted_api_keys": _check_api_keys,
    "processes": _check_processes,
    **{
        key: functools.partial(_check_gateway_value, key)
        for key in ("ext_proc_port", "ext_proc_health_port", "ext_proc_fallbacks", "ext_proc_tls")
    },
}


def check_config_file(path: str | os.PathLike[str]) -> PipelineConfig:
    """What ``interlock config check`` checks: the configuration file at ``path`` read as
    ``interlock serve --config`` and ``route --config`` read it, each value checked by the
    function they check it with at start: its knobs (and their combinations:
    `PipelineConfig.validate`), its ``[objectives]`` and ``[[model_rewrites]]``, and each
    ``[workers]``, ``[server]`` and ``[gateway]`` key (`TABLE_VALUE_CHECKS`), every one of
    them, since no flag replaces any. Not what depends on the machine, the environment or
    the command line: the files the file names (API keys, certificates), and how keys
    combine with flags and with each other (``kv_replay`` needs ``kv_events_bind``, several
    ``processes`` need workers outside the process, ...). Returns the knobs.

    Raises:
        ConfigError: the first thing wrong, naming the file, the table and the key.
    """
    config = PipelineConfig.from_toml(path).validate()
    PipelineConfig.objectives_table(path)
    PipelineConfig.model_rewrites_table(path)
    for name, read in (
        (WORKERS_TABLE, PipelineConfig.workers_table),
        (SERVER_TABLE, PipelineConfig.server_table),
        (GATEWAY_TABLE, PipelineConfig.gateway_table),
    ):
        for key, value in read(path).items():
            check = TABLE_VALUE_CHECKS.get(key)
            if check is not None:
                check(value, f"{path}: [{name}] {key}")
    return config


def _resolve_ext_proc_tls(
    args: argparse.Namespace, names: dict[str, str] | None = None
) -> ExtProcTLS | None:
    """The ext_proc port's TLS from ``--ext-proc-tls`` and ``--ext-proc-tls-cert``/``-key``
    (or the ``[gateway]`` keys `_apply_gateway_table` set: ``names`` says them in errors; None:
    h2c): the certificate files read and checked, or a self-signed certificate made.

    Raises:
        ConfigError: a TLS setting without ``--ext-proc-port``, only one of the certificate and
            its key, a mode with them, or a file that cannot be used (`load_tls`: missing,
            unreadable, not PEM, encrypted, not a pair, a key no gateway can handshake with);
            the message names the flag or the table's key the user gave.
    """
    names = names or {}

    def name(key: str) -> str:
        return names.get(key) or "--" + key.replace("_", "-")

    mode: str | None = getattr(args, "ext_proc_tls", None)
    cert: str | None = getattr(args, "ext_proc_tls_cert", None)
    key: str | None = getattr(args, "ext_proc_tls_key", None)
    given = [
        name(setting)
        for setting, value in zip(EXT_PROC_TLS_KEYS, (mode, cert, key), strict=True)
        if value is not None
    ]
    if not given:
        return None
    if getattr(args, "ext_proc_port", None) is None:
        raise ConfigError(f"{given[0]} needs --ext-proc-port (TLS is for the picker's port)")
    if mode is not None and mode not in EXT_PROC_TLS_MODES:
        raise ConfigError(f"{name('ext_proc_tls')} {mode!r}: give {EXT_PROC_TLS_MODES_TEXT}")
    # Imported here: the gRPC stack loads only for a router that serves it.
    from ..gateway._tls import load_tls, self_signed_tls

    if cert is not None or key is not None:
        if cert is None or key is None:
            have, need = "ext_proc_tls_cert", "ext_proc_tls_key"
            if cert is None:
                have, need = need, have
            # The missing one is asked for where the other one is.
            wanted = f"[gateway] {need} of {args.config}" if have in names else name(need)
            raise ConfigError(
                f"{name(have)} needs {wanted} too (a certificate and its private key)"
            )
        if mode is not None:
            raise ConfigError(
                f"{name('ext_proc_tls')} {mode} with {name('ext_proc_tls_cert')} and "
                f"{name('ext_proc_tls_key')}: the files already turn TLS on with that "
                f"certificate; drop {name('ext_proc_tls')}"
            )
        return load_tls(
            cert, key, cert_flag=name("ext_proc_tls_cert"), key_flag=name("ext_proc_tls_key")
        )
    if mode == EXT_PROC_TLS_SELF_SIGNED:
        return self_signed_tls([args.host])
    return None


# -- running -----------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    """``interlock serve``: serve until Ctrl-C; returns the exit code."""
    return _run(args)


def run_route(args: argparse.Namespace) -> int:
    """``interlock route``: serve the standalone router, or answer ``--once``."""
    if args.url is not None and args.once is None:
        print("interlock route: --url needs --once", file=sys.stderr)
        return 2
    if args.once is not None:
        body = sys.stdin.read() if args.once == "-" else args.once
        if args.url is not None:
            try:
                ordinary, trusted, _ = resolve_api_keys(args)
            except ConfigError as exc:
                return _invalid(args.command, exc)
            return _route_remote(args.url, body, key=next(iter(trusted + ordinary), None))
        try:
            setup = resolve(args)
        except (ConfigError, TokenizerError, ChatTemplateError) as exc:
            return _invalid(args.command, exc)
        try:
            status, answer = trio.run(_route_once, setup, body.encode())
        except BaseException as exc:
            worker_error, rest = _split(exc, _WORKER_ERRORS)
            if rest is None and worker_error is not None:
                return _worker_failure(setup, _first_leaf(worker_error))
            raise
        print(answer.decode())
        return 0 if status == 200 else 1
    return _run(args)


def _invalid(command: str, exc: Exception) -> int:
    what = "configuration" if isinstance(exc, ConfigError) else "tokenizer"
    print(f"interlock {command}: invalid {what}: {exc}", file=sys.stderr)
    return 2


#: What a remote worker's `RemoteEngine.run` raises when the pipeline starts with it (and
#: `EtcdError`: etcd could not be reached for the first listing of the workers).
_WORKER_ERRORS = (WorkerMismatch, WorkerUnreachable, ProtocolError, EtcdError)


def _worker_failure(setup: ServeSetup, exc: BaseException) -> int:
    """Report a remote worker the pipeline could not start with; the exit status (1)."""
    command = f"interlock {setup.command}"
    engine_ids = {e.worker_id for e in setup.openai_engines}
    if getattr(exc, "worker_id", None) in engine_ids and isinstance(
        exc, WorkerMismatch | WorkerUnreachable
    ):
        # The engine's own error says what to change on either side (docs/engines.md).
        what = "wrong engine" if isinstance(exc, WorkerMismatch) else "cannot reach an engine"
        print(f"{command}: {what}: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, TokenizerMismatch):
        builtin = isinstance(setup.preprocessor.tokenizer, ByteTokenizer)
        hint = (
            f"this frontend's tokenizer is {setup.preprocessor.source} (--tokenizer); every "
            "remote worker must generate with the same one: start it with `interlock worker "
            f"--tokenizer {BUILTIN_TOKENIZER if builtin else setup.preprocessor.source}`"
        )
        print(f"{command}: wrong remote worker: {exc}\n  here: {hint}", file=sys.stderr)
    elif isinstance(exc, WorkerMismatch):
        hint = (
            "--remote-worker ID=HOST:PORT/ROLE sets the id and role expected, and every worker "
            f"must page its KV cache in blocks of kv_block_size={setup.config.kv_block_size} "
            "tokens: start the worker with that --block-size, or serve with --kv-block-size "
            "equal to the workers'"
        )
        print(f"{command}: wrong remote worker: {exc}\n  here: {hint}", file=sys.stderr)
    elif isinstance(exc, EtcdError):
        print(f"{command}: cannot list the workers in etcd (--etcd): {exc}", file=sys.stderr)
    elif isinstance(exc, WorkerUnreachable):
        print(f"{command}: cannot reach a remote worker: {exc}", file=sys.stderr)
    else:
        print(f"{command}: cannot use a remote worker: {exc}", file=sys.stderr)
    return 1


#: Allocations between two collections of the young generation in a serving process
#: (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Set this process's garbage collector up for serving: everything loaded so far (the
    modules, the tokenizer's wrapper and chat template, the configuration) is collected once
    and then left out of every later collection (`gc.freeze`), and the young generation is
    collected every `GC_YOUNG_THRESHOLD` allocations. A request's objects are mostly freed by
    reference counting before a collection sees them, so a collection every 700 allocations
    re-examined the survivors over and over: it cost ~7 % of a short request's CPU, and each
    full collection walked every object loaded at start."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _run(args: argparse.Namespace) -> int:
    try:
        setup = resolve(args)
        if setup.processes > 1 and setup.process is None:
            return _supervise(args, setup)
        end_tracing = configure_otlp(getattr(args, "otlp_endpoint", None), os.environ)
    except (ConfigError, TokenizerError, ChatTemplateError) as exc:
        return _invalid(args.command, exc)
    if getattr(args, "own_process", False):
        tune_gc()
    try:
        trio.run(serve_frontend, setup)
    except BaseException as exc:
        # Ctrl-C, bind errors and remote workers that cannot be used surface through nested
        # nurseries, possibly as groups.
        _, rest = _split(exc, KeyboardInterrupt)
        if rest is None:
            print(f"interlock {setup.command}: stopped", file=sys.stderr)
            return 0
        worker_error, rest = _split(rest, _WORKER_ERRORS)
        if rest is None and worker_error is not None:
            return _worker_failure(setup, _first_leaf(worker_error))
        if rest is None:
            raise
        config_error, rest = _split(rest, ConfigError)
        leaf = None if config_error is None else _first_leaf(config_error)
        if rest is None and isinstance(leaf, ConfigError):
            # Found only once serving (an ExtProcTLS built unchecked, refused by its context).
            return _invalid(setup.command, leaf)
        bind_error, rest = _split(rest, OSError)
        if rest is None and bind_error is not None:
            print(
                f"interlock {setup.command}: cannot listen on {setup.host}:{setup.port}: "
                f"{_first_leaf(bind_error)}",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        if end_tracing is not None:
            end_tracing()  # flush the spans still batched
    return 0


def _supervise(args: argparse.Namespace, setup: ServeSetup) -> int:
    """``--processes N``: bind the port (and the KV-event relay), run N children of this
    command line on it until a signal (`Supervisor`); the exit status."""
    command = f"interlock {setup.command}"
    config = HypercornConfig()
    host, port = setup.host, setup.port
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    try:
        listener = config.create_sockets().insecure_sockets[0]
        listener.listen(_BACKLOG)
    except OSError as exc:
        print(f"{command}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    relay: KvEventRelay | None = None
    directory = tempfile.mkdtemp(prefix="interlock-kv-")
    try:
        if setup.kv_events_bind is not None:
            try:
                relay = KvEventRelay(setup.kv_events_bind, f"ipc://{directory}/relay")
            except KvFeedBindError as exc:
                print(f"{command}: {exc}", file=sys.stderr)
                return 1
            relay.start()
        argv = getattr(args, "argv", None) or sys.argv[1:]
        supervisor = Supervisor(
            [sys.executable, "-m", "interlock", *argv],
            setup.processes,
            listener,
            setup.command,
            kv_relay=None if relay is None else relay.relay_endpoint,
        )
        code = trio.run(functools.partial(supervisor.run, describe=_processes_banner))
    finally:
        listener.close()
        if relay is not None:
            relay.close()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{command}: all {setup.processes} processes exited", file=sys.stderr, flush=True)
    return code


def _processes_banner(reports: list[dict[str, Any]]) -> str:
    """The first process's banner, with a line on all of them (and where each serves
    /metrics, when not on the shared port)."""
    lines: list[str] = reports[0]["banner"].splitlines()
    at = next((i for i, line in enumerate(lines) if line == "  configuration:"), len(lines))
    pids = ", ".join(str(r["pid"]) for r in reports)
    extra = [
        f"  processes    {len(reports)} (pids {pids}) accept on this one socket, each with its "
        "own router; one that dies is started again"
    ]
    extra += [
        f"  {'':<12} process {r['index']}: /metrics at {r['metrics_url']}/metrics"
        for r in reports
        if r.get("metrics_url")
    ]
    return "\n".join([*lines[:at], *extra, *lines[at:]])


#: The listening socket's backlog (Hypercorn's, as `serve_http` sets it).
_BACKLOG = 4096


def _split(
    exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)
    return (exc, None) if isinstance(exc, kind) else (None, exc)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def serve_frontend(
    setup: ServeSetup, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Build the pipeline on the workers and serve it until cancelled (or, in the main
    thread, drained after SIGTERM or SIGINT: `_drain_on_signals`); print the banner once
    listening (and report the URL through ``task_status``).

    Waits first for every remote worker's handshake (up to 10 s each), and with ``--etcd``
    for the first listing of the workers registered there and their handshakes (up to 5 s
    each; a worker that fails its handshake is logged and skipped).

    Raises:
        WorkerUnreachable, WorkerMismatch, ProtocolError: a remote worker could not be used.
        EtcdError: ``--etcd`` given and etcd could not be reached at the start.
        OSError: the address cannot be bound.
    """
    metrics = HttpMetrics()
    async with (
        _kv_event_feed(setup) as feed,
        build_pipeline(setup.config, setup.components(metrics, kv_events=feed)) as pipeline,
        _discovering(setup, pipeline, feed) as discovered,
    ):
        app = build_app(
            pipeline,
            model=setup.model,
            preprocessor=setup.preprocessor,
            metrics=metrics,
            limits=setup.limits,
            route_api=setup.route_api,
            api_keys=setup.api_keys,
            metrics_endpoint=setup.metrics_port is None,
            objectives=setup.objectives,
            model_rewrites=setup.model_rewrites,
        )
        drain: Drain = app.state.drain
        child = setup.process
        served = app if child is None else with_process_header(app, child.index)
        # A child of --processes accepts on the socket its supervisor bound.
        sock = None if child is None else socket.socket(fileno=child.listen_fd)

        async def serve_until_drained(*, task_status: trio.TaskStatus[str]) -> None:
            # Hypercorn stops once the drain is over: it closes its listener and its idle
            # keep-alive connections at once. Its own grace period is only a backstop: the
            # drain has ended or cut every request by then.
            await serve_http(
                served,
                setup.host,
                setup.port,
                sock=sock,
                shutdown_trigger=drain.wait_drained,
                graceful_timeout=_HYPERCORN_GRACE,
                header_timeout=setup.limits.request_read_timeout,
                write_timeout=setup.write_timeout,
                server=setup.http_server,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            try:
                url = await nursery.start(serve_until_drained)
            except BaseExceptionGroup as group:
                # A bind error arrives on its own, not as a group of one.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            metrics_url = await _serve_metrics(nursery, setup, app)
            ext_proc = await _serve_ext_proc(nursery, setup, app)
            text = banner(
                setup, url, discovered=discovered, metrics_url=metrics_url, ext_proc=ext_proc
            )
            if child is None:
                print(text, flush=True)
            else:
                _report_ready(child, url, metrics_url, text)
            warning = exposure_warning(setup.command, setup.host, setup.api_keys)
            if warning is not None and (child is None or child.index == 0):
                print(warning, file=sys.stderr, flush=True)
            task_status.started(url)
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(_drain_on_signals, drain, setup)
        if drain.draining:
            print(
                f"interlock {setup.command}: drained: {drain.summary()}; exiting",
                file=sys.stderr,
                flush=True,
            )


def _report_ready(child: ChildSpec, url: str, metrics_url: str | None, text: str) -> None:
    """Tell the supervisor this child listens (what it would have printed, as one JSON
    object on its ready pipe, then closed)."""
    report = {
        "index": child.index,
        "pid": os.getpid(),
        "url": url,
        "metrics_url": metrics_url,
        "banner": text,
    }
    with open(child.ready_fd, "wb", closefd=True) as pipe:
        pipe.write(json.dumps(report).encode())


async def _serve_metrics(nursery: trio.Nursery, setup: ServeSetup, app: Any) -> str | None:
    """With ``--metrics-port``: serve ``app``'s ``/metrics`` there, in ``nursery``; its URL.

    Raises:
        OSError: the metrics address cannot be bound (the message names the flags).
    """
    if setup.metrics_port is None:
        return None
    host = setup.metrics_host if setup.metrics_host is not None else setup.host
    try:
        url: str = await nursery.start(
            functools.partial(serve_http, server=setup.http_server),
            build_metrics_app(app),
            host,
            setup.metrics_port,
        )
    except BaseException as exc:
        bind_error, _ = _split(exc, OSError)
        if bind_error is None:
            raise
        leaf = _first_leaf(bind_error)
        raise OSError(
            getattr(leaf, "errno", None),
            f"{leaf} (the /metrics address, --metrics-host/--metrics-port {host}:"
            f"{setup.metrics_port})",
        ) from None
    return url


async def _serve_ext_proc(
    nursery: trio.Nursery, setup: ServeSetup, app: Any
) -> tuple[str, str | None] | None:
    """With ``--ext-proc-port``: serve the endpoint picker over ``app``'s frontend (and gRPC
    health on ``--ext-proc-health-port``) in ``nursery``, on ``setup.host``; where each
    listens (``host:port``).

    Raises:
        OSError: an address cannot be bound (the message names the flag).
        ConfigError: the TLS certificate cannot be served (`serve_ext_proc`).
    """
    if setup.ext_proc_port is None:
        return None
    # Imported here: the gRPC stack loads only for a router that serves it.
    from ..gateway import ExtProcPicker, serve_ext_proc

    picker = ExtProcPicker(app.state.frontend, fallbacks=setup.ext_proc_fallbacks)
    try:
        found: tuple[str, str | None] = await nursery.start(
            functools.partial(
                serve_ext_proc,
                picker,
                setup.host,
                setup.ext_proc_port,
                health_port=setup.ext_proc_health_port,
                tls=setup.ext_proc_tls,
            )
        )
    except BaseException as exc:
        refused, _ = _split(exc, ConfigError)
        if refused is not None:
            # The TLS certificate cannot be served: the configuration's fault, not the port's.
            raise _first_leaf(refused) from None
        bind_error, _ = _split(exc, OSError)
        if bind_error is None:
            raise
        leaf = _first_leaf(bind_error)
        # serve_ext_proc names the address it could not bind in the error's filename.
        flag, port_number = "--ext-proc-port", setup.ext_proc_port
        health = setup.ext_proc_health_port
        if health is not None and str(getattr(leaf, "filename", "")).endswith(f":{health}"):
            flag, port_number = "--ext-proc-health-port", health
        raise OSError(
            getattr(leaf, "errno", None),
            f"{getattr(leaf, 'strerror', None) or leaf} ({flag} {setup.host}:{port_number})",
        ) from None
    return found


#: How long Hypercorn lets the handlers left after a drain finish before cancelling them.
_HYPERCORN_GRACE = 1.0


async def _drain_on_signals(drain: Drain, setup: ServeSetup) -> None:
    """On SIGTERM or SIGINT, drain (`Drain.run` with ``--drain-timeout``); a second signal
    ends the grace period at once. The server stops when the drain is over."""
    # Ctrl-C and SIGTERM (what container runtimes send) both drain, as uvicorn and vLLM's
    # server do, even when the process was started with SIGINT ignored (a background job of
    # a script); the second one stops at once.
    command = setup.command
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if setup.process is not None:
                # The receiver is open: the SIGTERM this sends is queued, never lost.
                nursery.start_soon(signal_when_supervisor_exits, setup.process, command)
            async for number in signals:
                name = signal.Signals(number).name
                if not drain.draining:
                    print(
                        f"interlock {command}: {name}, stopping: draining {drain.in_flight} "
                        f"request(s) in flight for up to {setup.drain_timeout:g}s; /health "
                        "answers 503 and new requests 503 (a second signal stops at once)",
                        file=sys.stderr,
                        flush=True,
                    )
                    nursery.start_soon(drain.run, setup.drain_timeout)
                else:
                    print(
                        f"interlock {command}: {name} again, stopping at once: cutting "
                        f"{drain.in_flight} request(s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    drain.cut()


@asynccontextmanager
async def _kv_event_feed(setup: ServeSetup) -> AsyncIterator[KvEventFeed | None]:
    """With ``--kv-events-bind``: the `KvEventFeed` bound there, receiving until the block
    ends; without: None."""
    if setup.kv_events_bind is None:
        yield None
        return
    relay = None if setup.process is None else setup.process.kv_relay
    # With --processes, the supervisor binds the endpoint and relays the events to each.
    feed = KvEventFeed(setup.kv_events_bind if relay is None else relay, connect=relay is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        try:
            yield feed
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _discovering(
    setup: ServeSetup, pipeline: Pipeline, feed: KvEventFeed | None = None
) -> AsyncIterator[WorkerWatcher | None]:
    """With ``--etcd``: a `WorkerWatcher` following the workers registered in etcd, from its
    first listing on (its workers joined) until the block ends; without: None."""
    if setup.etcd is None:
        yield None
        return
    async with setup.etcd.client() as client, trio.open_nursery() as nursery:
        watcher: WorkerWatcher = await nursery.start(
            functools.partial(
                watch_workers,
                client,
                pipeline,
                prefix=setup.etcd_prefix,
                context=setup.engine_context(feed),
                new_store_grace=setup.etcd_new_store_grace,
            )
        )
        try:
            yield watcher
        finally:
            nursery.cancel_scope.cancel()


def banner(
    setup: ServeSetup,
    url: str,
    *,
    discovered: WorkerWatcher | None = None,
    metrics_url: str | None = None,
    ext_proc: tuple[str, str | None] | None = None,
) -> str:
    """What ``serve`` prints once it listens: where, what, and the effective configuration
    (with ``discovered``, the workers the etcd watcher found at the start; with
    ``metrics_url``, where ``/metrics`` is served instead of at ``url``)."""
    lines = [f"interlock {setup.command}: listening on {url} (OpenAI API at {url}/v1)"]
    timing = (
        "zero-time steps"
        if setup.timing.is_zero
        else f"mock model timing at {setup.timing.speedup_ratio:g}x"
    )
    mocks = []
    if setup.workers:
        mocks.append(f"{setup.workers} mock workers (ids 1-{setup.workers})")
    if setup.prefill_workers:
        mocks.append(
            f"{setup.prefill_workers} prefill workers (ids {setup.workers + 1}-"
            f"{setup.workers + setup.prefill_workers})"
        )
    lines += [
        f"  model        {setup.model!r}, context {setup.limits.max_model_len} tokens",
        f"  tokenizer    {setup.preprocessor.source} (chat template "
        f"{setup.preprocessor.chat_template.name})",
    ]
    if mocks:
        lines.append(f"  workers      {', '.join(mocks)}; {timing}")
    for index, remote in enumerate(setup.remote_workers):
        heading = "remote" if index == 0 else ""
        lines.append(
            f"  {heading:<12} worker {remote.worker_id} at {remote.address} ({remote.role}), "
            "connected"
        )
    for index, engine in enumerate(setup.openai_engines):
        heading = "engines" if index == 0 else ""
        replay = setup.kv_replay.get(engine.worker_id)
        lines.append(
            f"  {heading:<12} engine {engine.worker_id} at {engine.url} ({engine.role}), healthy"
            + (f"; KV replay {replay}" if replay else "")
        )
    if setup.kv_events_bind is not None:
        lines.append(
            f"  KV events    bound at {setup.kv_events_bind} (topic kv@ID feeds engine ID)"
        )
    elif setup.openai_engines and setup.config.router_mode == "kv":
        lines.append(
            "  KV events    none: without --kv-events-bind the kv router sees no engine's cache"
        )
    if setup.etcd is not None:
        found = sorted(discovered.records) if discovered is not None else []
        lines.append(
            f"  etcd         workers under {workers_prefix(setup.etcd.prefix)} at "
            f"{setup.etcd.describe()}, followed as they come and go; found "
            + (", ".join(f"worker {i}" for i in found) if found else "none yet")
        )
    if setup.selection_policy_path is not None:
        lines.append(f"  policy       {setup.selection_policy_path} (in place of router_mode)")
    if setup.route_api:
        lines.append(f"  route API    {url}/v1/route (docs/route-api.md)")
    if ext_proc is not None:
        tls = setup.ext_proc_tls
        transport = "h2c" if tls is None else f"TLS, {tls.source}"
        lines.append(
            f"  ext_proc     {ext_proc[0]} ({transport}; Envoy's endpoint picker, GAIE EPP)"
            + (f"; gRPC health on {ext_proc[1]} (h2c)" if ext_proc[1] is not None else "")
        )
    open_paths = OPEN_PATHS - {"/metrics"} if metrics_url is not None else OPEN_PATHS
    lines.append(f"  API keys     {describe(setup.api_keys, setup.api_key_sources, open_paths)}")
    if metrics_url is not None:
        lines.append(f"  metrics      {metrics_url}/metrics (not on {url})")
    lines.append("  configuration:")
    values = setup.config.to_dict()
    width = max(map(len, values))
    lines += [f"    {key:<{width}} = {value!r}" for key, value in values.items()]
    return "\n".join(lines)


async def _route_once(setup: ServeSetup, body: bytes) -> tuple[int, bytes]:
    metrics = HttpMetrics()
    async with (
        _kv_event_feed(setup) as feed,
        build_pipeline(setup.config, setup.components(metrics, kv_events=feed)) as pipeline,
        _discovering(setup, pipeline, feed),
    ):
        app = build_app(
            pipeline,
            model=setup.model,
            preprocessor=setup.preprocessor,
            metrics=metrics,
            limits=setup.limits,
            route_api=True,
        )
        return await call_asgi(app, "POST", "/v1/route", body)


async def call_asgi(
    app: Any, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[int, bytes]:
    """Call an ASGI app in-process (no sockets); returns the status and the whole body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent = False
    status = 0
    parts: list[bytes] = []
    finished = trio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    return status, b"".join(parts)


def _route_remote(url: str, body: str, *, key: str | None = None) -> int:
    headers = {"content-type": "application/json"}
    if key is not None:
        # The router at URL wants a key: the first trusted key given, else the first one.
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/route", data=body.encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode())
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"interlock route: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
