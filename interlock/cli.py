"""The ``interlock`` command line: ``serve``, ``route``, ``worker``, ``register``, ``replay``,
``demo``, ``config check``, ``inspect``, ``docs``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._config import PipelineConfig
from ._errors import ConfigError
from .discovery._register import add_parser as add_register_parser
from .engines.remote import add_parser as add_worker_parser
from .http import add_route_parser, add_serve_parser
from .inspect import add_parser as add_inspect_parser
from .replay import add_parser as add_replay_parser


def _config_check(args: argparse.Namespace) -> int:
    try:
        config = PipelineConfig.from_toml(args.file).validate()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interlock", description="A configuration-driven LLM-serving frontend for trio."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_route_parser(commands)
    demo = commands.add_parser(
        "demo", help="run the pipeline in every routing mode on in-process mock workers"
    )
    demo.set_defaults(run=_demo)
    config = commands.add_parser("config", help="work with configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a TOML configuration file")
    check.add_argument("file")
    check.set_defaults(run=_config_check)
    docs = commands.add_parser("docs", help="regenerate the generated pages of docs/")
    docs.add_argument("--write", default="docs", metavar="FOLDER")
    docs.set_defaults(run=_docs)
    add_inspect_parser(commands)
    add_worker_parser(commands)
    add_register_parser(commands)
    add_replay_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What `interlock serve --processes N` starts its children with.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # The command owns its process (a test calling ``args.run`` does not): it may tune
    # process-wide settings, such as a server's garbage collector.
    args.own_process = True
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
