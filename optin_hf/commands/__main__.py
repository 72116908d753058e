"""`python -m optin_hf.commands` and the `optin-hf` console script."""

from __future__ import annotations

import sys

from .args import build_parser, run_command


def main(argv: list[str] | None = None, prog: str = "optin-hf") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m optin_hf.commands"))
