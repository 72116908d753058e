"""Swin (image classification): four stages of window-attention layers, each stage twice as
wide as the one before on a quarter of the tokens, so layers differ in heads, hidden size,
FFN width and tokens.

A head owns its q/k/v rows, its output-projection columns and its column of the relative
position bias table; an MLP neuron its fc1 row and fc2 column. Window attention, the shifted
windows and patch merging stay as they are. The MD feature is each layer's output.

MACs (`count_macs`, what torch's FLOP counter sees in the encoder with eager attention) at the
image size of the calibration images (or `count_macs`'s `image_size`, else `config.image_size`): per head
of a layer with hidden d, head size dh, window w (the configured one, or the feature map's side
where that is smaller) on a map padded to whole windows of Np tokens: 3·Np·d·dh (q, k, v) +
2·Np·w²·dh (scores and context within each window) + Np·dh·d (output columns); per neuron
2·N·d on the map's N tokens. Fixed: the patch embedding conv and each patch merging's
reduction, (N/4)·4d·2d. Not counted: LayerNorms, the relative-position bias and shift-mask
additions, the average pooling and the classifier.

The layer pieces run a layer from its heads' output on: the attention output projection runs on
the rows of the shifted windows (the map padded to whole windows), which the pieces put back in
token order (`token_order`: reverse the windows and the shift, drop the padding) before the
residual adds them. The layers do not chain (a patch merging ends each stage but the last), so
the fast engine and the refit run the model's own forward around the layers they replay
(`ArchAdapter.chained_layers`). The refits pair each token's attention-output row with its
residual through `token_order`. Token mode is refused (a merged token has no place in a window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import VISION_LAYER_PATHS, ArchAdapter, ImageSize, LayerGeometry, get_submodule, pair
from .capabilities import Capabilities


def _token_order(layer: nn.Module, rows: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                 **kwargs) -> torch.Tensor:
    """rows [batch * windows, window², features], as a SwinLayer runs its attention (its map padded to whole
    windows, cyclically shifted, cut into windows), back in token order: [batch, height * width, features]."""
    if not always_partition:  # as the layer does: a window larger than the map shrinks to it, unshifted
        layer.set_shift_and_window_size(input_dimensions)
    (height, width), window, features = input_dimensions, int(layer.window_size), rows.shape[-1]
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    # the batch given, not -1: the rows of a layer that keeps no head have 0 features
    batch = rows.shape[0] // ((padded_h // window) * (padded_w // window))
    grid = rows.reshape(batch, padded_h // window, padded_w // window, window, window, features)
    grid = layer.cyclic_shift(grid.transpose(2, 3).reshape(batch, padded_h, padded_w, features), reverse=True)
    return grid[:, :height, :width].reshape(batch, height * width, features)


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    attention = _token_order(layer, layer.dropout(layer.attention.o_proj(heads)), *args, **kwargs)
    return layer_input + layer.drop_path(attention)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.dropout(layer.mlp(layer.layernorm_after(hidden))) + hidden


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.dropout(down) + hidden  # the MLP ends with fc2


def stage_grids(config, image_size: ImageSize) -> list[tuple[int, int]]:
    """Each stage's feature map (height, width) in patches on an `image_size` image: the patch
    embedding pads the image to whole patches, each patch merging pads to even sides and halves them."""
    (image_h, image_w), (patch_h, patch_w) = image_size, pair(config.patch_size)
    grid = (math.ceil(image_h / patch_h), math.ceil(image_w / patch_w))
    grids = []
    for _ in config.depths:
        grids.append(grid)
        grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    return grids


@dataclass(frozen=True)
class SwinAdapter(ArchAdapter):
    """Swin's layers are its stages' blocks, in order; see the module docstring for the geometry."""

    def swin_config(self, config):
        """The SwinConfig that describes the layers (a model that holds Swin as its backbone overrides this)."""
        return config

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return nn.ModuleList([block for stage in get_submodule(model.base_model, self.layers) for block in stage.blocks])

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        config = self.swin_config(config)
        geometry: list[LayerGeometry] = []
        for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
            dim = config.embed_dim * 2**stage
            geometry += [LayerGeometry(heads, dim // heads, dim, int(config.mlp_ratio * dim))] * depth
        return tuple(geometry)

    def layer_head_dim(self, layer: nn.Module, config) -> int:
        return get_submodule(layer, self.attn_core).head_dim

    def token_order(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The windows' rows back in token order, the padding dropped (see `_token_order`)."""
        return _token_order(layer, x, *args, **kwargs)

    def slim_heads(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        """Also keep only the kept heads' columns of the relative position bias table ([positions, heads])."""
        if len(keep):
            bias = get_submodule(layer, self.attn_core).relative_position_bias
            table = bias.relative_position_bias_table
            kept = table.detach().index_select(1, keep.to(table.device)).clone()
            bias.relative_position_bias_table = nn.Parameter(kept, requires_grad=table.requires_grad)
        super().slim_heads(layer, keep, config)

    def image_size(self, config, given=None) -> ImageSize:
        """The Swin config's `image_size` where none is given (a backbone's, for a model around one)."""
        return super().image_size(self.swin_config(config), given)

    def default_seq_len(self, config, image_size: ImageSize | None = None) -> int:
        """Patches of the first stage (no class token); later stages hold fewer, see `head_macs`."""
        height, width = stage_grids(self.swin_config(config), self.image_size(config, image_size))[0]
        return height * width

    def _layer_tokens(self, seq_len: float, config, layer: int, image_size: ImageSize | None) -> tuple[int, int, int]:
        """(tokens, tokens padded to whole windows, window side) of layer `layer`."""
        size = self.image_size(config, image_size)
        if seq_len != self.default_seq_len(config, size):
            raise ValueError(
                f"seq_len={seq_len}: a Swin model's token counts follow its image size, {self.default_seq_len(config, size)} "
                f"patches in the first stage of a {size[0]}x{size[1]} image. Leave seq_len unset (count_macs(model, "
                "image_size=(height, width)) counts at another size)."
            )
        swin = self.swin_config(config)
        stage = next(s for s, end in enumerate(torch.tensor(swin.depths).cumsum(0).tolist()) if layer < end)
        height, width = stage_grids(swin, size)[stage]
        window = self.window_side(swin, height, width)
        padded = math.ceil(height / window) * window * math.ceil(width / window) * window
        return height * width, padded, window

    def window_side(self, swin_config, height: int, width: int) -> int:
        """Side of the attention windows on a height x width map: SwinLayer shrinks a window larger than the map."""
        return min(swin_config.window_size, height, width)

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        _, padded, window = self._layer_tokens(seq_len, config, layer, image_size)
        g = self.layer_geometry(config)[layer]
        return 4 * padded * g.hidden * g.head_dim + 2 * padded * window * window * g.head_dim

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        tokens, _, _ = self._layer_tokens(seq_len, config, layer, image_size)
        return 2 * tokens * self.layer_geometry(config)[layer].hidden

    def patch_embedding_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        conv = get_submodule(model.base_model, self.patch_embedding)
        return self.default_seq_len(model.config, image_size) * conv.weight[0].numel() * conv.out_channels

    def fixed_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """The patch embedding and every patch merging's reduction (4d -> 2d on the merged map's tokens)."""
        config = self.swin_config(model.config)
        grids = stage_grids(config, self.image_size(model.config, image_size))
        total = self.patch_embedding_macs(model, image_size)
        for stage, (height, width) in enumerate(grids[1:]):
            dim = config.embed_dim * 2**stage
            total += height * width * 4 * dim * 2 * dim
        return total


SWIN = SwinAdapter(
    model_types=("swin",),
    layers="encoder.layers",
    **VISION_LAYER_PATHS,
    feature="",
    patch_embedding="embeddings.patch_embeddings.projection",
    num_prefix_tokens=0,
    pooled_tokens=0,
    fixed_parts="the patch embedding and the patch mergings",
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    chained_layers=False,  # patch mergings between stages: see the module docstring
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True),  # no token mode
)
