"""Random baseline: seeded uniform scores, the floor any criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import OptinConfig
from .base import ConfiguredImportance
from .scores import ImportanceScores


@dataclass(frozen=True)
class RandomImportance(ConfiguredImportance):
    seed: int = OptinConfig.seed

    name: ClassVar[str] = "random"

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        generator = torch.Generator().manual_seed(self.seed)
        num_layers = len(adapter.layers_of(model))
        heads = torch.rand(num_layers, adapter.num_heads(model.config), generator=generator)
        neurons = torch.rand(num_layers, adapter.intermediate_size(model.config), generator=generator)
        tokens = None
        if config.prune_tokens:
            tokens = torch.rand(num_layers, adapter.default_seq_len(model.config), generator=generator)
        return ImportanceScores(heads, neurons, self.name, tokens)
