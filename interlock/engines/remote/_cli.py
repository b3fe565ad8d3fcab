"""``interlock worker``: a `MockEngine` served over TCP (the worker protocol).

`add_parser` registers the command on the top-level parser's subparsers and sets ``run=`` to
a function taking the parsed namespace and returning the exit status. Once listening, the
command prints one JSON line to stdout, ``{"worker_id": N, "host": "...", "port": P}`` (how a
script learns the port it got with ``--port 0``), then serves until SIGINT or SIGTERM.

With ``--openai-port`` the same engine is also served behind vLLM's HTTP surface
(`interlock.engines.mock.serve_mock_openai`); both listeners run at once and share the engine,
and the JSON line adds ``"openai_port"`` and ``"openai_url"`` (and ``"kv_events_replay"``, the
bound replay address, with ``--kv-events-replay``). With ``--etcd`` too, the worker's record
carries that surface's ``url`` (on ``--advertise-host``), so that a gateway's picker that finds
workers in etcd can name it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import trio
import zmq

from ..._argtypes import non_negative_float, non_negative_int, port, positive_int
from ..._errors import ConfigError
from ...discovery._etcd import EtcdClient, EtcdError, WorkerRecord, serve_registration
from ...discovery._etcd_options import add_etcd_arguments, etcd_options
from ...processing import TokenizerError
from ...processing._byte_tokenizer import tokenizer_from_spec
from .._protocol import ROLES
from ..mock import (
    FaultSpecError,
    MockEngine,
    MockFault,
    MockOpenAIServer,
    MockTiming,
    mock_token_pool,
    parse_faults,
    serve_mock_openai,
)
from ..mock._http import http_url
from ._auth import SECRET_ENV, load_secret
from ._server import WorkerAddress, WorkerDrain, serve_worker
from ._tls import check_pair, server_context

_logger = logging.getLogger("interlock.engines.remote")

_DESCRIPTION = """\
Run a simulated worker (MockEngine: paged KV cache, vLLM-style scheduler, the reference
timing model) behind a TCP listener that speaks the interlock worker protocol; frontends
reach it with RemoteEngine(host, port, instance_id=..., role=...), or interlock serve
with --remote-worker ID=HOST:PORT. Prints one JSON line, {"worker_id": N, "host": "...",
"port": P}, once listening (and registered in etcd, with --etcd); serves until
SIGINT/SIGTERM, then drains (--drain-timeout). See docs/wire-protocol.md, docs/deploying.md
and docs/operations.md."""

_EXAMPLES = """\
examples:
  interlock worker --id 1 --port 7001
  interlock worker --id 2 --port 0 --zero-time          # the chosen port is in the JSON line
  interlock worker --id 3 --role prefill --speedup 10 --crash-after-tokens 500
  interlock worker --id 4 --port 7004 --tokenizer builtin   # for interlock serve's default
  interlock worker --id 5 --host 0.0.0.0 --port 7005 --etcd http://etcd:2379   # discovered
  interlock worker --id 6 --openai-port 8100 --block-size 32 --tokenizer builtin \
      --kv-events-endpoint tcp://127.0.0.1:5557 --kv-events-replay 'tcp://127.0.0.1:*'
  interlock worker --id 7 --openai-port 0 --fault 'eof:after=5,times=1'   # a vLLM that dies
  interlock worker --id 8 --host 0.0.0.0 --port 7008 --secret-file /etc/interlock/secret \\
      --tls-cert-file /etc/interlock/worker.pem --tls-key-file /etc/interlock/worker.key
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the ``worker`` subcommand; its ``run`` default runs it and returns the exit
    status."""
    parser = subparsers.add_parser(
        "worker",
        help="serve a simulated worker over TCP, for frontends in other processes",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run_worker)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``interlock worker``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=port, default=0, help="port to listen on; 0 lets the OS choose"
    )
    parser.add_argument(
        "--id",
        dest="worker_id",
        type=non_negative_int,
        required=True,
        metavar="N",
        help="the worker's instance id (each worker of a frontend needs its own)",
    )
    parser.add_argument("--role", choices=ROLES, default="agg", help="default: agg")
    parser.add_argument(
        "--block-size", type=positive_int, default=16, help="tokens per KV block (default 16)"
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=positive_int,
        default=16_384,
        help="KV cache capacity in blocks (default 16384)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=256,
        help="sequences running at once (default 256)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=8192,
        metavar="N",
        help="uncached prompt tokens one step may prefill (default 8192)",
    )
    parser.add_argument(
        "--no-chunked-prefill",
        dest="chunked_prefill",
        action="store_false",
        help="prefill a prompt longer than the budget whole, in an empty batch, instead of a "
        "chunk per step",
    )
    parser.add_argument(
        "--max-model-len",
        type=positive_int,
        default=32_768,
        metavar="N",
        help="longest sequence, prompt plus output; longer prompts are refused (default 32768)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="token generator seed (default 0)"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH|builtin",
        default=None,
        help="generate the words of this tokenizer (a tokenizer.json, .json.gz or Hugging Face "
        "model directory; 'builtin' = the built-in byte tokenizer), so that a frontend with the "
        "same --tokenizer can decode the answers; default: any id below 32000",
    )
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument(
        "--speedup",
        type=_speedup,
        default=1.0,
        help="run the timing model this many times faster than real time (default 1.0)",
    )
    timing.add_argument(
        "--zero-time", action="store_true", help="every engine step takes no time at all"
    )
    parser.add_argument(
        "--crash-after-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="fault injection: after N tokens in all, break every stream, refuse new ones and "
        "leave routing (the process keeps running)",
    )
    vllm = parser.add_argument_group("vLLM-compatible HTTP surface (docs/mock-vllm.md)")
    vllm.add_argument(
        "--openai-port",
        type=port,
        default=None,
        metavar="PORT",
        help="also serve the engine behind vLLM's HTTP API (/v1/completions, "
        "/v1/chat/completions, /health, /metrics, /tokenize, ...) on --host:PORT; 0 lets the OS "
        "choose. The worker protocol on --port keeps running beside it, on the same engine; "
        "with --etcd, the worker's record names this surface's URL (docs/gateway.md)",
    )
    vllm.add_argument(
        "--served-model-name",
        default="mock",
        metavar="NAME",
        help="the model name the HTTP surface answers to (default mock)",
    )
    vllm.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="HTTP fault for every request (repeatable): http500, reset:after=N, error:after=N, "
        "eof:after=N, stall:after=N[,seconds=S], slow:seconds=S, burst:after=N,tokens=K; any "
        "takes times=K (only the first K requests). A request's x-interlock-mock-fault header "
        "overrides them",
    )
    vllm.add_argument(
        "--kv-events-endpoint",
        metavar="ENDPOINT",
        default=None,
        help="publish KV events as vLLM does: a ZMQ PUB that connects to ENDPOINT (binds if it "
        "has * or is ipc:// or inproc://), frames [topic, seq, msgpack batch]",
    )
    vllm.add_argument(
        "--kv-events-topic",
        metavar="TOPIC",
        default=None,
        help="the first frame of every KV event message (default kv@<worker id>)",
    )
    vllm.add_argument(
        "--kv-events-replay",
        metavar="ENDPOINT",
        default=None,
        help="bind a ZMQ ROUTER here answering replay requests as vLLM 0.32 does "
        "(tcp://HOST:* picks a port; the JSON line says which)",
    )
    etcd = parser.add_argument_group("discovery (docs/deploying.md)")
    add_etcd_arguments(
        etcd,
        url_help="register in etcd at URL (e.g. http://127.0.0.1:2379) once listening, under a "
        "lease kept alive until the worker stops, so that `interlock serve --etcd URL` finds it",
        prefix_help="register at PREFIX/workers/ID (default interlock; the frontends' "
        "--etcd-prefix)",
        ttl_help="lease TTL: a killed worker disappears from the frontends this long after it "
        "stopped renewing (default 10; etcd raises values below its minimum, about 2)",
    )
    etcd.add_argument(
        "--advertise-host",
        metavar="HOST",
        default=None,
        help="the host frontends reach this worker at, and gateways its --openai-port surface "
        "(default: --host, or this machine's name when --host is a wildcard such as 0.0.0.0)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C: leave etcd, refuse new requests (frontends send them "
        "elsewhere) and give the running streams this long to finish before stopping; "
        "frontends migrate the rest (30; 0 = at once; a second signal stops at once)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        default=None,
        help="serve only frontends that prove they know the secret in this file (at least 16 "
        f"bytes; or {SECRET_ENV} holding the secret itself): give them the same one with "
        "--worker-secret-file. The secret never crosses the wire (docs/wire-protocol.md)",
    )
    parser.add_argument(
        "--tls-cert-file",
        metavar="PATH",
        default=None,
        help="speak TLS to every frontend, with this PEM certificate (chain); needs "
        "--tls-key-file. Frontends then need --worker-tls (docs/wire-protocol.md#tls)",
    )
    parser.add_argument(
        "--tls-key-file",
        metavar="PATH",
        default=None,
        help="the PEM private key of --tls-cert-file",
    )
    parser.add_argument(
        "--tls-client-ca-file",
        metavar="PATH",
        default=None,
        help="with TLS: serve only frontends showing a certificate this PEM CA signed "
        "(mutual TLS; frontends give --worker-cert-file/--worker-key-file)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log to stderr at this level (default info)",
    )


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The worker's TLS context from ``--tls-*`` (None: no TLS). Reads the files.

    Raises:
        ConfigError: only one of ``--tls-cert-file``/``--tls-key-file``,
            ``--tls-client-ca-file`` without them, or an unreadable file (naming the flag).
    """
    cert = getattr(args, "tls_cert_file", None)
    key = getattr(args, "tls_key_file", None)
    client_ca = getattr(args, "tls_client_ca_file", None)
    check_pair(cert, key, "--tls-cert-file", "--tls-key-file")
    if cert is None:
        if client_ca is not None:
            raise ConfigError(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file (client "
                "certificates are checked only over TLS)"
            )
        return None
    return server_context(cert, key, client_ca)


def build_engine(args: argparse.Namespace) -> MockEngine:
    """The `MockEngine` the flags describe. With ``--tokenizer`` it draws its tokens from
    `mock_token_pool` of that tokenizer and decodes with it (as ``interlock serve``'s
    in-process workers do); without, from ids below 32000.

    Raises:
        TokenizerError: ``--tokenizer`` names missing or invalid files.
    """
    timing = MockTiming.zero() if args.zero_time else MockTiming(speedup_ratio=args.speedup)
    text: dict[str, Any] = {}
    if args.tokenizer is not None:
        tokenizer = tokenizer_from_spec(args.tokenizer)
        text = {
            "token_pool": mock_token_pool(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer,
        }
    return MockEngine(
        args.worker_id,
        args.role,
        seed=args.seed,
        timing=timing,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.chunked_prefill,
        max_model_len=args.max_model_len,
        crash_after_tokens=args.crash_after_tokens,
        keep_block_tokens=args.kv_events_endpoint is not None,
        **text,
    )


def run_worker(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; the exit status (1 when it cannot listen, 2 when
    ``--tokenizer`` cannot be loaded)."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s worker " + str(args.worker_id) + " %(levelname)s %(message)s",
    )
    try:
        engine = build_engine(args)
    except TokenizerError as exc:
        print(f"interlock worker: invalid tokenizer: {exc}", file=sys.stderr)
        return 2
    try:
        surface = _surface(args)
        secret = load_secret(getattr(args, "secret_file", None), flag="--secret-file")
        tls = _tls_context(args)
    except ConfigError as exc:
        print(f"interlock worker: {exc}", file=sys.stderr)
        return 2
    if secret is None and args.host not in _LOOPBACK:
        _logger.warning(
            "listening on %s without a secret: any process that reaches this port can run "
            "generation and read the prompts; give --secret-file PATH (or %s)",
            args.host,
            SECRET_ENV,
        )
    registration = None
    try:
        etcd = etcd_options(args)
        client = etcd.client() if etcd is not None else None
    except ConfigError as exc:
        print(f"interlock worker: {exc}", file=sys.stderr)
        return 2
    if etcd is not None and client is not None:
        registration = _Registration(
            client, etcd.prefix, args.etcd_ttl, args.advertise_host, args.block_size
        )
        if surface is not None and args.advertise_host is None and args.host in _WILDCARDS:
            # Not refused: frontends still reach the worker protocol at the machine's name.
            _logger.warning(
                "--openai-port with --etcd on the wildcard --host %s and no --advertise-host: "
                "the record names the HTTP surface at this machine's name (%s), which a "
                "gateway's picker hands Envoy as the endpoint, and Envoy's ORIGINAL_DST "
                "cluster needs an IP address; give --advertise-host IP (the address gateways "
                "reach this worker at)",
                args.host,
                socket.gethostname(),
            )
    error = trio.run(
        functools.partial(
            _serve_until_signalled,
            engine,
            args.host,
            args.port,
            registration,
            surface,
            secret,
            drain_timeout=args.drain_timeout,
            tls=tls,
        )
    )
    if isinstance(error, EtcdError):
        print(f"interlock worker: cannot register in etcd: {error}", file=sys.stderr)
        return 1
    if isinstance(error, zmq.ZMQError):
        print(f"interlock worker: KV event endpoints: {error}", file=sys.stderr)
        return 1
    if error is not None:
        where = f"{args.host}:{args.port}"
        if surface is not None:
            where += f" (and --openai-port {surface.port})"
        print(f"interlock worker: cannot listen on {where}: {error}", file=sys.stderr)
        return 1
    return 0


@attrs.frozen
class _Surface:
    """The vLLM-compatible HTTP surface the flags ask for."""

    port: int
    model: str
    faults: tuple[MockFault, ...]
    kv_events_endpoint: str | None
    kv_events_topic: str | None
    kv_events_replay: str | None
    advertise_host: str | None


def _surface(args: argparse.Namespace) -> _Surface | None:
    """The HTTP surface the flags describe, or None without ``--openai-port``.

    Raises:
        ConfigError: a flag of the surface without ``--openai-port``, or a bad ``--fault``.
    """
    if args.openai_port is None:
        given = [
            flag
            for flag, value in (
                ("--fault", args.fault),
                ("--kv-events-endpoint", args.kv_events_endpoint),
                ("--kv-events-topic", args.kv_events_topic),
                ("--kv-events-replay", args.kv_events_replay),
            )
            if value
        ]
        if given:
            raise ConfigError(
                f"{given[0]} belongs to the vLLM-compatible HTTP surface; add --openai-port PORT "
                "(the worker protocol on --port carries its own KV events)"
            )
        return None
    if args.kv_events_endpoint is None and (args.kv_events_topic or args.kv_events_replay):
        raise ConfigError(
            "--kv-events-topic and --kv-events-replay need --kv-events-endpoint ENDPOINT "
            "(where the PUB socket connects)"
        )
    faults: list[MockFault] = []
    for spec in args.fault:
        try:
            faults.extend(parse_faults(spec))
        except FaultSpecError as exc:
            raise ConfigError(f"--fault {spec!r}: {exc}") from None
    return _Surface(
        port=args.openai_port,
        model=args.served_model_name,
        faults=tuple(faults),
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_topic=args.kv_events_topic,
        kv_events_replay=args.kv_events_replay,
        advertise_host=args.advertise_host,
    )


@attrs.frozen
class _Registration:
    client: EtcdClient
    prefix: str
    ttl: int
    advertise_host: str | None
    block_size: int

    def record(
        self, engine: MockEngine, address: WorkerAddress, openai_port: int | None = None
    ) -> WorkerRecord:
        """The worker's etcd record: where frontends reach its worker protocol and, with
        ``openai_port`` (its ``--openai-port`` surface's port), the ``url`` of its HTTP
        surface on the same advertised host (what a gateway's picker sends requests to)."""
        host = self.advertise_host or address.host
        if host in _WILDCARDS:
            host = socket.gethostname()
        url = None if openai_port is None else http_url(host, openai_port)
        return WorkerRecord(
            worker_id=engine.instance_id,
            host=host,
            port=address.port,
            role=engine.role,
            block_size=self.block_size,
            url=url,
        )


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


async def _serve_until_signalled(
    engine: MockEngine,
    host: str,
    port: int,
    registration: _Registration | None = None,
    surface: _Surface | None = None,
    secret: bytes | None = None,
    *,
    drain_timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> OSError | EtcdError | zmq.ZMQError | None:
    drain = WorkerDrain()
    registered = trio.CancelScope()
    deregistered = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                address: WorkerAddress = await nursery.start(
                    functools.partial(
                        serve_worker, engine, host, port, drain=drain, secret=secret, tls=tls
                    )
                )
            except OSError as exc:
                return exc
            line: dict[str, Any] = {
                "worker_id": engine.instance_id,
                "host": address.host,
                "port": address.port,
            }
            # The HTTP surface listens before the worker registers: its record names the
            # surface's URL (the port the OS chose), for gateways' pickers.
            openai_port: int | None = None
            if surface is not None:
                try:
                    server: MockOpenAIServer = await nursery.start(
                        functools.partial(
                            serve_mock_openai,
                            engine,
                            host,
                            surface.port,
                            model=surface.model,
                            faults=surface.faults,
                            advertise_host=surface.advertise_host,
                            run_engine=False,  # serve_worker runs it
                            kv_events_endpoint=surface.kv_events_endpoint,
                            kv_events_topic=surface.kv_events_topic,
                            kv_events_replay=surface.kv_events_replay,
                        )
                    )
                except (OSError, zmq.ZMQError) as exc:
                    nursery.cancel_scope.cancel()
                    return exc
                openai_port = server.port
                line["openai_port"] = server.port
                line["openai_url"] = server.url
                if server.kv_publisher is not None and server.kv_publisher.replay_endpoint:
                    line["kv_events_replay"] = server.kv_publisher.replay_endpoint
            if registration is None:
                deregistered.set()
            else:
                try:
                    await nursery.start(
                        _hold_registration,
                        registration,
                        registration.record(engine, address, openai_port),
                        registered,
                        deregistered,
                    )
                except EtcdError as exc:
                    nursery.cancel_scope.cancel()
                    return exc
            print(json.dumps(line), flush=True)
            async for signum in signals:
                name = signal.Signals(signum).name
                if drain.draining:
                    print(
                        f"interlock worker: {name} again, stopping at once: cutting "
                        f"{drain.in_flight} stream(s) (frontends migrate them)",
                        file=sys.stderr,
                        flush=True,
                    )
                    nursery.cancel_scope.cancel()
                    break
                print(
                    f"interlock worker: {name}, stopping: leaving etcd, refusing new requests "
                    f"and draining {drain.in_flight} stream(s) for up to {drain_timeout:g}s (a "
                    "second signal stops at once)",
                    file=sys.stderr,
                    flush=True,
                )
                nursery.start_soon(
                    _drain_then_stop, drain, drain_timeout, registered, deregistered, nursery
                )
    if registration is not None:
        await registration.client.aclose()
    return None


async def _hold_registration(
    registration: _Registration,
    record: WorkerRecord,
    scope: trio.CancelScope,
    deregistered: trio.Event,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """`serve_registration` until ``scope`` is cancelled (which revokes the lease: the record
    is gone from etcd when ``deregistered`` is set)."""
    try:
        with scope:
            await serve_registration(
                registration.client,
                record,
                prefix=registration.prefix,
                ttl=registration.ttl,
                task_status=task_status,
            )
    finally:
        deregistered.set()


async def _drain_then_stop(
    drain: WorkerDrain,
    grace_period: float,
    registered: trio.CancelScope,
    deregistered: trio.Event,
    nursery: trio.Nursery,
) -> None:
    """Leave etcd first (frontends stop routing here), then refuse new streams, give the
    running ones ``grace_period`` seconds, and stop the worker (cancel ``nursery``)."""
    registered.cancel()
    await deregistered.wait()
    drain.start()
    with trio.move_on_after(grace_period):
        await drain.wait_idle()
    await drain.say_goodbye()
    print(
        f"interlock worker: drained: {drain.finished} stream(s) finished, {drain.in_flight} "
        f"cut (frontends migrate them), {drain.refused} new one(s) refused; exiting",
        file=sys.stderr,
        flush=True,
    )
    nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """``interlock worker`` on its own (for a script that cannot rely on the entry point)."""
    parser = argparse.ArgumentParser(prog="interlock worker", description=_DESCRIPTION)
    add_arguments(parser)
    return run_worker(parser.parse_args(argv))


def _speedup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text} (use --zero-time for none)")
    return value
