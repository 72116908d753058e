"""ConvNeXt (image classification): the hidden channels of each block's pointwise MLP.

A block is one layer with no heads and `4·dim` neurons: a neuron owns its pwconv1 row and its
pwconv2 column (Linear layers on the channels-last map, so the standard FFN geometry applies).
The depthwise conv, the LayerNorm and the layer scale (it scales the output) stay. The MD
feature is each block's output map [B, C, H, W], read as H*W tokens of C features.

MACs (`count_macs`, what torch's FLOP counter sees in the encoder): per neuron 2·C·H·W. Fixed:
the patchify stem, each stage's downsampling conv and every block's 7x7 depthwise conv
(49·C·H·W). Not counted: LayerNorms, GELUs, layer scales, biases, the residual additions, the
final pooling, LayerNorm and classifier. Map sizes follow the calibration images' size (or
`count_macs`'s `image_size`, else `config.image_size`).

The block's input is its FFN input and the residual its MLP adds to, so the layer pieces are the
standard ones, on channels-first maps around a channels-last MLP: the fast engine starts a neuron's
run from pwconv2's output, and the least-squares refit (`reconstruct="weights"` / `"scales"`) fits
pwconv2 with its layer scale (`branch_scale`) to the dense block's output, the rows of the
channels-first stream read as the Linear's channels-last rows (`stream_rows`). A stage's
downsampling runs between its first block and the block before, so the layers do not chain
(`chained_layers=False`: runs finish with the model's own forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import ArchAdapter, ImageSize, LayerGeometry, get_submodule
from .capabilities import Capabilities
from .resnet import conv_out


def stage_maps(config, image_size: ImageSize) -> list[tuple[int, int]]:
    """Each stage's map (height, width) on an `image_size` image: the stem patchifies, every later stage halves it."""
    size = conv_out(image_size, config.patch_size, config.patch_size, 0)
    maps = [size]
    for _ in config.depths[1:]:
        size = conv_out(size, 2, 2, 0)
        maps.append(size)
    return maps


def _layer_maps(config, image_size: ImageSize) -> list[tuple[int, tuple[int, int]]]:
    """(channels, map) of every block in order."""
    return [
        (width, size)
        for width, depth, size in zip(config.hidden_sizes, config.depths, stage_maps(config, image_size))
        for _ in range(depth)
    ]


def _finish_attention(layer: nn.Module, heads: None, layer_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer_input  # no heads: the block input is the FFN input


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer(hidden)


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`down`: pwconv2's output, channels last."""
    if layer.layer_scale_parameter is not None:
        down = layer.layer_scale_parameter * down
    return hidden + layer.drop_path(down.permute(0, 3, 1, 2))


@dataclass(frozen=True)
class ConvNextAdapter(ArchAdapter):
    """Blocks in order, no heads (no attention fields); see the module docstring."""

    def check_config(self, config) -> None:
        """The stage lists must describe `num_stages` stages: the encoder builds that many, and its final
        LayerNorm reads hidden_sizes[-1], so a longer list gives a model that cannot run."""
        lengths = {"hidden_sizes": len(config.hidden_sizes), "depths": len(config.depths)}
        if any(n != config.num_stages for n in lengths.values()):
            raise ValueError(
                f"This ConvNeXt config has num_stages={config.num_stages} but "
                f"{' and '.join(f'{len(getattr(config, k))} {k}' for k in lengths)}: give hidden_sizes and depths "
                "one entry per stage (num_stages of them)."
            )

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        stages = get_submodule(model.base_model, self.layers)
        return nn.ModuleList([block for stage in stages for block in stage.layers])

    def stream_rows(self, layer: nn.Module, sublayer: str, x: torch.Tensor) -> torch.Tensor:
        """A [B, C, H, W] map as the B·H·W rows of C channels that pwconv2 reads and writes channels last."""
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    def branch_scale(self, layer: nn.Module, sublayer: str) -> torch.Tensor | None:
        scale = layer.layer_scale_parameter
        return None if scale is None else scale.detach()

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        return tuple(LayerGeometry(0, 1, width, 4 * width)
                     for width, depth in zip(config.hidden_sizes, config.depths) for _ in range(depth))

    def default_seq_len(self, config, image_size: ImageSize | None = None) -> int:
        """Positions of the first stage's map; later stages hold fewer (see `neuron_macs`)."""
        return math.prod(stage_maps(config, self.image_size(config, image_size))[0])

    def _layer(self, seq_len: float, config, layer: int, image_size: ImageSize | None) -> tuple[int, tuple[int, int]]:
        size = self.image_size(config, image_size)
        if seq_len != self.default_seq_len(config, size):
            raise ValueError(
                f"seq_len={seq_len}: a ConvNeXt's map sizes follow its image size ({size[0]}x{size[1]}), "
                f"{self.default_seq_len(config, size)} positions in the first stage. Leave seq_len unset "
                "(count_macs(model, image_size=(height, width)) counts at another size)."
            )
        return _layer_maps(config, size)[layer]

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        return 0.0

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        width, size = self._layer(seq_len, config, layer, image_size)
        return 2 * width * math.prod(size)

    def fixed_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """The stem, the downsampling convs and the depthwise convs."""
        config = model.config
        image = self.image_size(config, image_size)
        maps, widths = stage_maps(config, image), config.hidden_sizes
        total = math.prod(maps[0]) * config.num_channels * config.patch_size**2 * widths[0]
        total += sum(math.prod(size) * widths[s] * 4 * widths[s + 1] for s, size in enumerate(maps[1:]))
        return total + sum(49 * width * math.prod(size) for width, size in _layer_maps(config, image))


CONVNEXT = ConvNextAdapter(
    model_types=("convnext",),
    unit_names=("heads", "MLP channels"),
    fixed_parts="the stem, the downsampling convs and the 7x7 depthwise convs",
    layers="encoder.stages",
    ffn_up="pwconv1",
    ffn_down="pwconv2",
    ffn_input="dwconv",
    feature="",
    patch_embedding="embeddings.patch_embeddings",
    num_prefix_tokens=0,
    pooled_tokens=0,
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    chained_layers=False,  # a stage's downsampling runs between its first block and the block before
    capabilities=Capabilities(heads=False, fast_engine=True, repairs=("weights", "scales"), inputs=True, allocation="refit"),  # MLP channels only
)
