"""ViT and DeiT. The MD feature is the first LayerNorm's output (the normalised layer input)."""

from dataclasses import replace

import torch
from torch import nn

from .base import VISION_LAYER_PATHS, ArchAdapter
from .capabilities import Capabilities


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.dropout(layer.attention.o_proj(heads)) + layer_input


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.dropout(layer.mlp(layer.layernorm_after(hidden))) + hidden


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.dropout(down) + hidden  # the MLP ends with fc2


def _cls_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.base_model.layernorm(hidden)[:, 0])


def _deit_with_teacher(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """DeiT's distilled model always averages its class-token and distillation-token heads."""
    normed = model.base_model.layernorm(hidden)
    return (model.cls_classifier(normed[:, 0]) + model.distillation_classifier(normed[:, 1])) / 2


VIT = ArchAdapter(
    model_types=("vit",),
    layers="layers",
    **VISION_LAYER_PATHS,
    feature="layernorm_before",
    patch_embedding="embeddings.patch_embeddings.projection",
    num_prefix_tokens=1,
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    # token mode merges patches and keeps the class token apart; the refit counts a small ViT's units (RESULTS, s46);
    # DeiT (below) inherits all of it
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True, tokens=True, allocation="refit"),
    classifiers={"ViTForImageClassification": _cls_classifier},
)

# DeiT adds a distillation token after the class token, which its teacher head reads too.
DEIT = replace(
    VIT,
    model_types=("deit",),
    num_prefix_tokens=2,
    pooled_tokens=2,
    classifiers={
        "DeiTForImageClassification": _cls_classifier,
        "DeiTForImageClassificationWithTeacher": _deit_with_teacher,
    },
)
