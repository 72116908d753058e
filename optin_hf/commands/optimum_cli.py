"""`optimum-cli optin {prune,evaluate,recipe}`: optimum's command classes over `args.COMMANDS`."""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .args import COMMANDS, DESCRIPTION, Command, one_line_errors, run_command


def _leaf(command: Command) -> type[BaseOptimumCLICommand]:
    """An optimum command class whose parser and run are those of `command`."""

    def run(self) -> None:
        status = run_command(command.name, self.args)
        if status:
            sys.exit(status)

    return type(
        f"Optin{command.name.title()}Command",
        (BaseOptimumCLICommand,),
        {"COMMAND": CommandInfo(command.name, help=command.help), "parse_args": staticmethod(command.add_args), "run": run},
    )


class OptinCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="optin", help=DESCRIPTION)
    SUBCOMMANDS = tuple(CommandInfo(c.name, help=c.help, subcommand_class=_leaf(c)) for c in COMMANDS)

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        one_line_errors(parser)
