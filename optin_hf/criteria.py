"""The importance criteria by name: the values `OptinConfig.importance` accepts.

Torch-free on purpose: `OptinConfig` checks `importance` against these names when it is built,
and must not import the criteria themselves (they import torch, the engines and the adapters,
which import the config). The built-in criteria are named here by import path and imported on
first lookup; `register_criterion` adds a user's criterion under a new name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import Any, TypeVar

BUILTIN_CRITERIA = {
    "optin": "optin_hf.importance.optin:OptinImportance",
    "magnitude": "optin_hf.importance.magnitude:MagnitudeImportance",
    "random": "optin_hf.importance.random:RandomImportance",
    "fisher": "optin_hf.importance.fisher:FisherImportance",
    "flap": "optin_hf.importance.flap:FlapImportance",
    "wanda_sp": "optin_hf.importance.wanda:WandaSpImportance",
}

# importance="auto" is no criterion: the pruner tries the searched criteria and keeps the recipe whose pruned model
# stays closest to the dense one on held-out calibration examples (`optin_hf.recipe_search`). It is registered beside
# the criteria, so that configs accept the name and its settings (`importance_options`), and is not a built-in one.
AUTO_IMPORTANCE = "auto"

T = TypeVar("T", bound=type)


class CriterionRegistry(Mapping):
    """name -> criterion class; a built-in class is imported when it is first looked up."""

    def __init__(self, entries: dict[str, type | str]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(import_module(module), attr)
        return entry

    def __contains__(self, name: object) -> bool:  # by name: Mapping's default would import the class
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, criterion: type) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A criterion name must be a non-empty string, not {name!r}.")
        if name in self._entries:
            raise ValueError(f"A criterion named {name!r} is already registered; register yours under another name.")
        if not callable(getattr(criterion, "from_config", None)):
            raise TypeError(
                f"{criterion!r} has no from_config(config) classmethod: the pruner builds a criterion from the "
                "OptinConfig that names it (see optin_hf.importance.ImportanceCriterion)."
            )
        self._entries[name] = criterion


CRITERIA = CriterionRegistry({**BUILTIN_CRITERIA, AUTO_IMPORTANCE: "optin_hf.recipe_search:RecipeSearch"})


def register_criterion(name: str, criterion: T | None = None) -> Any:
    """Make `OptinConfig(importance=name)` score with `criterion`, a class that implements
    `optin_hf.importance.ImportanceCriterion` (with `from_config`). Also a class decorator:
    `@register_criterion("mine")`. A saved `optin_config.json` naming it loads once it is registered."""
    if criterion is None:

        def decorator(cls: T) -> T:
            CRITERIA.add(name, cls)
            return cls

        return decorator
    CRITERIA.add(name, criterion)
    return criterion

