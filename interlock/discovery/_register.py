"""``interlock register``: a sidecar that registers third-party engines (vLLM, or anything with
vLLM's HTTP surface) in etcd, since they cannot register themselves.

For each ``--engine ID=URL[/ROLE]`` it polls ``GET URL/health``; while that answers 200 it
holds the engine's `WorkerRecord` (kind ``"openai"``, its ``url``, ``role``, ``block_size`` and
``kv_replay``) under a lease, as `serve_registration` holds an ``interlock worker``'s, so that
``interlock serve --etcd`` frontends find the engine exactly as they find workers. After
``--unhealthy-after`` failed polls in a row it revokes the lease (the record disappears at
once and the frontends drop the engine); once ``/health`` answers 200 again it registers the
engine again. Each engine has its own loop: one down does not touch the others.

`add_parser` registers the command on the top-level parser's subparsers; `EngineRegistration`
is the loop for one engine and `register_engines` runs one per engine (the library form).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import httpx
import trio

from .._argtypes import positive_float, positive_int
from .._errors import ConfigError
from ._engine_address import EngineAddress
from ._etcd import (
    DEFAULT_PREFIX,
    EtcdClient,
    EtcdError,
    WorkerRecord,
    serve_registration,
    worker_key,
    workers_prefix,
)
from ._etcd_options import EtcdOptions, add_etcd_arguments, etcd_options

__all__ = [
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_UNHEALTHY_AFTER",
    "EngineRegistration",
    "RegisterSetup",
    "add_parser",
    "register_engines",
    "resolve_register",
    "run_register",
]

_logger = logging.getLogger("interlock.discovery.register")

#: Seconds between two ``/health`` polls of an engine (``--health-interval``).
DEFAULT_HEALTH_INTERVAL = 1.0
#: Seconds a ``/health`` poll may take before it counts as failed (``--health-timeout``).
DEFAULT_HEALTH_TIMEOUT = 5.0
#: Failed polls in a row that deregister an engine (``--unhealthy-after``). One more than an
#: `OpenAIEngine`'s own threshold (2): the frontends take a failing engine out of routing
#: first; dropping it from etcd, which stops its engine in every frontend, waits one poll
#: longer.
DEFAULT_UNHEALTHY_AFTER = 3

#: Where an engine stands: not registered yet (its ``/health`` has not answered 200),
#: registered, or deregistered after failed polls (registered again once healthy).
RegistrationState = Literal["waiting", "registered", "deregistered"]


def _root(url: str) -> str:
    # vLLM serves /health at its root; an --engine URL given with the API's /v1 still works
    # (an OpenAIEngine strips it likewise).
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class EngineRegistration:
    """Holds one engine's record in etcd while its ``/health`` answers 200. Run it with
    `run`; several registrations may share one ``client``.

    ``record`` is what is registered (under ``{prefix}/workers/{worker_id}``, with a lease
    of ``ttl`` seconds renewed by `serve_registration`); its ``url`` is polled every
    ``health_interval`` seconds, each poll failing when it gets no answer within
    ``health_timeout`` seconds, no connection, or a status other than 200.
    ``on_registered(registration, lease)`` is called each time the record is put (``lease``:
    the id granted then); `registrations` says how many times that was.
    """

    def __init__(
        self,
        client: EtcdClient,
        record: WorkerRecord,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: int = 10,
        health_interval: float = DEFAULT_HEALTH_INTERVAL,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        unhealthy_after: int = DEFAULT_UNHEALTHY_AFTER,
        on_registered: Callable[[EngineRegistration, int], None] | None = None,
    ) -> None:
        if record.url is None:
            raise ValueError(f"worker {record.worker_id}'s record has no url to poll /health at")
        if not health_interval > 0 or not health_timeout > 0:
            raise ValueError(
                f"health_interval and health_timeout must be > 0, got {health_interval} and "
                f"{health_timeout}"
            )
        if unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be 1 or more, got {unhealthy_after}")
        self.client = client
        self.record = record
        self.prefix = prefix
        self.ttl = ttl
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.unhealthy_after = unhealthy_after
        self.on_registered = on_registered
        self.health_url = f"{_root(record.url)}/health"
        self.state: RegistrationState = "waiting"
        #: How many times the record was put (1 after the first registration).
        self.registrations = 0
        #: How many times the lease was revoked because ``/health`` failed.
        self.deregistrations = 0
        #: The lease granted at the last registration (None before the first; a lease etcd
        #: loses is replaced inside `serve_registration`, unseen here).
        self.lease: int | None = None
        self._etcd_refused = False

    @property
    def key(self) -> str:
        """The etcd key the record is put at."""
        return worker_key(self.prefix, self.record.worker_id)

    def __repr__(self) -> str:
        return f"<EngineRegistration {self.record.worker_id}={self.record.url} {self.state}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll ``/health`` and hold or revoke the record accordingly, until cancelled; calls
        ``task_status.started()`` at once (before the first poll). Cancelled, it revokes the
        lease (the record disappears at once). Never raises for the engine's or etcd's
        failures: a registration etcd refuses is tried again at the next healthy poll."""
        timeout = httpx.Timeout(self.health_timeout)
        async with httpx.AsyncClient(timeout=timeout) as http:
            task_status.started()
            await self._until_healthy(http, first=True)
            while True:
                await self._hold(http)
                await self._until_healthy(http, first=False)

    async def probe(self, http: httpx.AsyncClient) -> str:
        """One ``GET /health``: '' when it answered 200 within ``health_timeout``, else why
        not (for the logs). Waits at most ``health_timeout`` seconds."""
        try:
            with trio.fail_after(self.health_timeout):
                response = await http.get(self.health_url)
        except trio.TooSlowError:
            return f"no answer within {self.health_timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code != 200:
            return f"/health answered {response.status_code}"
        return ""

    async def _until_healthy(self, http: httpx.AsyncClient, *, first: bool) -> None:
        """Return once ``/health`` answers 200 (the first poll at once when ``first``, else
        after an interval)."""
        logged = False
        if not first:
            await trio.sleep(self.health_interval)
        while True:
            why = await self.probe(http)
            if not why:
                return
            if first and not logged:
                _logger.info(
                    "engine %d at %s is not healthy yet (%s); registering it once %s answers 200",
                    self.record.worker_id,
                    self.record.url,
                    why,
                    self.health_url,
                )
                logged = True
            await trio.sleep(self.health_interval)

    async def _hold(self, http: httpx.AsyncClient) -> None:
        """Register the record and keep it while ``/health`` answers; return once
        ``unhealthy_after`` polls in a row failed (the lease is revoked then), or at once when
        etcd refused the registration (the caller tries again once healthy)."""
        record = self.record
        async with trio.open_nursery() as nursery:
            try:
                lease: int = await nursery.start(
                    functools.partial(
                        serve_registration, self.client, record, prefix=self.prefix, ttl=self.ttl
                    )
                )
            except EtcdError as exc:
                if exc.refused and not self.registrations:
                    # Credentials etcd never accepted for this (a read-only user, a wrong
                    # password): no retry fixes that; stop and say so.
                    raise
                # Once per outage: etcd is tried again at every healthy poll.
                log = _logger.debug if self._etcd_refused else _logger.warning
                log(
                    "engine %d at %s is healthy but cannot be registered: %s; trying again "
                    "every %gs",
                    record.worker_id,
                    record.url,
                    exc,
                    self.health_interval,
                )
                self._etcd_refused = True
                return
            self._etcd_refused = False
            self.lease = lease
            self.registrations += 1
            again = " again" if self.state == "deregistered" else ""
            self.state = "registered"
            _logger.info(
                "engine %d at %s is healthy: registered%s as %s (lease %x)",
                record.worker_id,
                record.url,
                again,
                self.key,
                lease,
            )
            if self.on_registered is not None:
                self.on_registered(self, lease)
            failures = 0
            why = ""
            while failures < self.unhealthy_after:
                await trio.sleep(self.health_interval)
                why = await self.probe(http)
                if not why:
                    if failures:
                        _logger.info("engine %d: /health answers again", record.worker_id)
                    failures = 0
                    continue
                failures += 1
                if failures == 1 and self.unhealthy_after > 1:
                    _logger.warning(
                        "engine %d: /health failed (%s); deregistering it after %d failed polls "
                        "in a row",
                        record.worker_id,
                        why,
                        self.unhealthy_after,
                    )
            # serve_registration revokes the lease as it is cancelled (shielded): the
            # record is gone once the nursery closes.
            nursery.cancel_scope.cancel()
        self.state = "deregistered"
        self.deregistrations += 1
        _logger.warning(
            "engine %d at %s deregistered: %d failed /health polls in a row (last: %s); "
            "registering it again once /health answers 200",
            record.worker_id,
            record.url,
            self.unhealthy_after,
            why,
        )


@attrs.frozen(kw_only=True)
class RegisterSetup:
    """Everything ``interlock register`` resolved from its flags, before trio starts."""

    #: Where etcd is, the prefix to register under, and how to reach it (user, TLS).
    etcd: EtcdOptions
    engines: tuple[EngineAddress, ...]
    ttl: int = 10
    block_size: int = 16
    #: Each engine's KV-event replay endpoint (``--kv-replay``), by engine id.
    kv_replay: Mapping[int, str] = attrs.field(factory=dict)
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    unhealthy_after: int = DEFAULT_UNHEALTHY_AFTER

    @property
    def etcd_url(self) -> str:
        """etcd's client URL (``--etcd``)."""
        return self.etcd.url

    @property
    def prefix(self) -> str:
        """The key prefix the engines are registered under (``--etcd-prefix``)."""
        return self.etcd.prefix

    def records(self) -> list[WorkerRecord]:
        """The record each engine is registered with, in ``--engine`` order (pure)."""
        return [
            engine.record(
                kv_replay=self.kv_replay.get(engine.worker_id), block_size=self.block_size
            )
            for engine in self.engines
        ]


def resolve_register(args: argparse.Namespace) -> RegisterSetup:
    """The setup the parsed flags describe, checked before anything starts (pure; connects
    to nothing).

    Raises:
        ConfigError: a bad ``--engine`` (the form, an id or URL given twice), ``--kv-replay``
            (the form, an id no ``--engine`` has, given twice), or etcd flag (`etcd_options`:
            ``--etcd``, ``--etcd-prefix``, the user, its password, the TLS files; the
            message names the flag and says what to give).
    """
    etcd = etcd_options(args)
    assert etcd is not None  # --etcd is required
    engines: list[EngineAddress] = []
    ids: dict[int, EngineAddress] = {}
    urls: dict[str, EngineAddress] = {}
    for text in args.engines:
        engine = EngineAddress.parse(text)
        if engine.worker_id in ids:
            raise ConfigError(
                f"--engine {ids[engine.worker_id]} and --engine {engine} have the same id; "
                "every engine needs its own (it is the engine's worker id in every frontend)"
            )
        if engine.url in urls:
            raise ConfigError(
                f"--engine {urls[engine.url]} and --engine {engine} both point at {engine.url}; "
                "one server is one engine"
            )
        ids[engine.worker_id] = urls[engine.url] = engine
        engines.append(engine)
    replay: dict[int, str] = {}
    for text in args.kv_replay:
        ident, equals, endpoint = text.partition("=")
        if not equals or not ident.isdigit() or not endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(
                f"--kv-replay {text!r}: the form is ID=ENDPOINT, e.g. 1=tcp://10.0.0.5:5561 "
                "(the engine's replay_endpoint, as the frontends reach it)"
            )
        if int(ident) not in ids:
            raise ConfigError(f"--kv-replay {text!r}: no --engine has id {ident}")
        if int(ident) in replay:
            raise ConfigError(f"--kv-replay {text!r}: engine {ident} has a --kv-replay already")
        replay[int(ident)] = endpoint
    return RegisterSetup(
        etcd=etcd,
        engines=tuple(engines),
        ttl=args.etcd_ttl,
        block_size=args.block_size,
        kv_replay=replay,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        unhealthy_after=args.unhealthy_after,
    )


async def register_engines(
    client: EtcdClient,
    setup: RegisterSetup,
    *,
    on_registered: Callable[[EngineRegistration, int], None] | None = None,
    task_status: trio.TaskStatus[list[EngineRegistration]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check that etcd answers (listing ``{prefix}/workers/``), then run an
    `EngineRegistration` per engine of ``setup`` until cancelled; ``task_status.started``
    gets them once they run (before any is registered). Cancelled, every lease is revoked.

    Raises:
        EtcdError: etcd did not answer the first listing (nothing was started).
    """
    items, _ = await client.get_prefix(workers_prefix(setup.prefix))
    present = {item.key: item.value for item in items}
    registrations = []
    for record in setup.records():
        registration = EngineRegistration(
            client,
            record,
            prefix=setup.prefix,
            ttl=setup.ttl,
            health_interval=setup.health_interval,
            health_timeout=setup.health_timeout,
            unhealthy_after=setup.unhealthy_after,
            on_registered=on_registered,
        )
        held = present.get(registration.key)
        if held is not None and held != record.to_json().encode():
            # Another worker or sidecar holds this id; both would replace each other.
            _logger.warning(
                "%s is registered already, as %s; engine %d will replace it once healthy "
                "(worker ids are global: give each worker and engine its own)",
                registration.key,
                held.decode(errors="replace"),
                record.worker_id,
            )
        registrations.append(registration)
    async with trio.open_nursery() as nursery:
        for registration in registrations:
            await nursery.start(registration.run)
        task_status.started(registrations)


# -- the command ----------------------------------------------------------------------------

_DESCRIPTION = """\
Register OpenAI-compatible engines (vLLM) in etcd while their /health answers, so that
`interlock serve --etcd URL` frontends find them as they find `interlock worker`s. Each
--engine ID=URL[/ROLE] is held as a record of kind "openai" under a lease while GET URL/health
answers 200, revoked after --unhealthy-after failed polls in a row (the frontends drop the
engine at once), and put again once /health answers. Prints one JSON line per engine when it
is first registered; runs until SIGINT/SIGTERM, which revoke every lease. See
docs/deploying.md."""

_EXAMPLES = """\
examples:
  interlock register --etcd http://127.0.0.1:2379 --engine 1=http://127.0.0.1:8101
  interlock register --etcd http://etcd:2379 --block-size 32 \\
      --engine 1=http://10.0.0.5:8000 --engine 2=http://10.0.0.6:8000/prefill \\
      --kv-replay 1=tcp://10.0.0.5:5561 --kv-replay 2=tcp://10.0.0.6:5561
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the ``register`` subcommand; its ``run`` default runs it and returns the exit
    status."""
    parser = subparsers.add_parser(
        "register",
        help="register vLLM engines in etcd while their /health answers (a sidecar)",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run_register)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``interlock register``."""
    add_etcd_arguments(
        parser,
        required=True,
        url_help="etcd's client URL (e.g. http://127.0.0.1:2379): the frontends' --etcd",
        prefix_help=f"register at PREFIX/workers/ID (default {DEFAULT_PREFIX}; the frontends' "
        "--etcd-prefix)",
        ttl_help="lease TTL: if this sidecar is killed, its engines disappear from the frontends "
        "this long after (default 10; etcd raises values below its minimum, about 2)",
    )
    parser.add_argument(
        "--engine",
        dest="engines",
        action="append",
        required=True,
        metavar="ID=URL[/ROLE]",
        help="an OpenAI-compatible server to register as worker ID (repeat per engine); URL is "
        "its root as the frontends reach it, ROLE agg (default), prefill or decode",
    )
    parser.add_argument(
        "--kv-replay",
        action="append",
        default=[],
        metavar="ID=ENDPOINT",
        help="engine ID's KV-event replay socket (vLLM's replay_endpoint), as the frontends "
        "reach it; repeat per engine",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=16,
        metavar="N",
        help="the engines' tokens per KV block (their --block-size; default 16), for the record",
    )
    parser.add_argument(
        "--health-interval",
        type=positive_float,
        default=DEFAULT_HEALTH_INTERVAL,
        metavar="SECONDS",
        help=f"poll each engine's /health this often (default {DEFAULT_HEALTH_INTERVAL:g})",
    )
    parser.add_argument(
        "--health-timeout",
        type=positive_float,
        default=DEFAULT_HEALTH_TIMEOUT,
        metavar="SECONDS",
        help=f"a poll without an answer this long fails (default {DEFAULT_HEALTH_TIMEOUT:g})",
    )
    parser.add_argument(
        "--unhealthy-after",
        type=positive_int,
        default=DEFAULT_UNHEALTHY_AFTER,
        metavar="N",
        help="revoke an engine's registration after N failed polls in a row (default "
        f"{DEFAULT_UNHEALTHY_AFTER})",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log to stderr at this level (default info)",
    )


def run_register(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM; the exit status (0 when stopped by a signal, 1 when etcd
    cannot be reached at the start or refuses the first registration of an engine for want of
    a permission or a valid password, 2 for bad flags)."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s register %(levelname)s %(message)s",
    )
    if args.log_level != "debug":
        # httpx logs every request at info: a line per /health poll would drown the state
        # changes.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        setup = resolve_register(args)
    except ConfigError as exc:
        print(f"interlock register: {exc}", file=sys.stderr)
        return 2
    error = trio.run(_register_until_signalled, setup)
    if error is not None:
        what = "etcd refused the registration" if error.refused else "cannot reach etcd"
        print(f"interlock register: {what}: {error}", file=sys.stderr)
        return 1
    return 0


def _print_first_registration(registration: EngineRegistration, lease: int) -> None:
    # One line per engine, the first time only (as `interlock worker` prints one): a script
    # waits for it to know the engine is in etcd.
    if registration.registrations == 1:
        line = json.loads(registration.record.to_json())
        line.update(key=registration.key, lease=f"{lease:x}")
        print(json.dumps(line), flush=True)


async def _register_until_signalled(setup: RegisterSetup) -> EtcdError | None:
    refused: EtcdError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with setup.etcd.client() as client, trio.open_nursery() as nursery:
                try:
                    await nursery.start(
                        functools.partial(
                            register_engines,
                            client,
                            setup,
                            on_registered=_print_first_registration,
                        )
                    )
                except EtcdError as exc:
                    nursery.cancel_scope.cancel()
                    return exc
                async for signum in signals:
                    _logger.info(
                        "%s: revoking every lease and stopping", signal.Signals(signum).name
                    )
                    nursery.cancel_scope.cancel()
                    break
        except* EtcdError as group:
            # A registration etcd refused for good (`EngineRegistration` re-raises it).
            # (nested: one group per nursery it crossed)
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, EtcdError)
            refused = leaf
    return refused


def main(argv: Sequence[str] | None = None) -> int:
    """``interlock register`` on its own (for a script that cannot rely on the entry point)."""
    parser = argparse.ArgumentParser(prog="interlock register", description=_DESCRIPTION)
    add_arguments(parser)
    return run_register(parser.parse_args(argv))
