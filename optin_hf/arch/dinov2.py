"""DINOv2 (image features and classification): a pre-LN ViT whose sublayers end in a layer scale.

A head owns its q/k/v rows and its output-projection columns; an MLP neuron its fc1 row and fc2
column, as in ViT. The layer scales (`layer_scale1`, `layer_scale2`) multiply each sublayer's
output per hidden channel before the residual addition: they act on the hidden size, which
pruning keeps, so they stay as they are. The MD feature is the first LayerNorm's output (`norm1`).

MACs (`count_macs`, what torch's FLOP counter sees in the encoder with eager attention) at the
calibration images' size: ViT's, the paper's per-head and per-neuron formulas on patches + 1
tokens and the patch embedding fixed. The model runs images of any size, interpolating its
position embeddings, and `facebook/dinov2-*` configs say 518 while their processors crop 224: the
pruner counts at the size it calibrates on, and `count_macs` of a dense model at its `image_size`
argument (else the config's). Not counted: LayerNorms, layer scales, the bicubic interpolation of
the position embeddings, and the classifier on the class token and the mean of the patch tokens.

The fast engine runs it (its layer pieces apply the layer scales). The refits run: `branch_scale`
gives each sublayer's layer scale λ, and the refit fits the scaled branch λ ⊙ (W x + b) to the
residual stream's target (the dense sum minus the pruned residual), so drift in the residual is
divided by λ per channel and each channel's error is weighed as the residual stream sees it. Token
mode is refused: the classifier averages the patch tokens, which merged tokens would reweight.
The SwiGLU FFN of the giant model (`use_swiglu_ffn=True`) is refused by `check_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import VISION_LAYER_PATHS, ArchAdapter, LayerGeometry
from .capabilities import Capabilities


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    # drop_path is the identity in eval mode, which is how optin-hf runs a model
    return layer.drop_path(layer.layer_scale1(layer.attention.o_proj(heads))) + layer_input


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden)))) + hidden


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *call_args, **call_kwargs) -> torch.Tensor:
    return layer.drop_path(layer.layer_scale2(down)) + hidden  # the MLP ends with fc2


def _cls_and_mean_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The linear head reads the class token beside the mean of the patch tokens."""
    normed = model.base_model.layernorm(hidden)
    return model.classifier(torch.cat([normed[:, 0], normed[:, 1:].mean(dim=1)], dim=1))


@dataclass(frozen=True)
class Dinov2Adapter(ArchAdapter):
    """ViT's geometry; a DINOv2 config gives its FFN width as `mlp_ratio`, and may ask for a SwiGLU FFN."""

    def check_config(self, config) -> None:
        if getattr(config, "use_swiglu_ffn", False):
            raise ValueError(
                "DINOv2 with use_swiglu_ffn=True (the giant model's gated SwiGLU FFN) is not supported: optin-hf "
                "prunes DINOv2's two-matrix MLP (use_swiglu_ffn=False: facebook/dinov2-small, -base, -large)."
            )

    def branch_scale(self, layer: nn.Module, sublayer: str) -> torch.Tensor | None:
        return (layer.layer_scale1 if sublayer == "attn_out" else layer.layer_scale2).lambda1.detach()

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        neurons = int(config.hidden_size * config.mlp_ratio)  # as Dinov2MLP builds fc1
        return (LayerGeometry(heads, head_dim, int(config.hidden_size), neurons),) * int(config.num_hidden_layers)


DINOV2 = Dinov2Adapter(
    model_types=("dinov2",),
    layers="encoder.layer",
    **{**VISION_LAYER_PATHS, "ffn_input": "norm2"},
    feature="norm1",
    patch_embedding="embeddings.patch_embeddings.projection",
    num_prefix_tokens=1,
    pooled_tokens=0,  # the classifier reads every token; images are never packed
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True),  # token mode: see the module docstring
    classifiers={"Dinov2ForImageClassification": _cls_and_mean_classifier},
)
