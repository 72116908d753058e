"""The interface every importance criterion implements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..arch import ArchAdapter
from .scores import ImportanceScores


class ImportanceCriterion(Protocol):
    """Scores every head and neuron of a dense model; the budget search and slimming are shared.

    The pruner runs a criterion in eval mode under `torch.no_grad()` on batches of model inputs
    only. One that sets `needs_grad = True` runs with autograd on (it must not leave `.grad` on
    the model's parameters); one that sets `needs_labels = True` also gets each batch's `labels`
    ([batch]) when the calibration data has them. Both default to False when absent.
    A criterion that scores by masked runs also has `masked_units(model, adapter, config)`:
    units per layer of each kind it runs ({"head": 12, "neuron": 1536}), so the pruner can
    estimate the scoring time and fit `OptinConfig.max_scoring_time`.
    """

    name: str
    needs_grad: bool
    needs_labels: bool

    def __call__(
        self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config
    ) -> ImportanceScores: ...
