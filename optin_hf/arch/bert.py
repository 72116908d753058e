"""BERT-style text encoders: bert and roberta share one layout."""

import torch
from torch import nn

from .base import ArchAdapter
from .capabilities import Capabilities


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.attention.output(heads, layer_input)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.output(layer.intermediate(hidden), hidden)


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.output.LayerNorm(layer.output.dropout(down) + hidden)


def _bert_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(model.base_model.pooler(hidden)))


def _roberta_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(hidden)  # RobertaClassificationHead pools token 0 itself


BERT = ArchAdapter(
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    attn_core="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    ffn_input="intermediate",
    feature="output.dense",
    head_count_attrs=("num_attention_heads",),
    all_head_size_attr="all_head_size",
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True),
    classifiers={
        "BertForSequenceClassification": _bert_classifier,
        "RobertaForSequenceClassification": _roberta_classifier,
    },
)
