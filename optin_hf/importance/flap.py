"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs") as a criterion.

- Fluctuation metric (WIFV): an input channel j of an output projection (attention output, FFN
  down) scores Var(x_j) · Σ_i W_ij², the sample variance of the channel over the calibration tokens
  times the squared norm of the weights that read it: a channel that barely varies can be replaced
  by its mean, one that varies feeds the output through its weights. As the authors' code does,
  the attention metric is squared before standardization (their published numbers come from it).
- Adaptive structure search: each layer's attention channels and its FFN channels are
  standardized apart ((s - mean) / std over that layer's channels of that module), a head (a KV
  group under GQA: its g*dh channels) scores the mean of its channels, and heads and neurons of
  all layers are then ranked together and one threshold keeps the best, so layers and modules get
  different widths. Here all scores are shifted by one constant to be non-negative (which keeps the
  joint ranking) and multiplied by each unit's MACs: the harness's budget search, which keeps the
  most summed score under a MAC budget, then keeps the units above one threshold of FLAP's score
  (FLAP's own search counts parameters instead of MACs).
- Bias compensation (adding the removed channels' mean contribution W[:, removed] · E[x_removed] to
  the output bias) changes weights, so it is a repair, not a score: in this harness the refit
  (`reconstruct="weights"`) plays that part, a least-squares fit of the output projection of which
  the mean compensation is the special case with the kept weights fixed (and, where the projection
  has no bias, as in Llama, Mistral and Qwen, the fit keeps none: their standard configs have no
  place for one). `reconstruct="none"` gives FLAP without any compensation.

Generic over families: any output projection (Linear, Conv1D, a conv's input channels) works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..config import OptinConfig
from ..masks import PruningMasks
from .base import ConfiguredImportance
from .channels import column_squares, input_statistics, padded, per_unit, unit_costs
from .scores import ImportanceScores


def standardized(values: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std (unbiased) over one layer's channels of one module; 0 where they do not vary."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


@torch.no_grad()
def standardized_fluctuation(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, each head's and each FFN neuron's fluctuation metric standardized within the layer (module
    docstring; a family without heads: empty head rows), measured on `batches`."""
    heads, neurons = [], []
    for layer, seen in zip(adapter.layers_of(model), input_statistics(model, adapter, batches)):
        down = get_submodule(layer, adapter.ffn_down)
        neurons.append(standardized(seen["ffn_down"].variance * column_squares(down)))
        if "attn_out" not in seen:  # a family without heads
            heads.append(torch.zeros(0, dtype=torch.float64))
            continue
        fluctuation = (seen["attn_out"].variance * column_squares(get_submodule(layer, adapter.attn_out))).pow(2)
        heads.append(per_unit(standardized(fluctuation), adapter.layer_head_dim(layer, model.config), "mean"))
    return heads, neurons


@dataclass(frozen=True)
class FlapImportance(ConfiguredImportance):
    """FLAP's fluctuation scores (module docstring); no setting of its own."""

    name: ClassVar[str] = "flap"

    @torch.no_grad()
    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        heads, neurons = standardized_fluctuation(model, adapter, batches)
        kinds = list(zip((padded(heads, adapter.num_heads(model.config)), padded(neurons, adapter.intermediate_size(model.config))),
                         PruningMasks.full(model.config, adapter).present()))
        # one shift for heads and neurons alike keeps their joint ranking; times each unit's MACs, the budget
        # search keeps the units above one threshold, as FLAP does (`unit_costs`); padding stays 0
        floor = min(float(scores[present].min()) for scores, present in kinds if present.any())
        costs = unit_costs(model, adapter, batches, config)
        head_scores, neuron_scores = ((scores - floor) * present * cost[:, None] for (scores, present), cost in zip(kinds, costs))
        return ImportanceScores(head_scores, neuron_scores, self.name)
