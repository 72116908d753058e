"""Random baseline: seeded uniform scores, the floor any criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import OptinConfig
from ..masks import PruningMasks
from .base import ConfiguredImportance
from .scores import ImportanceScores


@dataclass(frozen=True)
class RandomImportance(ConfiguredImportance):
    seed: int = OptinConfig.seed

    name: ClassVar[str] = "random"
    scores_tokens: ClassVar[bool] = True
    scores_channels: ClassVar[bool] = True

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        generator = torch.Generator().manual_seed(self.seed)
        num_layers = len(adapter.layers_of(model))
        heads, neurons = PruningMasks.full(model.config, adapter).present()  # a narrower layer's padding scores 0
        heads = torch.rand(heads.shape, generator=generator) * heads
        neurons = torch.rand(neurons.shape, generator=generator) * neurons
        tokens = None
        if config.prune_tokens:
            tokens = torch.rand(num_layers, adapter.default_seq_len(model.config), generator=generator)
        channels = None
        if config.prune_channels:
            channels = torch.rand(sum(adapter.channel_widths(model.config)), generator=generator)
        return ImportanceScores(heads, neurons, self.name, tokens, channel_scores=channels)
