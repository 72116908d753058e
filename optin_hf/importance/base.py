"""The interface every importance criterion implements, and the base of the built-in ones."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import OptinConfig, checked_options, criterion_options
from .scores import ImportanceScores


class ImportanceCriterion(Protocol):
    """Scores every head and neuron of a dense model; the budget search and slimming are shared.

    A criterion is built from its own settings, or by the pruner with `from_config(config)` from
    the `OptinConfig` that names it (`optin_hf.criteria`). When called, `config` is the run's
    settings: what to score (`prune_heads`, `prune_neurons`, `prune_tokens`) and how to run (engine,
    dtype, seed). The pruner runs a criterion in eval mode under `torch.no_grad()` on batches of
    model inputs only. One that sets `needs_grad = True` runs with autograd on (it must not leave
    `.grad` on the model's parameters); one that sets `needs_labels = True` also gets each batch's
    `labels` ([batch]) when the calibration data has them. Both default to False when absent.
    One that gives token scores (vision token mode, `prune_tokens=True`) sets `scores_tokens = True`;
    one that sets it False is refused in token mode before any scoring (absent: assumed True).
    A criterion that scores by masked runs also has `masked_units(model, adapter, config)`:
    units per layer of each kind it runs ({"head": 12, "neuron": 1536}; the widest layer's where
    layers differ, each of which runs only its own), so the pruner can estimate the scoring time
    and fit `OptinConfig.max_scoring_time`.
    """

    name: str
    needs_grad: bool
    needs_labels: bool
    scores_tokens: bool

    @classmethod
    def from_config(cls, config: OptinConfig) -> "ImportanceCriterion": ...

    def __call__(
        self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config: OptinConfig
    ) -> ImportanceScores: ...


class ConfiguredImportance:
    """Base of the built-in criteria: frozen dataclasses whose settings are their fields. A field named after an
    `OptinConfig` setting (`seed`, `temperature`, ...) is that setting, and one config builds it; any other
    field is the criterion's own, set by `OptinConfig.importance_options` (or `--importance-option KEY=VALUE`,
    or a recipe's `optin: {importance_options: ...}`), so a new criterion's setting needs no new config field."""

    name: ClassVar[str]
    needs_grad: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    scores_tokens: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # refuses a bad setting with the config's own message: shared ones as OptinConfig fields, own ones as options
        own = criterion_options(type(self))
        settings = self.settings()
        OptinConfig(**{k: v for k, v in settings.items() if k not in own})
        checked = checked_options(getattr(self, "name", type(self).__name__), {k: v for k, v in settings.items() if k in own}, type(self))
        for key, value in checked.items():
            object.__setattr__(self, key, value)  # normalised (an int given for a float), frozen too

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def settings_from(cls, config: OptinConfig) -> dict[str, Any]:
        """The settings `config` gives this criterion: its fields named after config settings, and its own
        (`importance_options`, which the config checked are its own)."""
        own = criterion_options(cls)
        shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name not in own}
        return {**shared, **config.importance_options}

    @classmethod
    def from_config(cls, config: OptinConfig) -> "ConfiguredImportance":
        return cls(**cls.settings_from(config))
