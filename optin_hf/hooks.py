"""Forward hooks: mask heads and neurons without touching weights, and record MD features.

transformers 5 has no `head_mask`, so a head is removed by zeroing its slice of the input of
the attention output projection, and a neuron by zeroing its input to the FFN down
projection. Both work the same with eager and sdpa attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .arch import ArchAdapter, get_submodule


def _scale_input(mask: torch.Tensor, repeat: int):
    """Pre-hook multiplying the input's features by `mask` ([units] or [batch, units]) repeated per
    unit: the last dim, or a convolution's channels (dim 1 of [batch, channels, height, width]).
    A [batch, units] mask on an input of batch x windows rows gives each window its example's row."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = mask.to(dtype=x.dtype, device=x.device).repeat_interleave(repeat, dim=-1)
        if isinstance(module, nn.Conv2d):  # channels first: broadcast over the spatial dims
            m = m.view(*m.shape, 1, 1)
        elif m.dim() == 2:  # one mask per example: broadcast over the token dims
            if x.shape[0] != m.shape[0]:  # window attention (Swin) runs each example's windows as consecutive rows
                m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)
            m = m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
        return (x * m, *args[1:])

    return hook


@contextmanager
def scale_input(module: nn.Module, mask: torch.Tensor, repeat: int = 1) -> Iterator[None]:
    """Multiply one module's input by `mask` ([units] or [batch, units], each unit `repeat` wide) in the context."""
    handle = module.register_forward_pre_hook(_scale_input(mask, repeat))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def apply_masks(
    model: nn.Module,
    adapter: ArchAdapter,
    head_mask: torch.Tensor | None = None,
    neuron_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Mask a dense model while the context is open.

    head_mask: [num_layers, num_heads] (or [num_layers, batch, num_heads] to mask each batch
    row differently); neuron_mask likewise with intermediate_size. Values are multipliers. A
    layer narrower than the masks reads only its own units (the rest is padding).
    """
    layers = adapter.layers_of(model)
    geometry = adapter.layer_geometry(model.config)
    handles = []
    try:
        for i, (layer, g) in enumerate(zip(layers, geometry)):
            if head_mask is not None and g.heads:
                out = get_submodule(layer, adapter.attn_out)
                handles.append(out.register_forward_pre_hook(_scale_input(head_mask[i][..., : g.heads], g.head_dim)))
            if neuron_mask is not None and g.neurons:
                down = get_submodule(layer, adapter.ffn_down)
                handles.append(down.register_forward_pre_hook(_scale_input(neuron_mask[i][..., : g.neurons], 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_features(model: nn.Module, adapter: ArchAdapter) -> Iterator[list]:
    """Collect each layer's MD feature ([batch, tokens, hidden]) during forwards in the context.

    A feature module that returns a tuple (a whole layer, as Swin's) gives its first element; a
    CNN's feature map [batch, channels, height, width] is read as [batch, height*width, channels]."""
    features: list = [None] * len(adapter.layers_of(model))
    handles = []

    def keep(i: int):
        def hook(module, args, output):
            feature = output[0] if isinstance(output, tuple) else output
            features[i] = feature.flatten(2).transpose(1, 2) if feature.dim() == 4 else feature

        return hook

    try:
        for i, layer in enumerate(adapter.layers_of(model)):
            handles.append(get_submodule(layer, adapter.feature).register_forward_hook(keep(i)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def drop_token(model: nn.Module, adapter: ArchAdapter, layer: int, position: int) -> Iterator[None]:
    """Remove token `position` from the input of `layer` (and so from every later layer) while open."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.cat([x[:, :position], x[:, position + 1 :]], dim=1), *args[1:])

    handle = adapter.layers_of(model)[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
