"""optimum-cli hook: registers `optimum-cli optin ...` (PEP 420 namespace portion, no __init__.py).

Only the parser definitions are imported here; torch and transformers load when a command runs.
"""

from optin_hf.commands.optimum_cli import OptinCommand

REGISTER_COMMANDS = [OptinCommand]
