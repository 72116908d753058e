"""OPTIN's score of coupled residual channels (`OptinConfig.prune_channels`): one masked run per channel.

A residual channel lives in every output of its group's sites (a ResNet's stem, every block of the stages
its residual adds tie together: `ArchAdapter.channel_carriers`). Zeroing it in all of them is what removing
it computes: each conv, shortcut and classifier that reads the group then sees nothing from it, and no kept
channel changes. So a channel's run zeroes it there, and its score is the same MD over the layers from the
first one that reads the group on, plus the balanced KL, as a head's or a neuron's (`engine.reference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter
from ..capture import capture_dense
from ..engine.reference import masked_run_losses
from ..losses import balance


@contextmanager
def zero_channel(carriers: list[nn.Module], channel: int) -> Iterator[None]:
    """Zero channel `channel` (dimension 1) of every carrier's output while the context is open."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, channel] = 0
        return output

    handles = [carrier.register_forward_hook(hook) for carrier in carriers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def residual_channel_losses(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], md_tokens: int, seed: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MD, KL) of removing each residual channel ([channels of every group in turn] each), one run per channel."""
    capture = capture_dense(model, adapter, batches, md_tokens, seed)
    md, kl = [], []
    carriers = adapter.channel_carriers(model)
    total = sum(adapter.channel_widths(model.config))
    with tqdm(total=total, desc="Scoring residual channels", unit="channel") as progress:
        for (modules, first_reader), width in zip(carriers, adapter.channel_widths(model.config)):
            for channel in range(width):
                with zero_channel(modules, channel):
                    # judged on the layers from the first reader on (`later_layers` of the layer before it)
                    m, k = masked_run_losses(model, adapter, batches, capture, first_reader - 1, temperature)
                md.append(m)
                kl.append(k)
                progress.update()
    return torch.tensor(md, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64)


def residual_channel_scores(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], md_tokens: int, seed: int,
    temperature: float, lambda_contribution: float,
) -> torch.Tensor:
    """OPTIN's balanced score (MD + scaled KL, `losses.balance`) of each residual channel."""
    md, kl = residual_channel_losses(model, adapter, batches, md_tokens, seed, temperature)
    return balance(md, kl, lambda_contribution)
