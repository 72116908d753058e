"""MAC counts of encoder layers, with the formulas of the OPTIN paper.

Per head at sequence length s, hidden d, head size dh: 3*s*d*dh (q, k, v) + 2*s*s*dh
(scores and context) + s*dh*d (output projection). Per FFN neuron: 2*s*d. Embeddings and
the classifier are not counted; a vision model's patch embedding is.
"""

from __future__ import annotations

from torch import nn

from .arch import check_model


def head_macs(seq_len: float, hidden: int, head_dim: int) -> float:
    return 3 * seq_len * hidden * head_dim + 2 * seq_len * seq_len * head_dim + seq_len * head_dim * hidden


def neuron_macs(seq_len: float, hidden: int) -> float:
    return 2 * seq_len * hidden


def count_macs(model: nn.Module, seq_len: float | None = None) -> float:
    """MACs of one example through the encoder of a dense or slimmed model.

    `seq_len` defaults to the image's token count for vision models; text needs it given.
    """
    adapter = check_model(model)
    config = model.config
    if seq_len is None:
        seq_len = adapter.default_seq_len(config)
        if seq_len is None:
            raise ValueError("count_macs needs seq_len for a text model (e.g. the average unpadded length).")
    hidden, head_dim = config.hidden_size, adapter.head_dim(config)
    total = float(adapter.patch_embedding_macs(model))
    for layer in adapter.layers_of(model):
        total += adapter.kept_heads(layer, config) * head_macs(seq_len, hidden, head_dim)
        total += adapter.kept_neurons(layer) * neuron_macs(seq_len, hidden)
    return total
