"""The ``interlock`` command line: ``serve``, ``route``, ``worker``, ``register``, ``replay``,
``demo``, ``config check``, ``inspect``, ``docs``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import ConfigError


def _config_check(args: argparse.Namespace) -> int:
    # The commands' module: the file is checked with the functions they check it with.
    from .http._cli import check_config_file

    try:
        config = check_config_file(args.file)
    except ConfigError as exc:
        print(f"interlock: invalid configuration: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: valid")
    width = max(len(k) for k in config.to_dict())
    for key, value in config.to_dict().items():
        print(f"  {key:<{width}} = {value!r}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo()
    return 0


def _docs(args: argparse.Namespace) -> int:
    from ._docs import write_docs

    for path in write_docs(args.write):
        print(f"wrote {path}")
    return 0


# Each command's parser comes from the module that runs it, imported only when that command is
# registered: a process started as `interlock worker` then never imports the HTTP server, the
# log inspector or the replayer (half a second of CPU per process start).
def _add_serve(commands: argparse._SubParsersAction[Any]) -> None:
    from .http import add_serve_parser

    add_serve_parser(commands)


def _add_route(commands: argparse._SubParsersAction[Any]) -> None:
    from .http import add_route_parser

    add_route_parser(commands)


def _add_demo(commands: argparse._SubParsersAction[Any]) -> None:
    demo = commands.add_parser(
        "demo", help="run the pipeline in every routing mode on in-process mock workers"
    )
    demo.set_defaults(run=_demo)


def _add_config(commands: argparse._SubParsersAction[Any]) -> None:
    config = commands.add_parser("config", help="work with configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a TOML configuration file")
    check.add_argument("file")
    check.set_defaults(run=_config_check)


def _add_docs(commands: argparse._SubParsersAction[Any]) -> None:
    docs = commands.add_parser("docs", help="regenerate the generated pages of docs/")
    docs.add_argument("--write", default="docs", metavar="FOLDER")
    docs.set_defaults(run=_docs)


def _add_inspect(commands: argparse._SubParsersAction[Any]) -> None:
    from .inspect import add_parser

    add_parser(commands)


def _add_worker(commands: argparse._SubParsersAction[Any]) -> None:
    from .engines.remote import add_parser

    add_parser(commands)


def _add_register(commands: argparse._SubParsersAction[Any]) -> None:
    from .discovery._register import add_parser

    add_parser(commands)


def _add_replay(commands: argparse._SubParsersAction[Any]) -> None:
    from .replay import add_parser

    add_parser(commands)


# In the order `interlock --help` lists them.
_COMMANDS: dict[str, Callable[[argparse._SubParsersAction[Any]], None]] = {
    "serve": _add_serve,
    "route": _add_route,
    "demo": _add_demo,
    "config": _add_config,
    "docs": _add_docs,
    "inspect": _add_inspect,
    "worker": _add_worker,
    "register": _add_register,
    "replay": _add_replay,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``interlock`` parser with every command; with ``command`` (a command's name), with
    that command alone, importing only the modules it needs."""
    parser = argparse.ArgumentParser(
        prog="interlock", description="A configuration-driven LLM-serving frontend for trio."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add in _COMMANDS.items():
        if command is None or name == command:
            add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    # A known command first: its parser alone (the same usage lines and errors). Anything else
    # (`--help`, a typo) gets the whole parser, which lists every command.
    command = given[0] if given and given[0] in _COMMANDS else None
    args = build_parser(command).parse_args(given)
    # What `interlock serve --processes N` starts its children with.
    args.argv = given
    # The command owns its process (a test calling ``args.run`` does not): it may tune
    # process-wide settings, such as a server's garbage collector.
    args.own_process = True
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
