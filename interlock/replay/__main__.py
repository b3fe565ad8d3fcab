"""``python -m interlock.replay ARGS``: the same as ``interlock replay ARGS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._cli import add_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interlock")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
