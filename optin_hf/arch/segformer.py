"""SegFormer (semantic segmentation): a Mix Transformer encoder of four stages, each on a map
a quarter (then half) the size of the one before, with efficient self-attention and Mix-FFNs,
so layers differ in heads, hidden size, FFN width and tokens.

A head owns its q/k/v rows and its output-projection columns. The spatial-reduction conv (`sr`)
and its LayerNorm make the keys' and values' input for all heads, so they belong to no head and
stay (a layer that keeps no head drops them with the attention). A Mix-FFN hidden channel owns
its dense1 (fc1) row, its channel of the depthwise 3x3 conv and its dense2 (fc2) column. The MD
feature is each layer's output.

MACs (`count_macs`, what torch's FLOP counter sees in the encoder with eager attention) at the
calibration images' size (a SegFormer runs any size, and its config seldom states one;
`count_macs(model, image_size=...)` counts a dense model at another): a layer of hidden d, head size dh on a map of N tokens whose
keys and values run on the N_r = (h // R)(w // R) tokens of the reduced map (R the stage's
`sr_ratios`; N_r = N when R = 1): per head N·d·dh (q) + 2·N_r·d·dh (k, v) + 2·N·N_r·dh (scores
and context) + N·dh·d (output columns); per hidden channel 2·N·d (dense1, dense2) + 9·N (its
depthwise 3x3 conv). Fixed: each stage's overlapping patch-embedding conv and each layer's
spatial-reduction conv, N_r·d·R²·d (not run, so not counted, in a layer that keeps no head: the
budget search counts it, so such a model lands that much under its budget).
Not counted: LayerNorms, biases, softmax and GELU, and the all-MLP decode head (it stays dense:
pruning does not change it).

The layer pieces take the map's height and width from the layer's call (the Mix-FFN's depthwise
conv needs them). The layers do not chain (each stage ends in a LayerNorm, and the next begins
with its patch embedding) and the decode head reads every stage, so the fast engine and the refit
run the model's own forward around the layers they replay (`ArchAdapter.chained_layers`). The
refits fit the attention output projection and the Mix-FFN's dense2 (fc2), both on tokens in map
order, as ViT's. The weights refit then fits what reads a stage's output (`link_refits`, `optin_hf.link_refit`): the
later stages' patch-embedding convs and the decode head's per-stage projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import VISION_LAYER_PATHS, ArchAdapter, EmptyAttention, ImageSize, LayerGeometry, get_submodule
from .capabilities import Capabilities

DWCONV = "mlp.dwconv.dwconv"


class NoChannels(nn.Module):
    """The depthwise conv (with its reshapes) of a layer that keeps no FFN neuron: its zero channels pass as they
    are. The conv's wrapper would view them as an image of zero channels, which the ONNX exporter cannot trace."""

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return hidden_states


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.drop_path(layer.hidden_dropout(layer.attention.o_proj(heads))) + layer_input


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, height: int, width: int, **kwargs) -> torch.Tensor:
    return layer.drop_path(layer.mlp(layer.layernorm_after(hidden), height, width)) + hidden


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.drop_path(layer.mlp.dropout(down)) + hidden  # the Mix-FFN ends with dense2 and its dropout


def _conv_out(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv padded by kernel // 2, as the overlapping patch embeddings are."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def stage_grids(config, image_size: ImageSize) -> list[tuple[int, int]]:
    """Each stage's feature map (height, width) after its overlapping patch embedding, on an `image_size` image."""
    height, width = image_size
    grids = []
    for kernel, stride in zip(config.patch_sizes[: config.num_encoder_blocks], config.strides):
        height, width = _conv_out(height, kernel, stride), _conv_out(width, kernel, stride)
        grids.append((height, width))
    return grids


def _stage_of(config, layer: int) -> int:
    ends = torch.tensor(config.depths).cumsum(0).tolist()
    return next(s for s, end in enumerate(ends) if layer < end)


@dataclass(frozen=True)
class SegformerAdapter(ArchAdapter):
    """SegFormer's layers are its stages' blocks, in order; see the module docstring for the geometry."""

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return nn.ModuleList([block for stage in get_submodule(model.base_model, self.layers) for block in stage.blocks])

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        """The encoder builds `num_encoder_blocks` stages, the first entries of the per-stage lists."""
        geometry: list[LayerGeometry] = []
        stages = zip(config.depths[: config.num_encoder_blocks], config.num_attention_heads, config.hidden_sizes, config.mlp_ratios)
        for depth, heads, dim, ratio in stages:
            geometry += [LayerGeometry(heads, dim // heads, dim, int(dim * ratio))] * depth
        return tuple(geometry)

    def layer_head_dim(self, layer: nn.Module, config) -> int:
        return get_submodule(layer, self.attn_core).head_dim

    def slim_neurons(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        """Also keep only the kept channels of the depthwise conv (one group per channel); a layer
        that keeps none gets `NoChannels` there, which passes its zero channels on."""
        super().slim_neurons(layer, keep, config)
        if len(keep) == 0:
            get_submodule(layer, "mlp").dwconv = NoChannels()
            return
        conv = get_submodule(layer, DWCONV)
        index = keep.to(conv.weight.device)
        new = nn.Conv2d(len(keep), len(keep), conv.kernel_size, conv.stride, conv.padding, groups=len(keep),
                        bias=conv.bias is not None, device="meta")
        new.weight = nn.Parameter(conv.weight.detach().index_select(0, index).clone(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().index_select(0, index).clone(), requires_grad=conv.bias.requires_grad)
        get_submodule(layer, "mlp.dwconv").dwconv = new

    def link_refits(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """The later stages' patch-embedding convs, and the decode head's per-stage projections (a segmenter's)."""
        prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
        stages = range(model.config.num_encoder_blocks)
        return ([f"{prefix}{self.layers}.{s}.patch_embeddings.proj" for s in stages if s],
                [f"decode_head.linear_projections.{s}.proj" for s in stages] if hasattr(model, "decode_head") else [])

    def default_seq_len(self, config, image_size: ImageSize | None = None) -> int:
        """Tokens of the first stage's map; later stages hold fewer, see `head_macs`."""
        height, width = stage_grids(config, self.image_size(config, image_size))[0]
        return height * width

    def _layer_tokens(self, seq_len: float, config, layer: int, image_size: ImageSize | None) -> tuple[int, int, int]:
        """(tokens of layer `layer`'s map, tokens its keys and values run on, its reduction ratio)."""
        size = self.image_size(config, image_size)
        if seq_len != self.default_seq_len(config, size):
            raise ValueError(
                f"seq_len={seq_len}: a SegFormer's token counts follow its image size, {self.default_seq_len(config, size)} "
                f"tokens in the first stage of a {size[0]}x{size[1]} image. Leave seq_len unset (count_macs(model, "
                "image_size=(height, width)) counts at another size)."
            )
        stage = _stage_of(config, layer)
        height, width = stage_grids(config, size)[stage]
        ratio = config.sr_ratios[stage]
        reduced = (height // ratio) * (width // ratio) if ratio > 1 else height * width
        return height * width, reduced, ratio

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        tokens, reduced, _ = self._layer_tokens(seq_len, config, layer, image_size)
        g = self.layer_geometry(config)[layer]
        return 2 * tokens * g.hidden * g.head_dim + 2 * reduced * g.hidden * g.head_dim + 2 * tokens * reduced * g.head_dim

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        tokens, _, _ = self._layer_tokens(seq_len, config, layer, image_size)
        return 2 * tokens * self.layer_geometry(config)[layer].hidden + 9 * tokens

    def fixed_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """Every stage's patch-embedding conv, and the spatial-reduction conv of each layer that keeps a head."""
        config = model.config
        total = 0
        size = self.image_size(config, image_size)
        for stage, grid in zip(get_submodule(model.base_model, self.layers), stage_grids(config, size)):
            conv = stage.patch_embeddings.proj
            total += grid[0] * grid[1] * conv.weight[0].numel() * conv.out_channels
        seq_len = self.default_seq_len(config, size)
        for i, layer in enumerate(self.layers_of(model)):
            if not isinstance(get_submodule(layer, self.attn_core), EmptyAttention):
                total += self.shared_attention_macs(seq_len, config, i, image_size=size)
        return total

    def shared_attention_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        """The spatial-reduction conv (ratio R: an R x R kernel, stride R, d -> d on the reduced map)."""
        _, reduced, ratio = self._layer_tokens(seq_len, config, layer, image_size)
        dim = self.layer_geometry(config)[layer].hidden
        return reduced * dim * ratio * ratio * dim if ratio > 1 else 0


SEGFORMER = SegformerAdapter(
    model_types=("segformer",),
    unit_names=("attention heads", "Mix-FFN channels"),
    fixed_parts="the patch embeddings and the spatial-reduction convs",
    layers="stages",
    **VISION_LAYER_PATHS,
    feature="",
    patch_embedding="stages.0.patch_embeddings.proj",
    num_prefix_tokens=0,
    pooled_tokens=0,
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    chained_layers=False,  # stage norms and patch embeddings between stages, a decode head on every stage
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True, allocation="refit"),  # no token mode
)
