"""The interface every importance criterion implements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..arch import ArchAdapter
from .scores import ImportanceScores


class ImportanceCriterion(Protocol):
    """Scores every head and neuron of a dense model; the budget search and slimming are shared."""

    name: str

    def __call__(
        self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config
    ) -> ImportanceScores: ...
