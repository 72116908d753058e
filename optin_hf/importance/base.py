"""The interface every importance criterion implements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..arch import ArchAdapter
from .scores import ImportanceScores


class ImportanceCriterion(Protocol):
    """Scores every head and neuron of a dense model; the budget search and slimming are shared.

    A criterion that scores by masked runs also has `masked_units(model, adapter, config)`:
    units per layer of each kind it runs ({"head": 12, "neuron": 1536}), so the pruner can
    estimate the scoring time and fit `OptinConfig.max_scoring_time`.
    """

    name: str

    def __call__(
        self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config
    ) -> ImportanceScores: ...
