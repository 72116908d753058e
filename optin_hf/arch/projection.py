"""The projection contract: what a unit owns in a projection's weight, read the same way for
every module kind, so slimming, magnitude scoring, the fast engine and the refit never assume
`nn.Linear` with a bias or one weight orientation.

- A `Slice` names the features a unit owns in one projection: output or input features, `width`
  per unit, in each of `segments` equal blocks of the feature axis (a fused q|k|v weight:
  GPT-2's `c_attn` has 3, and a head owns its `width` features in each). Grouped-query attention
  and gated FFNs are more slices of the same kind: a KV group owns its query heads' rows
  (width g·dh) and its key and value rows (width dh); a gated FFN unit its gate row, its up row
  and its down column.
- `feature_dim` is the weight dimension of a side: `nn.Linear` and convolutions hold
  [out, in, ...], transformers' `Conv1D` holds [in, out].
- `Projection` is an output projection as the refit sees it: its weight as an [out, in] matrix,
  its bias or None, and how its input rows line up with the rows of the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Side = Literal["out", "in"]


@dataclass(frozen=True)
class Slice:
    """The parameters each unit (head or FFN neuron) owns in one projection of a layer.

    path: the projection, relative to the layer. side: "out", its output features (a Linear's
    weight rows and bias, a `Conv1D`'s weight columns and bias, a conv's filters), or "in", its
    input features. width: features per unit, None = the head size for heads, 1 for FFN units.
    segments: equal blocks the feature axis is split into (3 for a fused q|k|v weight); a unit
    owns `width` features at the same place in each block.
    """

    path: str
    side: Side
    width: int | None = None
    segments: int = 1


def _check_module(module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, Conv1D, nn.Conv2d)):
        raise TypeError(
            f"optin-hf slices Linear, Conv1D and Conv2d projections, not {type(module).__name__}; give the adapter "
            "its own slim_heads / slim_neurons for this module."
        )


def feature_dim(module: nn.Module, side: Side) -> int:
    """The weight dimension of a side: Linear and conv weights are [out, in, ...], Conv1D ones [in, out]."""
    _check_module(module)
    if isinstance(module, Conv1D):
        return 1 if side == "out" else 0
    return 0 if side == "out" else 1


def num_features(module: nn.Module, side: Side) -> int:
    """Output or input features of a Linear, a Conv1D or a conv (its channels)."""
    return module.weight.shape[feature_dim(module, side)]


def unit_features(keep: torch.Tensor, width: int, segments: int = 1, total: int = 0) -> torch.Tensor:
    """The feature indices of units `keep` (sorted) that own `width` consecutive features in each of
    `segments` blocks of a `total`-wide axis (`total` is needed only when segments > 1)."""
    within = (keep[:, None] * width + torch.arange(width, device=keep.device)).flatten()
    if segments == 1:
        return within
    block = total // segments
    return (torch.arange(segments, device=keep.device)[:, None] * block + within[None, :]).flatten()


def slice_features(module: nn.Module, part: Slice, keep: torch.Tensor, default_width: int) -> torch.Tensor:
    """The features of `module` that units `keep` own under `part`."""
    return unit_features(keep, part.width or default_width, part.segments, num_features(module, part.side))


def select_features(module: nn.Module, index: torch.Tensor, side: Side) -> nn.Module:
    """A new Linear, Conv1D or Conv2d keeping only output or input features `index`; a grouped
    (depthwise) conv keeps its channels on both sides."""
    dim = feature_dim(module, side)
    weight = module.weight
    index = index.to(weight.device)
    kept = weight.detach().index_select(dim, index).clone()
    if isinstance(module, nn.Linear):
        # A 1x1 meta Linear re-dimensioned: no wasted (or zero-size, warning) random init.
        new = nn.Linear(1, 1, bias=module.bias is not None, device="meta")
        new.out_features, new.in_features = kept.shape
    elif isinstance(module, Conv1D):
        new = Conv1D(1, 1)
        new.nx, new.nf = kept.shape
    else:
        new = _sliced_conv(module, len(index), side)
    new.weight = nn.Parameter(kept, requires_grad=weight.requires_grad)
    if module.bias is not None:
        bias = module.bias.detach()
        bias = bias.index_select(0, index) if side == "out" or getattr(new, "groups", 1) > 1 else bias
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    return new


def _sliced_conv(conv: nn.Conv2d, count: int, side: Side) -> nn.Conv2d:
    """A meta Conv2d like `conv` with `count` output (or input) channels; a depthwise conv's groups follow."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    new = nn.Conv2d(1, 1, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device="meta")
    if depthwise:
        new.in_channels = new.out_channels = new.groups = count
    elif side == "out":
        new.in_channels, new.out_channels = conv.in_channels, count
    else:
        new.in_channels, new.out_channels = count, conv.out_channels
    return new


def owned_norms(module: nn.Module, part: Slice, units: int, default_width: int) -> torch.Tensor:
    """[units]: the squared L2 norm of the weights each unit owns in `module` under `part`
    (its rows or columns in every segment; biases left out)."""
    weight = module.weight.detach().double().movedim(feature_dim(module, part.side), 0)
    per_feature = weight.pow(2).flatten(1).sum(1)
    width = part.width or default_width
    return per_feature.view(part.segments, -1)[:, : units * width].reshape(part.segments, units, width).sum((0, 2))


@dataclass
class Projection:
    """An output projection (attention output, FFN down) as the refit reads and writes it.

    `module` is a Linear, a Conv1D or a 1x1 Conv2d; its bias may be absent (a model without
    biases keeps none after a refit: the fit has no constant column then).
    """

    module: nn.Module

    def __post_init__(self) -> None:
        _check_module(self.module)
        if isinstance(self.module, nn.Conv2d) and (self.module.kernel_size != (1, 1) or self.module.groups != 1):
            raise TypeError(f"a refit projection must be pointwise; {self.module} is not a 1x1 conv")

    @property
    def in_features(self) -> int:
        return num_features(self.module, "in")

    @property
    def out_features(self) -> int:
        return num_features(self.module, "out")

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is the projection's output, where the refit and the fast engine read it
        (a BatchNorm after the conv, where the projection includes one)."""
        return self.module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The projection's output on its input `x`."""
        return self.module(x)

    def weight(self) -> torch.Tensor:
        """[out, in]."""
        weight = self.module.weight.detach()
        if isinstance(self.module, Conv1D):
            return weight.T
        return weight.flatten(1)

    def bias(self) -> torch.Tensor | None:
        return None if self.module.bias is None else self.module.bias.detach()

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write an [out, in] weight (and the bias, where the module has one) back in the module's own layout."""
        old = self.module.weight
        if isinstance(self.module, Conv1D):
            weight = weight.T
        weight = weight.reshape(old.shape).to(old.dtype).contiguous()
        self.module.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
        if bias is not None and self.module.bias is not None:
            self.module.bias = nn.Parameter(bias.to(self.module.bias.dtype), requires_grad=self.module.bias.requires_grad)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The projection's input (or output) as [positions, features]: a conv's channels are its dimension 1."""
        if isinstance(self.module, nn.Conv2d):
            x = x.movedim(1, -1)
        return x.reshape(x.shape[:-1].numel(), x.shape[-1])

    def unrows(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[positions, features] rows back into a tensor of `shape`, the layout `rows` read them from."""
        if isinstance(self.module, nn.Conv2d):
            return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        return rows.reshape(shape)
