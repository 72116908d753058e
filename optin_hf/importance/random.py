"""Random baseline: seeded uniform scores, the floor any criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter
from .scores import ImportanceScores


class RandomImportance:
    name = "random"

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config) -> ImportanceScores:
        generator = torch.Generator().manual_seed(config.seed)
        num_layers = len(adapter.layers_of(model))
        heads = torch.rand(num_layers, adapter.num_heads(model.config), generator=generator)
        neurons = torch.rand(num_layers, adapter.intermediate_size(model.config), generator=generator)
        tokens = None
        if config.prune_tokens:
            tokens = torch.rand(num_layers, adapter.default_seq_len(model.config), generator=generator)
        return ImportanceScores(heads, neurons, self.name, tokens)
