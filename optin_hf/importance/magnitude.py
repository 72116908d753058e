"""Magnitude baseline: the L2 norm of the weights a structure owns, as a share of its layer's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import OptinConfig
from .base import ConfiguredImportance
from .scores import ImportanceScores


def layer_shares(norms: torch.Tensor) -> torch.Tensor:
    """norms [num_layers, units] -> each unit's share of its layer's total (each row sums to 1)."""
    return norms / norms.sum(1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)


@dataclass(frozen=True)
class MagnitudeImportance(ConfiguredImportance):
    """A unit's norm is that of the weights it owns (`ArchAdapter.unit_weight_norms`: a head's
    q/k/v rows and output-projection columns, a neuron's FFN up row and down column; a CNN's
    channel its conv filter and the next conv's input slice). Raw norms are not comparable
    across layers: a layer's weight scale is arbitrary
    (a LayerNorm after it undoes it; q/k and v/o rescale against each other) and differs between
    layers of one trained model, so a global ranking of raw norms would spend the budget on the
    layers with the largest weights. Each head's score is therefore its share of its layer's head
    norms, each neuron's its share of its layer's neuron norms: scaling a layer's weights leaves
    every score, and so the budget, where it was."""

    name: ClassVar[str] = "magnitude"

    @torch.no_grad()
    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        geometry = adapter.layer_geometry(model.config)
        width = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        heads, neurons = [], []
        for layer, g in zip(adapter.layers_of(model), geometry):
            per_head, per_neuron = adapter.unit_weight_norms(layer, model.config)
            # a layer narrower than the widest is padded with zeros (padding is never kept)
            heads.append(nn.functional.pad(per_head.sqrt(), (0, width["head"] - g.heads)))
            neurons.append(nn.functional.pad(per_neuron.sqrt(), (0, width["neuron"] - g.neurons)))
        return ImportanceScores(layer_shares(torch.stack(heads)), layer_shares(torch.stack(neurons)), self.name)
