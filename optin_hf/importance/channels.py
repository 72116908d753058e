"""Per-channel statistics of what the output projections read, for the activation-aware criteria
(FLAP, Wanda-sp): each layer's attention output projection (`attn_out`) and FFN down projection
(`ffn_down`), channel j of their input being one feature of a head or one FFN neuron.

One dense pass over the calibration batches (no KV cache), real tokens only (a text batch's
attention mask), sums in float64: count, Σx and Σx² per input channel. A convolution's channels
are its dimension 1 and every spatial position is a row; Swin's windows are rows too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchAdapter, get_submodule
from ..arch.projection import feature_dim
from ..capture import scoring_forward
from ..config import OptinConfig
from ..data import average_length
from ..macs import CostModel

SUBLAYERS = ("attn_out", "ffn_down")


@dataclass
class ChannelStats:
    """count: rows seen; total, squares: [channels] Σx and Σx² over them (float64)."""

    count: int
    total: torch.Tensor
    squares: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """The unbiased sample variance of each channel (FLAP's fluctuation)."""
        return ((self.squares - self.count * self.mean.pow(2)) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """||x_j||₂ over the rows (Wanda's activation norm)."""
        return self.squares.sqrt()


def channel_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection's input as [rows, channels]: a conv's channels are dimension 1."""
    if isinstance(module, nn.Conv2d):
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def column_squares(module: nn.Module) -> torch.Tensor:
    """[in channels]: Σ of the squared weights that read each input channel (every output, every kernel tap)."""
    weight = module.weight.detach().double().movedim(feature_dim(module, "in"), 0)
    return weight.pow(2).flatten(1).sum(1)


def column_abs_mean(module: nn.Module) -> torch.Tensor:
    """[in channels]: the mean |weight| that reads each input channel."""
    weight = module.weight.detach().double().movedim(feature_dim(module, "in"), 0)
    return weight.abs().flatten(1).mean(1)


@torch.no_grad()
def input_statistics(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]
) -> list[dict[str, ChannelStats]]:
    """Per layer, {"attn_out": stats, "ffn_down": stats} of the projections' inputs on `batches`
    (a family without heads has no "attn_out")."""
    layers = adapter.layers_of(model)
    sublayers = SUBLAYERS if adapter.supports("heads") else SUBLAYERS[1:]
    stats: list[dict[str, ChannelStats]] = [{} for _ in layers]
    real: list[torch.Tensor | None] = [None]

    def record(i: int, sub: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            rows = channel_rows(module, args[0]).double()
            if real[0] is not None and real[0].numel() == rows.shape[0]:
                rows = rows[real[0].to(rows.device)]
            seen = stats[i].get(sub)
            if seen is None:
                seen = stats[i][sub] = ChannelStats(0, rows.new_zeros(rows.shape[1]), rows.new_zeros(rows.shape[1]))
            seen.count += rows.shape[0]
            seen.total += rows.sum(0)
            seen.squares += rows.pow(2).sum(0)

        return hook

    handles = [get_submodule(layer, getattr(adapter, sub)).register_forward_pre_hook(record(i, sub))
               for i, layer in enumerate(layers) for sub in sublayers]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            real[0] = None if mask is None else mask.reshape(-1).bool()
            scoring_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def per_unit(channels: torch.Tensor, width: int, reduce: str) -> torch.Tensor:
    """[units]: channel values [units * width] summed or averaged over each unit's `width` consecutive channels."""
    units = channels.view(-1, width)
    return units.mean(1) if reduce == "mean" else units.sum(1)


def unit_costs(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config: OptinConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers], [layers]): the MACs of one head and of one FFN neuron in each layer, at the MAC length the
    pruner counts at (`OptinConfig.seq_len`, else the batches' average unpadded length; an image's tokens).

    The budget search keeps the units of most summed score under the budget; a score times its unit's MACs
    makes it rank units by score per MAC, so a criterion that keeps units above one score threshold (FLAP,
    Wanda-sp) is allocated as its method does, with heads and neurons of unequal sizes."""
    costs = CostModel.of(model, adapter, config.image_size)
    seq_len = config.seq_len if config.seq_len is not None else average_length(batches)
    at = costs.at(costs.uniform(seq_len))
    return at.head, at.neuron


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """[layers, width]: each layer's unit scores, a narrower layer's padding 0 (padding is never kept)."""
    return torch.stack([F.pad(row, (0, width - row.numel())) for row in rows])
