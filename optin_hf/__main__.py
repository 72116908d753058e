"""`python -m optin_hf prune|evaluate|recipe ...`: the same commands as `optimum-cli optin`."""

import sys

from .commands.__main__ import main

sys.exit(main(prog="python -m optin_hf"))
