"""``interlock serve`` and ``interlock route``: the HTTP frontend on in-process mock workers.

`add_serve_parser` and `add_route_parser` register the commands on the top-level parser's
subparsers; each sets ``run=`` to a function taking the parsed namespace and returning the exit
code. Configuration comes from, lowest to highest precedence: the defaults, ``--config FILE``,
``INTERLOCK_<KNOB>`` environment variables, and one flag per knob.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from .._config import PipelineConfig, knob_names, parse_knob_text
from .._errors import ConfigError
from .._pipeline import Components, build_pipeline
from ..engines import Role
from ..engines.mock import MockEngine, MockTiming
from ..processing import ChatTemplateError, Tokenizer, TokenizerError
from ._app import HttpLimits, build_app
from ._metrics import HttpMetrics
from ._preprocess import Preprocessor
from ._serve import serve_http

#: Text whose tokens the mock workers generate, so that a mock answers in (shuffled) words.
MOCK_TEXT = (
    " The quick brown fox jumps over the lazy dog while a small bird sings in the tall green "
    "tree, and the river runs slowly past the old stone bridge toward the quiet sea. People "
    "walk along the road, talk about the weather, and share bread, tea and stories."
)


def mock_token_pool(tokenizer: Tokenizer) -> list[int]:
    """The ids the mock workers draw from: the tokens of `MOCK_TEXT`, plus each end-of-sequence
    id once, so that answers end by themselves now and then (``ignore_eos`` turns that off)."""
    pool = list(dict.fromkeys(tokenizer.encode(MOCK_TEXT)))
    return pool + [t for t in tokenizer.eos_token_ids if t not in pool]


@attrs.frozen(kw_only=True)
class ServeSetup:
    """Everything ``serve`` and ``route`` resolved from their flags, before trio starts."""

    config: PipelineConfig
    preprocessor: Preprocessor
    limits: HttpLimits
    host: str
    port: int
    model: str
    workers: int
    prefill_workers: int
    timing: MockTiming
    route_api: bool
    command: str

    def engines(self) -> tuple[list[MockEngine], list[MockEngine]]:
        """Fresh mock workers: ids 1..workers, then the prefill workers."""
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
        role: Role = "decode" if self.prefill_workers else "agg"
        workers = [MockEngine(i, role, **common) for i in range(1, self.workers + 1)]
        first = self.workers + 1
        prefill = [
            MockEngine(i, "prefill", **common) for i in range(first, first + self.prefill_workers)
        ]
        return workers, prefill


# -- parsers -----------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``interlock serve`` (sets ``run=``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API on in-process mock workers",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /live and "
            "/metrics on in-process mock workers, until Ctrl-C. Point any OpenAI client at "
            "http://HOST:PORT/v1."
        ),
    )
    _add_common(parser)
    parser.add_argument(
        "--route-api",
        action="store_true",
        help="also serve the route-only API (POST /v1/route ...; see docs/route-api.md)",
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
    parser.set_defaults(run=run_route)
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_common(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0 = any)")
    server.add_argument("--model-name", default="mock", help="the model name clients use (mock)")
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
    workers = parser.add_argument_group("mock workers")
    workers.add_argument("--workers", type=int, default=4, metavar="N", help="workers (4)")
    workers.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        metavar="M",
        help="prefill workers (0); with any, the N workers serve decode legs",
    )
    workers.add_argument(
        "--speedup",
        type=float,
        default=10.0,
        help="run the mock model's timing this many times faster than a real GPU (10)",
    )
    workers.add_argument(
        "--zero-time", action="store_true", help="mock steps take no time (benchmarks)"
    )
    text = parser.add_argument_group("text")
    text.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json or Hugging Face model directory (default: built-in bytes)",
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
        "--log-transitions",
        metavar="PATH.jsonl",
        help="append every transition record to this JSONL file (= --transition-log-path)",
    )
    for name, field in attrs.fields_dict(PipelineConfig).items():
        doc = field.metadata.get("doc", "")
        if str(field.type).startswith("bool"):
            config.add_argument(
                _flag(name), dest=f"knob_{name}", action=argparse.BooleanOptionalAction, help=doc
            )
        else:
            config.add_argument(_flag(name), dest=f"knob_{name}", metavar="VALUE", help=doc)


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


def resolve(args: argparse.Namespace) -> ServeSetup:
    """Everything the command needs, checked before anything starts.

    Raises:
        ConfigError, TokenizerError, ChatTemplateError: with a message saying what to fix.
    """
    config = resolve_config(args)
    for flag, value, minimum in (
        ("--workers", args.workers, 0),
        ("--prefill-workers", args.prefill_workers, 0),
        ("--max-model-len", args.max_model_len, 2),
        ("--max-body-bytes", args.max_body_bytes, 1024),
    ):
        if value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")
    if args.workers == 0:
        raise ConfigError("--workers must be at least 1: nothing could serve a request")
    if not args.speedup > 0:
        raise ConfigError(f"--speedup must be positive, got {args.speedup}")
    if args.tokenizer is not None:
        preprocessor = Preprocessor.load(args.tokenizer, chat_template=args.chat_template)
    else:
        preprocessor = Preprocessor.default()
        if args.chat_template is not None:
            from ..processing import load_chat_template

            preprocessor = attrs.evolve(
                preprocessor, chat_template=load_chat_template(args.chat_template)
            )
    return ServeSetup(
        config=config,
        preprocessor=preprocessor,
        limits=HttpLimits(max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len),
        host=args.host,
        port=args.port,
        model=args.model_name,
        workers=args.workers,
        prefill_workers=args.prefill_workers,
        timing=MockTiming.zero() if args.zero_time else MockTiming(speedup_ratio=args.speedup),
        route_api=args.command == "route" or bool(getattr(args, "route_api", False)),
        command=args.command,
    )


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
            return _route_remote(args.url, body)
        try:
            setup = resolve(args)
        except (ConfigError, TokenizerError, ChatTemplateError) as exc:
            return _invalid(args.command, exc)
        status, answer = trio.run(_route_once, setup, body.encode())
        print(answer.decode())
        return 0 if status == 200 else 1
    return _run(args)


def _invalid(command: str, exc: Exception) -> int:
    what = "configuration" if isinstance(exc, ConfigError) else "tokenizer"
    print(f"interlock {command}: invalid {what}: {exc}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    try:
        setup = resolve(args)
    except (ConfigError, TokenizerError, ChatTemplateError) as exc:
        return _invalid(args.command, exc)
    try:
        trio.run(serve_frontend, setup)
    except BaseException as exc:
        # Ctrl-C and bind errors surface through nested nurseries, possibly as groups.
        _, rest = _split(exc, KeyboardInterrupt)
        if rest is None:
            print(f"interlock {setup.command}: stopped", file=sys.stderr)
            return 0
        bind_error, rest = _split(rest, OSError)
        if rest is None and bind_error is not None:
            print(
                f"interlock {setup.command}: cannot listen on {setup.host}:{setup.port}: "
                f"{_first_leaf(bind_error)}",
                file=sys.stderr,
            )
            return 1
        raise
    return 0


def _split(
    exc: BaseException, kind: type[BaseException]
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
    """Build the pipeline on mock workers and serve it until cancelled; print the banner once
    listening (and report the URL through ``task_status``)."""
    metrics = HttpMetrics()
    workers, prefill = setup.engines()
    components = Components(
        workers=workers,
        prefill_workers=prefill,
        tokenizer=setup.preprocessor.tokenizer,
        transition_sinks=[metrics],
    )
    async with build_pipeline(setup.config, components) as pipeline:
        app = build_app(
            pipeline,
            model=setup.model,
            preprocessor=setup.preprocessor,
            metrics=metrics,
            limits=setup.limits,
            route_api=setup.route_api,
        )
        async with trio.open_nursery() as nursery:
            try:
                url = await nursery.start(serve_http, app, setup.host, setup.port)
            except BaseExceptionGroup as group:
                # A bind error arrives on its own, not as a group of one.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            print(banner(setup, url), flush=True)
            task_status.started(url)
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope, setup.command)


async def _stop_on_signals(scope: trio.CancelScope, command: str) -> None:
    # Ctrl-C and SIGTERM (what container runtimes send) both stop the server cleanly, even
    # when the process was started with SIGINT ignored (a background job of a script).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for number in signals:
            print(f"interlock {command}: {signal.Signals(number).name}, stopping", file=sys.stderr)
            scope.cancel()
            return


def banner(setup: ServeSetup, url: str) -> str:
    """What ``serve`` prints once it listens: where, what, and the effective configuration."""
    lines = [f"interlock {setup.command}: listening on {url} (OpenAI API at {url}/v1)"]
    timing = (
        "zero-time steps"
        if setup.timing.is_zero
        else f"mock model timing at {setup.timing.speedup_ratio:g}x"
    )
    prefill = (
        f", {setup.prefill_workers} prefill workers (ids {setup.workers + 1}-"
        f"{setup.workers + setup.prefill_workers})"
        if setup.prefill_workers
        else ""
    )
    lines += [
        f"  model        {setup.model!r}, context {setup.limits.max_model_len} tokens",
        f"  tokenizer    {setup.preprocessor.source} (chat template "
        f"{setup.preprocessor.chat_template.name})",
        f"  workers      {setup.workers} mock workers (ids 1-{setup.workers}){prefill}; {timing}",
    ]
    if setup.route_api:
        lines.append(f"  route API    {url}/v1/route (docs/route-api.md)")
    lines.append("  configuration:")
    values = setup.config.to_dict()
    width = max(map(len, values))
    lines += [f"    {key:<{width}} = {value!r}" for key, value in values.items()]
    return "\n".join(lines)


async def _route_once(setup: ServeSetup, body: bytes) -> tuple[int, bytes]:
    metrics = HttpMetrics()
    workers, prefill = setup.engines()
    components = Components(
        workers=workers,
        prefill_workers=prefill,
        tokenizer=setup.preprocessor.tokenizer,
        transition_sinks=[metrics],
    )
    async with build_pipeline(setup.config, components) as pipeline:
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


def _route_remote(url: str, body: str) -> int:
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/route",
        data=body.encode(),
        headers={"content-type": "application/json"},
        method="POST",
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
