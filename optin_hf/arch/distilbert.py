"""DistilBERT: its output projection sits inside the attention module."""

import torch
from torch import nn

from .base import ArchAdapter
from .capabilities import Capabilities


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.sa_layer_norm(layer.attention.out_lin(heads) + layer_input)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.output_layer_norm(layer.ffn(hidden) + hidden)


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.output_layer_norm(layer.ffn.dropout(down) + hidden)  # FFN applies its dropout after lin2


def _classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


DISTILBERT = ArchAdapter(
    model_types=("distilbert",),
    layers="transformer.layer",
    attn_core="attention",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attn_out="attention.out_lin",
    ffn_up="ffn.lin1",
    ffn_down="ffn.lin2",
    ffn_input="ffn",
    feature="ffn.lin2",
    head_count_attrs=("n_heads",),
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True),
    classifiers={"DistilBertForSequenceClassification": _classifier},
)
