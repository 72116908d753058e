"""The model's own forward around layers whose outputs are already known.

Where a model's layers do not run one into the next (`ArchAdapter.chained_layers` False: a Swin
stage's patch merging, SegFormer's stage norm and next patch embedding, a decode head that reads
every stage), a run cannot be finished layer by layer from a hidden state. The fast engine and the
refit then call the model itself with the layers they already have outputs for replayed: such a
layer returns its given output without running, and the model computes what lies between and
after them (embeddings, transitions, the task head) as it always does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def layer_output(hidden: torch.Tensor, tuple_size: int) -> torch.Tensor | tuple:
    """What a layer returns when its hidden output is `hidden`: the tensor, or a tuple of `tuple_size`
    whose first element it is (the rest, a layer's attention weights, nobody reads in a scoring run)."""
    return (hidden, *[None] * (tuple_size - 1)) if tuple_size else hidden


@contextmanager
def replay_layers(layers: Sequence[nn.Module], outputs: Mapping[int, torch.Tensor | tuple]) -> Iterator[None]:
    """While open, layer i of `layers` (each i in `outputs`) returns outputs[i] instead of running.

    The layer's hooks still fire around it (a forward hook reading its output sees the replayed one)."""
    try:
        for i, output in outputs.items():
            layers[i].forward = lambda *args, _output=output, **kwargs: _output
        yield
    finally:
        for i in outputs:
            layers[i].__dict__.pop("forward", None)
