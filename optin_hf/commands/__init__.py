"""Command-line front ends: `optimum-cli optin ...` and `python -m optin_hf ...` share one parser."""

from .args import COMMANDS, build_parser, run_command

__all__ = ["COMMANDS", "build_parser", "run_command"]
