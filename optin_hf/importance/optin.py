"""OPTIN's trajectory score: how much removing one structure (a head, a neuron, or in vision
token mode a token from a layer onward) disturbs the later layers (manifold distillation) and
the logits (KL)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import OptinConfig
from ..engine import compute_raw_losses
from ..engine.run import grouped
from ..engine.streaming import resident
from ..engine.token_losses import capture_token_grams, reference_token_losses
from ..losses import balance, faithful_weights, token_scores
from ..masks import PruningMasks
from .base import ConfiguredImportance
from .residual_channels import residual_channel_scores
from .scores import ImportanceScores


@dataclass(frozen=True)
class OptinImportance(ConfiguredImportance):
    """The settings are `OptinConfig`'s of the same name: the Gram temperature, the KL weight, the
    MD token subset, neuron grouping, the reference's extra weights and the token-score shape."""

    temperature: float = OptinConfig.temperature
    lambda_contribution: float = OptinConfig.lambda_contribution
    md_tokens: int = OptinConfig.md_tokens
    neuron_group_size: int = OptinConfig.neuron_group_size
    faithful: bool = OptinConfig.faithful
    max_patch_envelope: float = OptinConfig.max_patch_envelope
    patch_metric_decay: float = OptinConfig.patch_metric_decay

    name: ClassVar[str] = "optin"
    scores_tokens: ClassVar[bool] = True
    scores_channels: ClassVar[bool] = True  # residual channels, by masked runs (`importance.residual_channels`)

    @staticmethod
    def masked_units(model: nn.Module, adapter: ArchAdapter, config) -> dict[str, int]:
        """Units per layer of each kind scored by masked runs (what scoring time is spent on)."""
        units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        enabled = {"head": config.prune_heads, "neuron": config.prune_neurons}
        return {kind: count for kind, count in units.items() if enabled[kind]}

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        config = dataclasses.replace(config, **self.settings())  # the engines read these settings from it
        num_layers = len(adapter.layers_of(model))
        units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        # Neurons may be scored in groups (a speed/granularity trade-off): groups of neurons of like
        # output energy, so that a group's score stands for neurons that matter alike. Each neuron
        # carries an equal share of its group's balanced score (a last group that the width does
        # not fill is shared by fewer neurons), so importance sums stay comparable with the heads'.
        group = {"head": 1, "neuron": self.neuron_group_size}
        candidates = grouped(self.masked_units(model, adapter, config), group)
        orders = {"neuron": neuron_energy_order(model, adapter, batches)} if group["neuron"] > 1 and "neuron" in candidates else {}
        raw = compute_raw_losses(model, adapter, batches, config, candidates, groups={"neuron": group["neuron"]}, orders=orders)
        present = dict(zip(units, PruningMasks.full(model.config, adapter).present()))
        scores = {}
        for kind, count in units.items():
            if kind not in raw:
                scores[kind] = torch.zeros(num_layers, count)
                continue
            balanced = balance(raw[kind].md, raw[kind].kl, self.lambda_contribution)
            group_of = torch.arange(count) // group[kind]
            # units in each unit's group: a layer's last group may be partial, its padding has none
            sizes = (present[kind].sum(1, keepdim=True) - group_of * group[kind]).clamp(max=group[kind])
            scores[kind] = (balanced[:, group_of] / sizes.clamp_min(1)).masked_fill(~present[kind], 0.0)
            if kind in orders:  # place p of a layer's order is neuron orders[kind][layer, p]
                scores[kind] = torch.empty_like(scores[kind]).scatter_(1, orders[kind], scores[kind])
            if self.faithful:
                scores[kind] = scores[kind] * faithful_weights(num_layers, count, kind)
        tokens = None
        if config.prune_tokens:
            capture = capture_token_grams(model, adapter, batches)
            token_raw = reference_token_losses(model, adapter, batches, capture, self.temperature, checkpoint_dir=config.checkpoint_dir)
            tokens = token_scores(token_raw.md, token_raw.kl, self.lambda_contribution, self.max_patch_envelope, self.patch_metric_decay)
        channels = None
        if config.prune_channels:
            channels = residual_channel_scores(model, adapter, batches, self.md_tokens, config.seed, self.temperature,
                                               self.lambda_contribution)
        return ImportanceScores(scores["head"], scores["neuron"], self.name, tokens, channel_scores=channels)


@torch.no_grad()
def neuron_energy_order(model: nn.Module, adapter: ArchAdapter, batches) -> torch.Tensor:
    """[num_layers, intermediate_size]: each layer's FFN neurons by output energy, largest first
    (then a narrower layer's padding).

    A neuron's energy is the norm of what it adds to the down projection's output over the real
    calibration tokens: ||W_down[:, j]|| * sqrt(sum of its squared activations).
    """
    device = next(model.parameters()).device
    layers = adapter.layers_of(model)
    sums = [0.0] * len(layers)
    real: torch.Tensor | None = None  # the batch in progress's real token rows

    def keep(i: int):
        def hook(module, args):
            x = downs[i].rows(args[0]).double()  # [positions, features], a conv's channels last
            sums[i] = sums[i] + (x if real is None else x[real]).pow(2).sum(0)

        return hook

    downs = [adapter.projection(layer, "ffn_down") for layer in layers]
    handles = [down.module.register_forward_pre_hook(keep(i)) for i, down in enumerate(downs)]
    try:
        for batch in batches:
            real = batch["attention_mask"].reshape(-1).bool().to(device) if "attention_mask" in batch else None
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    # the norm of each input feature's weights: a column of the [out, in] matrix (an offloaded layer's read resident)
    norms = []
    for layer, down in zip(layers, downs):
        with resident(layer):
            norms.append(down.weight().double().norm(dim=0))
    width = adapter.intermediate_size(model.config)  # a narrower layer's padding goes last, in place
    orders = [(s.sqrt() * n).argsort(descending=True).cpu() for s, n in zip(sums, norms)]
    return torch.stack([torch.cat([o, torch.arange(len(o), width)]) for o in orders])
