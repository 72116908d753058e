"""ConvNeXt (image classification): the hidden channels of each block's pointwise MLP.

A block is one layer with no heads and `4·dim` neurons: a neuron owns its pwconv1 row and its
pwconv2 column (Linear layers on the channels-last map, so the standard FFN geometry applies).
The depthwise conv, the LayerNorm and the layer scale (it scales the output) stay. The MD
feature is each block's output map [B, C, H, W], read as H*W tokens of C features.

MACs (`count_macs`, what torch's FLOP counter sees in the encoder): per neuron 2·C·H·W. Fixed:
the patchify stem, each stage's downsampling conv and every block's 7x7 depthwise conv
(49·C·H·W). Not counted: LayerNorms, GELUs, layer scales, biases, the residual additions, the
final pooling, LayerNorm and classifier. Token counts follow `config.image_size`.

Scoring runs on the reference engine (no layer pieces for the fast one); reconstruction is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .base import ArchAdapter, LayerGeometry, get_submodule
from .capabilities import Capabilities
from .resnet import conv_out, image_size


def stage_maps(config) -> list[tuple[int, int]]:
    """Each stage's map (height, width): the stem patchifies, every later stage halves it."""
    size = conv_out(image_size(config), config.patch_size, config.patch_size, 0)
    maps = [size]
    for _ in config.depths[1:]:
        size = conv_out(size, 2, 2, 0)
        maps.append(size)
    return maps


def _layer_maps(config) -> list[tuple[int, tuple[int, int]]]:
    """(channels, map) of every block in order."""
    return [
        (width, size)
        for width, depth, size in zip(config.hidden_sizes, config.depths, stage_maps(config))
        for _ in range(depth)
    ]


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

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        return tuple(LayerGeometry(0, 1, width, 4 * width) for width, _ in _layer_maps(config))

    def default_seq_len(self, config) -> int:
        """Positions of the first stage's map; later stages hold fewer (see `neuron_macs`)."""
        return math.prod(stage_maps(config)[0])

    def _layer(self, seq_len: float, config, layer: int) -> tuple[int, tuple[int, int]]:
        if seq_len != self.default_seq_len(config):
            raise ValueError(
                f"seq_len={seq_len}: a ConvNeXt's map sizes follow its image size ({image_size(config)}), "
                f"{self.default_seq_len(config)} positions in the first stage. Leave seq_len unset."
            )
        return _layer_maps(config)[layer]

    def head_macs(self, seq_len: float, config, layer: int = 0) -> float:
        return 0.0

    def neuron_macs(self, seq_len: float, config, layer: int = 0) -> float:
        width, size = self._layer(seq_len, config, layer)
        return 2 * width * math.prod(size)

    def fixed_macs(self, model: nn.Module) -> int:
        """The stem, the downsampling convs and the depthwise convs."""
        config = model.config
        maps, widths = stage_maps(config), config.hidden_sizes
        total = math.prod(maps[0]) * config.num_channels * config.patch_size**2 * widths[0]
        total += sum(math.prod(size) * widths[s] * 4 * widths[s + 1] for s, size in enumerate(maps[1:]))
        return total + sum(49 * width * math.prod(size) for width, size in _layer_maps(config))


CONVNEXT = ConvNextAdapter(
    model_types=("convnext",),
    unit_names=("heads", "MLP channels"),
    fixed_parts="the stem, the downsampling convs and the 7x7 depthwise convs",
    layers="encoder.stages",
    ffn_up="pwconv1",
    ffn_down="pwconv2",
    ffn_input="layernorm",
    feature="",
    patch_embedding="embeddings.patch_embeddings",
    num_prefix_tokens=0,
    pooled_tokens=0,
    capabilities=Capabilities(heads=False),  # MLP channels only, reference engine, no repair
)
