"""optin-hf: retraining-free OPTIN pruning of transformers into physically slimmed models."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Resolved on first use: the optimum-cli hook imports `optin_hf.commands` at every
# `optimum-cli` start, and must not pay for torch and transformers there.
_EXPORTS = {
    "ArchAdapter": ".arch",
    "AutoOptinModel": ".modeling",
    "ImportanceScores": ".importance",
    "OptinConfig": ".config",
    "OptinPruner": ".pruner",
    "PruningMasks": ".masks",
    "count_macs": ".macs",
    "register_adapter": ".arch",
    "register_criterion": ".criteria",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .arch import ArchAdapter, register_adapter
    from .config import OptinConfig
    from .criteria import register_criterion
    from .importance import ImportanceScores
    from .macs import count_macs
    from .masks import PruningMasks
    from .modeling import AutoOptinModel
    from .pruner import OptinPruner


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
