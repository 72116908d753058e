"""Magnitude baseline: the L2 norm of the weights a structure owns."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from .scores import ImportanceScores


class MagnitudeImportance:
    name = "magnitude"

    @torch.no_grad()
    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config) -> ImportanceScores:
        head_dim = adapter.head_dim(model.config)
        heads, neurons = [], []
        for layer in adapter.layers_of(model):
            w = lambda path: get_submodule(layer, path).weight.float()  # noqa: E731
            # q/k/v rows and output-projection columns of each head: [num_heads, head_dim * ...]
            qkv = torch.cat([w(p) for p in (adapter.query, adapter.key, adapter.value)], dim=1)
            per_head = qkv.view(-1, head_dim * qkv.shape[1]).pow(2).sum(1)
            per_head += w(adapter.attn_out).T.reshape(-1, head_dim * w(adapter.attn_out).shape[0]).pow(2).sum(1)
            heads.append(per_head.sqrt())
            neurons.append((w(adapter.ffn_up).pow(2).sum(1) + w(adapter.ffn_down).pow(2).sum(0)).sqrt())
        return ImportanceScores(torch.stack(heads), torch.stack(neurons), self.name)
