"""MAC counts of encoder layers: the kept units times each unit's cost, which the adapter gives.

By default (the OPTIN paper's formulas, `ArchAdapter.head_macs` / `neuron_macs`), per head at
sequence length s, hidden d, head size dh: 3*s*d*dh (q, k, v) + 2*s*s*dh (scores and context)
+ s*dh*d (output projection); per FFN neuron: 2*s*d. Embeddings and the classifier are not
counted; a vision model's patch embedding is, and so is all an adapter's `fixed_macs` gives
(Swin: also its patch-merging reductions).

With a token schedule, layer i uses s = schedule[i], the number of tokens it really holds,
class (and distillation) tokens included, because every matmul of the layer runs on all of
them. (The reference counts s = tokens - 1 there, which disagrees both with its own dense base
of 197 tokens and with the FLOPs the model runs.) Token merging's similarity matmul, |A|*|B|*d
per round, is counted too, so the count equals what a FLOP counter measures.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch import nn

from .arch import ArchAdapter, check_model
from .tokens import installed_schedule, merge_rounds


def check_seq_len(seq_len: float) -> None:
    """Refuse a length the MAC formulas cannot use (NaN would make every budget comparison false)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, Real) or not math.isfinite(seq_len) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} is not a positive finite number of tokens: pass e.g. the average unpadded length.")


def unit_macs(schedule: Sequence[float], adapter: ArchAdapter, config) -> tuple[torch.Tensor, torch.Tensor]:
    """MACs of one head and of one neuron in each layer ([num_layers] each) at its token count,
    by the adapter's formulas (the ones `count_macs` uses, so a budget met here is met there)."""
    heads = torch.tensor([adapter.head_macs(s, config, i) for i, s in enumerate(schedule)], dtype=torch.float64)
    neurons = torch.tensor([adapter.neuron_macs(s, config, i) for i, s in enumerate(schedule)], dtype=torch.float64)
    return heads, neurons


def merge_macs(schedule: Sequence[int], num_prefix_tokens: int, hidden: int) -> float:
    """MACs of the matching that takes each layer's input down to its scheduled token count."""
    total = 0.0
    for before, after in zip(schedule, schedule[1:]):
        for size_a, size_b, _ in merge_rounds(before - num_prefix_tokens, after - num_prefix_tokens):
            total += size_a * size_b * hidden
    return total


def count_macs(model: nn.Module, seq_len: float | None = None, token_schedule: Sequence[int] | None = None) -> float:
    """MACs of one example through the encoder of a dense or slimmed model.

    `seq_len` defaults to the image's token count for vision models; text needs it given.
    `token_schedule` (tokens per layer) defaults to the one the model runs, if it merges tokens;
    a `seq_len` given with a schedule must be its input length, schedule[0].
    """
    adapter = check_model(model)
    config = model.config
    layers = adapter.layers_of(model)
    schedule = token_schedule if token_schedule is not None else installed_schedule(model)
    total = float(adapter.fixed_macs(model))
    if schedule is not None:
        if seq_len is not None and seq_len != schedule[0]:
            raise ValueError(
                f"seq_len={seq_len} disagrees with the token schedule {list(schedule)}: layer i holds schedule[i] "
                "tokens, so the input length is schedule[0]. Leave seq_len out."
            )
        total += merge_macs(schedule, adapter.num_prefix_tokens, config.hidden_size)
    else:
        if seq_len is None:
            seq_len = adapter.default_seq_len(config)
        if seq_len is None:
            raise ValueError("count_macs needs seq_len for a text model (e.g. the average unpadded length).")
        check_seq_len(seq_len)
        schedule = [seq_len] * len(layers)
    for i, (layer, tokens) in enumerate(zip(layers, schedule)):
        heads = adapter.kept_heads(layer, config) * float(adapter.head_macs(tokens, config, i))
        total += heads + adapter.kept_neurons(layer) * float(adapter.neuron_macs(tokens, config, i))
    return total
