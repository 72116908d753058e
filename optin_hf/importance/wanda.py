"""Wanda-sp (the structured Wanda of An et al., AAAI 2024, FLAP's baseline) as a criterion.

Wanda scores a weight by |W_ij| · ||x_j||₂ (its magnitude times the norm of the input it reads
over the calibration tokens). Wanda-sp sums it over a structure: an input channel j of an output
projection (attention output, FFN down) scores the mean over outputs of |W_ij| times ||x_j||₂; a
head (a KV group under GQA) the sum over its channels, a neuron its channel.

Wanda-sp removes the same share of heads and of neurons in every layer. Its raw scores are not
comparable across layers (the residual stream's scale grows with depth), so each score here is its
rank within its layer and kind, as a quantile in (0, 1], times the unit's MACs (`channels.unit_costs`):
the harness's budget search, which keeps the most summed score under the budget, then cuts every
layer and both kinds at about the same quantile, which is Wanda-sp's uniform structure;
`uniform_layers=True` makes the counts exactly equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..config import OptinConfig
from .base import ConfiguredImportance
from .channels import column_abs_mean, input_statistics, padded, per_unit, unit_costs
from .scores import ImportanceScores


def quantiles(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among `values` (1 = lowest) over their count: in (0, 1], ties broken by position."""
    ranks = torch.empty_like(values)
    ranks[values.argsort(stable=True)] = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    return ranks / max(values.numel(), 1)


@dataclass(frozen=True)
class WandaSpImportance(ConfiguredImportance):
    """Wanda-sp's activation-weighted magnitudes as per-layer quantiles (module docstring); no setting of its own."""

    name: ClassVar[str] = "wanda_sp"

    @torch.no_grad()
    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        stats = input_statistics(model, adapter, batches)
        heads, neurons = [], []
        for layer, seen in zip(adapter.layers_of(model), stats):
            down = get_submodule(layer, adapter.ffn_down)
            neurons.append(quantiles(column_abs_mean(down) * seen["ffn_down"].norm))
            if "attn_out" not in seen:  # a family without heads
                heads.append(torch.zeros(0, dtype=torch.float64))
                continue
            channels = column_abs_mean(get_submodule(layer, adapter.attn_out)) * seen["attn_out"].norm
            heads.append(quantiles(per_unit(channels, adapter.layer_head_dim(layer, model.config), "sum")))
        head_cost, neuron_cost = unit_costs(model, adapter, batches, config)  # by quantile per MAC: one cut everywhere
        return ImportanceScores(padded(heads, adapter.num_heads(model.config)) * head_cost[:, None],
                                padded(neurons, adapter.intermediate_size(model.config)) * neuron_cost[:, None], self.name)
