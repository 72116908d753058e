"""OPTIN's trajectory score: how much removing one structure (a head, a neuron, or in vision
token mode a token from a layer onward) disturbs the later layers (manifold distillation) and
the logits (KL)."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter
from ..engine import compute_raw_losses
from ..engine.run import grouped
from ..losses import balance, faithful_weights, token_scores
from ..token_engine import capture_token_grams, reference_token_losses
from .scores import ImportanceScores


class OptinImportance:
    name = "optin"

    @staticmethod
    def masked_units(model: nn.Module, adapter: ArchAdapter, config) -> dict[str, int]:
        """Units per layer of each kind scored by masked runs (what scoring time is spent on)."""
        units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        enabled = {"head": config.prune_heads, "neuron": config.prune_neurons}
        return {kind: count for kind, count in units.items() if enabled[kind]}

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config) -> ImportanceScores:
        num_layers = len(adapter.layers_of(model))
        units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        # Neurons may be scored in groups of consecutive units (a speed/granularity trade-off);
        # each neuron then carries an equal share of its group's balanced score (a last group
        # that the width does not fill is shared by fewer neurons), so importance
        # sums stay comparable with the heads' in the budget search.
        group = {"head": 1, "neuron": config.neuron_group_size}
        candidates = grouped(self.masked_units(model, adapter, config), group)
        raw = compute_raw_losses(model, adapter, batches, config, candidates, groups={"neuron": group["neuron"]})
        scores = {}
        for kind, count in units.items():
            if kind not in raw:
                scores[kind] = torch.zeros(num_layers, count)
                continue
            balanced = balance(raw[kind].md, raw[kind].kl, config.lambda_contribution)
            sizes = torch.full((balanced.shape[1],), group[kind])
            sizes[-1] = count - group[kind] * (len(sizes) - 1)  # a last group may be partial
            scores[kind] = (balanced / sizes).repeat_interleave(sizes, dim=1)
            if config.faithful:
                scores[kind] = scores[kind] * faithful_weights(num_layers, count, kind)
        tokens = None
        if config.prune_tokens:
            token_raw = reference_token_losses(model, adapter, batches, capture_token_grams(model, adapter, batches), config.temperature)
            tokens = token_scores(token_raw.md, token_raw.kl, config.lambda_contribution, config.max_patch_envelope, config.patch_metric_decay)
        return ImportanceScores(scores["head"], scores["neuron"], self.name, tokens)
