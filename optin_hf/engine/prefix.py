"""The prefix cache: what each layer received in the dense run.

Masking a structure of layer i cannot change layers before i, so a masked run can start at
layer i from the dense run's inputs instead of at the embeddings.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule


@dataclass
class LayerCall:
    """One layer's call in one dense batch.

    hidden: [batch, tokens, hidden], the layer input. args/kwargs: the rest of the call (the
    extended attention mask, ...), replayed as they were. heads: [batch, tokens, heads*head_dim],
    the input of the attention output projection. output: the layer output (kept for the last
    layer only, to check the replay, or for every layer where the layers do not form a chain,
    `ArchAdapter.chained_layers`, to replay them); tuple_size: the length of the tuple the layer
    returned it in (0: it returned the tensor), to replay it as the layer returns it.
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    heads: torch.Tensor | None = None
    output: torch.Tensor | None = None
    tuple_size: int = 0


@contextmanager
def record_layer_calls(model: nn.Module, adapter: ArchAdapter, heads: bool = True) -> Iterator[list[list[LayerCall]]]:
    """calls[b][i]: layer i's call in the b-th forward run inside the context (with the input of its
    attention output projection where `heads` and the family has heads)."""
    layers = adapter.layers_of(model)
    calls: list[list[LayerCall]] = []

    def enter(i: int):
        def hook(module, args, kwargs):
            if i == 0:
                calls.append([])
            calls[-1].append(LayerCall(args[0], tuple(args[1:]), dict(kwargs)))

        return hook

    def keep_heads(i: int):
        def hook(module, args):
            calls[-1][i].heads = args[0]

        return hook

    def keep_output(i: int):
        def hook(module, args, output):
            call = calls[-1][i]
            call.output, call.tuple_size = (output[0], len(output)) if isinstance(output, tuple) else (output, 0)

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
            if i == len(layers) - 1 or not adapter.chained_layers:
                handles.append(layer.register_forward_hook(keep_output(i)))
            if heads and adapter.supports("heads"):
                handles.append(get_submodule(layer, adapter.attn_out).register_forward_pre_hook(keep_heads(i)))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
