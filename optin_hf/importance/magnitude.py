"""Magnitude baseline: the L2 norm of the weights a structure owns, as a share of its layer's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..config import OptinConfig
from .base import ConfiguredImportance
from .scores import ImportanceScores


def layer_shares(norms: torch.Tensor) -> torch.Tensor:
    """norms [num_layers, units] -> each unit's share of its layer's total (each row sums to 1)."""
    return norms / norms.sum(1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)


@dataclass(frozen=True)
class MagnitudeImportance(ConfiguredImportance):
    """A head owns its q/k/v rows and output-projection columns, a neuron its FFN up row and down
    column. Raw norms are not comparable across layers: a layer's weight scale is arbitrary
    (a LayerNorm after it undoes it; q/k and v/o rescale against each other) and differs between
    layers of one trained model, so a global ranking of raw norms would spend the budget on the
    layers with the largest weights. Each head's score is therefore its share of its layer's head
    norms, each neuron's its share of its layer's neuron norms: scaling a layer's weights leaves
    every score, and so the budget, where it was."""

    name: ClassVar[str] = "magnitude"

    @torch.no_grad()
    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        head_dim = adapter.head_dim(model.config)
        heads, neurons = [], []
        for layer in adapter.layers_of(model):
            w = lambda path: get_submodule(layer, path).weight.double()  # noqa: E731
            # q/k/v rows and output-projection columns of each head: [num_heads, head_dim * ...]
            qkv = torch.cat([w(p) for p in (adapter.query, adapter.key, adapter.value)], dim=1)
            per_head = qkv.view(-1, head_dim * qkv.shape[1]).pow(2).sum(1)
            per_head += w(adapter.attn_out).T.reshape(-1, head_dim * w(adapter.attn_out).shape[0]).pow(2).sum(1)
            heads.append(per_head.sqrt())
            neurons.append((w(adapter.ffn_up).pow(2).sum(1) + w(adapter.ffn_down).pow(2).sum(0)).sqrt())
        return ImportanceScores(layer_shares(torch.stack(heads)), layer_shares(torch.stack(neurons)), self.name)
