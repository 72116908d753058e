"""ResNet (image classification, bottleneck blocks): the inner channels of each block.

A block is one layer. Its "heads" are the 1x1 reduce conv's output channels (heads one channel
wide): a head owns its conv filter, its BatchNorm channel and its input slice of the 3x3 conv.
Its "neurons" are the 3x3 conv's output channels, which feed the block's last 1x1 conv as FFN
neurons feed the down projection: a neuron owns its 3x3 filter, its BatchNorm channel and its
input slice of the last conv. So `prune_heads` / `prune_neurons` keep their meaning: which
channels go in, which come out of the block's middle. The block's output width stays (the
residual needs it). Basic blocks (resnet-18/34) are refused. The MD feature is each block's
output map [B, C, H, W], read as H*W tokens of C features; removing a channel is masked by
zeroing its input slice of the next conv, which is exactly what slimming it gives.

MACs (`count_macs`, what torch's FLOP counter sees in the encoder): per head C_in·H1·W1 (its
1x1 filter on the map after the reduce conv's stride), per neuron C_out·H2·W2 (its column of the
last conv), per (head, neuron) pair 9·H2·W2 (the 3x3 conv: `pair_macs`). Fixed: the stem conv
and the shortcut projections. Not counted: BatchNorms, ReLUs, the max and average pooling,
the residual additions and the classifier. Map sizes follow the image size: the calibration
images' (a ResNet config states none; `count_macs(model, image_size=...)` counts a dense model).

Coupled residual channels (`OptinConfig.prune_channels`; the default, None, turns them on where the settings allow,
`channel_search.channels_by_default`): a stage's residual width
is tied by its residual adds, so channel c of it is one unit in every block output of the stage, the
shortcut conv and last conv (with their BatchNorms) that write it, and every reduce conv, next shortcut
conv and the classifier that read it; the stem's output is one more group, tied to the first stage's where
that stage adds it as it is (`channel_groups`). `slim_channels` cuts a channel from all of them, and the
MAC formulas take the kept widths (`channels=`): a head costs per kept input channel, a neuron per kept
output channel, the stem per kept filter and a shortcut conv per kept (input, output) pair. Scored by the
run that zeroes the channel in every output that carries it (`channel_carriers`,
`optin_hf.importance.residual_channels`); the allocation is `optin_hf.channel_search`. The convs that read a cut
residual stream (`channel_readers`: each block's reduce conv and projection shortcut) and the classifier are refit
by least squares (`optin_hf.reconstruct`): with the BatchNorm means alone, cutting residual widths lost accuracy on
both digits ResNets' development folds; with that refit, the wide-stem ResNet (44% of its MACs fixed) kept its dense
accuracy down to 0.5 of the MACs (benchmarks/resnet_channel_refit.py). digits-resnet's recipe keeps its refit
allocation, which runs without them, and refits those convs and the classifier with the widths kept
(`OptinConfig.reconstruct_readers`).

The fast engine runs a block in pieces. The heads' output (the 3x3 conv's input) is finished into the
FFN input, which carries two maps stacked along the channels: the 3x3 conv layer's output (the last
conv's input) and the shortcut's output (the residual the branch adds to, computed from the block
input), both on the block's output map. The last 1x1 conv and its BatchNorm are one affine map
(`ConvBatchNorm`): the FFN's down projection, whose output the fast engine adjusts per variant.

The least-squares refit (`reconstruct="weights"` / `"scales"`) fits that affine map to the dense
block's pre-activation sum (its output plus the shortcut's) from the slim block's own inputs, with
the slim shortcut's output as the residual (`ffn_residual`); the refit weights are written back into
the conv and the BatchNorm. `reconstruct="weights"` refits each block's 3x3 conv first (`refit_conv`).
A BatchNorm and a ReLU follow it before any sum, so it is no output projection (`refit_sublayers`),
but its own output is linear in its weights: it is fit by least squares from the 3x3 patches of the
slim block's input to the dense 3x3 conv's output at the channels it keeps
(`ChannelConv.kept_outputs`), its bias folded into its BatchNorm's running mean. A cut of the reduce
channels reaches the sum only through that conv, which the last conv's refit cannot undo
(`benchmarks/resnet_block_refit.py`). `reconstruct="batchnorm"`, the default repair (`"auto"`) where the residual
widths stay (where they are cut, "auto" is the refit), re-estimates the
running means of the BatchNorms after the pruned convs instead (`optin_hf.reconstruct`): on a
development split of digits-resnet it kept more accuracy at 0.6 and 0.5 of the MACs than the refit,
whose closer features (a lower squared error of the pooled features, on held-out images too) did
not give better classes (`benchmarks/cnn_repair_dev.py`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import ArchAdapter, ImageSize, LayerGeometry, get_submodule, set_submodule
from .capabilities import Capabilities
from .projection import Projection

def conv_out(size: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)


@dataclass(frozen=True)
class Block:
    """One bottleneck's widths and maps: reduce/mid channels `inner`, the map after the reduce conv
    (`reduced`) and after the 3x3 conv (`out_map`), and whether it has a projection shortcut."""

    in_channels: int
    out_channels: int
    inner: int
    reduced: tuple[int, int]
    out_map: tuple[int, int]
    shortcut: bool


def _check_bottleneck(config) -> None:
    if config.layer_type != "bottleneck":
        raise ValueError(
            f"ResNet layer_type={config.layer_type!r} (resnet-18/34 style) is not supported: optin-hf prunes the "
            "inner channels of bottleneck blocks (layer_type='bottleneck', e.g. microsoft/resnet-50)."
        )


def _stride(config, stage: int) -> int:
    """The stride of a stage's first block (the others run at 1)."""
    return 2 if stage or config.downsample_in_first_stage else 1


def channel_groups(config) -> list[int]:
    """The channel group of each residual site: the stem's output (site 0), then each stage's width (site s + 1).
    A stage whose first block adds its input as it is (an identity shortcut: same width, stride 1) is tied to the
    site before it, so both are one group."""
    _check_bottleneck(config)
    groups, previous = [0], config.embedding_size
    for stage, width in enumerate(config.hidden_sizes):
        identity = width == previous and _stride(config, stage) == 1
        groups.append(groups[-1] if identity else groups[-1] + 1)
        previous = width
    return groups


def blocks(config, image_size: ImageSize, channels: tuple[int, ...] | None = None) -> list[Block]:
    """Every bottleneck block of the encoder in order, with the map sizes it runs at on an `image_size` image;
    `channels`: the residual width of each channel group (`channel_groups`; None: the config's)."""
    _check_bottleneck(config)
    groups = channel_groups(config)
    widths = [config.embedding_size, *config.hidden_sizes]
    if channels is not None:
        widths = [channels[group] for group in groups]
    size = conv_out(image_size, 7, 2, 3)  # the stem conv
    size = conv_out(size, 3, 2, 1)  # its max pooling
    out, previous = [], widths[0]
    for stage, (width, inner, depth) in enumerate(zip(widths[1:], config.hidden_sizes, config.depths)):
        for j in range(depth):
            stride = _stride(config, stage) if j == 0 else 1
            reduced = conv_out(size, 1, stride if config.downsample_in_bottleneck else 1, 0)
            out_map = conv_out(size, 1, stride, 0)
            shortcut = j == 0 and groups[stage] != groups[stage + 1]
            out.append(Block(previous, width, inner // 4, reduced, out_map, shortcut))
            previous, size = width, out_map
    return out


def stem_macs(config, image_size: ImageSize, channels: int) -> int:
    """The stem conv (7x7, stride 2) with `channels` filters."""
    return math.prod(conv_out(image_size, 7, 2, 3)) * config.num_channels * 49 * channels


class ChannelConv(nn.Conv2d):
    """A Conv2d that also runs with no input or no output channel, as a slim block may keep: torch's
    conv fails with no filter and returns no channel for no input, where the conv gives zeros.
    `kept_outputs`: the dense conv's output channels it keeps (a plain attribute: the refit pairs them with the
    dense conv's; a checkpoint does not need it)."""

    kept_outputs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels and self.out_channels:
            return super().forward(x)
        size = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                for s, k, st, p, d in zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)]
        return x.new_zeros(x.shape[0], self.out_channels, *size)


class ChannelBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d that also runs with no channel (torch's fails), for a conv that keeps no filter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.num_features else x


def _select(tensor: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    return tensor.detach().index_select(dim, keep.to(tensor.device)).clone()


def _sliced_conv(conv: nn.Conv2d, keep: torch.Tensor, side: int) -> ChannelConv:
    """A ChannelConv keeping output (side 0) or input (side 1) channels `keep` of `conv` (no bias: ResNet's have none)."""
    weight = _select(conv.weight, side, keep)
    new = ChannelConv(1, 1, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False, device="meta")
    new.out_channels, new.in_channels = weight.shape[:2]
    new.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    before = kept_outputs(conv)
    new.kept_outputs = before if side == 1 else before[keep.to(before.device)]
    return new


def kept_outputs(conv: nn.Conv2d) -> torch.Tensor:
    """The dense conv's output channels that `conv` (dense, or sliced from it) computes, in its order."""
    kept = getattr(conv, "kept_outputs", None)
    return torch.arange(conv.out_channels) if kept is None else kept


def _slim_channels(block: nn.Module, producer: str, consumer: str, keep: torch.Tensor) -> None:
    """Keep channels `keep` of conv layer `producer` (its conv's filters and its BatchNorm) and the
    matching input channels of conv `consumer`, in place."""
    _slim_outputs(get_submodule(block, producer), keep)
    set_submodule(block, consumer, _sliced_conv(get_submodule(block, consumer), keep, 1))


def _slim_outputs(conv_layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep output channels `keep` of a conv layer or a shortcut (its `convolution` and `normalization`), in place."""
    conv_layer.convolution = _sliced_conv(conv_layer.convolution, keep, 0)
    norm = conv_layer.normalization
    new = ChannelBatchNorm(1, norm.eps, norm.momentum, device="meta")
    new.num_features = len(keep)
    for name in ("weight", "bias"):
        param = getattr(norm, name)
        setattr(new, name, nn.Parameter(_select(param, 0, keep), requires_grad=param.requires_grad))
    new.running_mean, new.running_var = _select(norm.running_mean, 0, keep), _select(norm.running_var, 0, keep)
    new.num_batches_tracked = norm.num_batches_tracked.clone()
    new.train(norm.training)
    conv_layer.normalization = new


def _slim_inputs(module: nn.Module, path: str, keep: torch.Tensor) -> None:
    """Keep input channels `keep` of the conv at `path` of `module`, in place."""
    set_submodule(module, path, _sliced_conv(get_submodule(module, path), keep, 1))


@dataclass
class ConvBatchNorm(Projection):
    """A 1x1 conv and the eval-mode BatchNorm after it as one affine map, the way the refit reads them:
    weight γ/σ·W, bias β − γμ/σ (σ = √(running_var + eps)). `set` writes the weight into the conv and
    leaves the BatchNorm a plain bias (γ = σ, μ = 0, β = the bias), so the pair computes the new map
    in its own modules and a reload needs nothing else."""

    norm: nn.BatchNorm2d

    def _sigma(self) -> torch.Tensor:
        return (self.norm.running_var.detach().double() + self.norm.eps).sqrt()

    @property
    def has_bias(self) -> bool:
        return True

    @property
    def output_module(self) -> nn.Module:
        return self.norm

    def weight(self) -> torch.Tensor:
        conv = super().weight()
        return (conv.double() * (self.norm.weight.detach().double() / self._sigma())[:, None]).to(conv.dtype)

    def bias(self) -> torch.Tensor:
        norm = self.norm
        shift = norm.weight.detach().double() * norm.running_mean.double() / self._sigma()
        return (norm.bias.detach().double() - shift).to(norm.bias.dtype)

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write an [out, in] weight and the bias (None: the current one) into the conv and the BatchNorm."""
        bias = self.bias() if bias is None else bias
        super().set(weight, None)  # the conv has no bias
        norm = self.norm
        norm.weight = nn.Parameter(self._sigma().to(norm.weight.dtype), requires_grad=norm.weight.requires_grad)
        norm.bias = nn.Parameter(bias.to(norm.bias.dtype).clone(), requires_grad=norm.bias.requires_grad)
        norm.running_mean.zero_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.module(x))


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The FFN input: the 3x3 conv layer's output with the shortcut's output stacked behind its channels."""
    return torch.cat([layer.layer[1](heads), layer.shortcut(layer_input)], dim=1)


def _split(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last conv's input, the residual) of a `_finish_attention` output."""
    inner = layer.layer[2].convolution.in_channels
    return hidden[:, :inner], hidden[:, inner:]


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    inner, residual = _split(layer, hidden)
    return layer.activation(layer.layer[2](inner) + residual)


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`down`: the last conv's output after its BatchNorm (`ConvBatchNorm`, the down projection)."""
    return layer.activation(down + _split(layer, hidden)[1])


def _pooled_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.base_model.pooler(hidden))


@dataclass(frozen=True)
class ResNetAdapter(ArchAdapter):
    """Bottleneck blocks in order; see the module docstring for the geometry."""

    def check_config(self, config) -> None:
        _check_bottleneck(config)

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        stages = get_submodule(model.base_model, self.layers)
        return nn.ModuleList([block for stage in stages for block in stage.layers])

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        _check_bottleneck(config)
        return tuple(LayerGeometry(width // 4, 1, width, width // 4)
                     for width, depth in zip(config.hidden_sizes, config.depths) for _ in range(depth))

    def layer_head_dim(self, layer: nn.Module, config) -> int:
        return 1

    def kept_heads(self, layer: nn.Module, config) -> int:
        return get_submodule(layer, self.query).out_channels

    def kept_neurons(self, layer: nn.Module) -> int:
        return get_submodule(layer, self.ffn_up).convolution.out_channels

    def slim_heads(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        _slim_channels(layer, self.attn_core, self.attn_out, keep)

    def slim_neurons(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        _slim_channels(layer, self.ffn_up, self.ffn_down, keep)

    def projection(self, layer: nn.Module, sublayer: str) -> Projection:
        """The FFN down projection is the last 1x1 conv with its BatchNorm (`ConvBatchNorm`)."""
        if sublayer != "ffn_down":
            return super().projection(layer, sublayer)
        conv_layer = layer.layer[2]
        return ConvBatchNorm(conv_layer.convolution, conv_layer.normalization)

    @property
    def refit_sublayers(self) -> tuple[str, ...]:
        return ("ffn_down",)  # the 3x3 conv feeds a BatchNorm and a ReLU before any sum

    @property
    def refit_conv(self) -> str | None:
        return "layer.1"  # the 3x3 conv and its BatchNorm, fit to the dense conv's output (module docstring)

    def kept_conv_outputs(self, layer: nn.Module) -> torch.Tensor:
        return kept_outputs(layer.layer[1].convolution)

    def ffn_residual(self) -> tuple[str, str]:
        return "shortcut", "out"

    def unit_weight_norms(self, layer: nn.Module, config) -> tuple[torch.Tensor, torch.Tensor]:
        """A channel's filter and its input slice of the next conv (BatchNorm scales left out)."""

        def owned(producer: str, consumer: str) -> torch.Tensor:
            filters = get_submodule(layer, producer).convolution.weight.double()
            reads = get_submodule(layer, consumer).weight.double()
            return filters.pow(2).flatten(1).sum(1) + reads.pow(2).transpose(0, 1).flatten(1).sum(1)

        return owned(self.attn_core, self.attn_out), owned(self.ffn_up, self.ffn_down)

    def default_seq_len(self, config, image_size: ImageSize | None = None) -> int:
        """Positions of the first block's output map; later stages hold fewer (see `head_macs`)."""
        height, width = blocks(config, self.image_size(config, image_size))[0].out_map
        return height * width

    def _block(self, seq_len: float, config, layer: int, image_size: ImageSize | None,
               channels: tuple[int, ...] | None = None) -> Block:
        size = self.image_size(config, image_size)
        if seq_len != self.default_seq_len(config, size):
            raise ValueError(
                f"seq_len={seq_len}: a ResNet's map sizes follow its image size ({size[0]}x{size[1]}), "
                f"{self.default_seq_len(config, size)} positions in the first block. Leave seq_len unset "
                "(count_macs(model, image_size=(height, width)) counts at another size)."
            )
        return blocks(config, size, channels)[layer]

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None,
                  channels: tuple[int, ...] | None = None) -> float:
        """A reduce channel's 1x1 filter over the block's input width (`channels`: the groups' kept widths)."""
        block = self._block(seq_len, config, layer, image_size, channels)
        return block.in_channels * math.prod(block.reduced)

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None,
                    channels: tuple[int, ...] | None = None) -> float:
        """A 3x3 channel's column of the last conv, as wide as the block's output."""
        block = self._block(seq_len, config, layer, image_size, channels)
        return block.out_channels * math.prod(block.out_map)

    def pair_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None,
                  channels: tuple[int, ...] | None = None) -> float:
        return 9 * math.prod(self._block(seq_len, config, layer, image_size).out_map)

    def shared_attention_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None,
                              channels: tuple[int, ...] | None = None) -> float:
        return 0.0  # no attention

    def fixed_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """The stem conv and the shortcut projections, at the residual widths the model runs."""
        return self.fixed_macs_at(model.config, self.image_size(model.config, image_size), self.kept_channels(model))

    def fixed_macs_at(self, config, image_size: ImageSize, channels: tuple[int, ...] | None = None) -> int:
        """The stem conv and the shortcut projections when the channel groups keep `channels` (None: all)."""
        size = self.image_size(config, image_size)
        stem = config.embedding_size if channels is None else channels[0]
        return stem_macs(config, size, stem) + sum(
            b.in_channels * b.out_channels * math.prod(b.out_map) for b in blocks(config, size, channels) if b.shortcut
        )

    # Coupled residual channels (`OptinConfig.prune_channels`): one group per residual site (`channel_groups`).

    def channel_widths(self, config) -> tuple[int, ...]:
        """The width of each channel group: the stem's, then each stage's not tied to the site before it."""
        widths = [config.embedding_size, *config.hidden_sizes]
        groups = channel_groups(config)
        return tuple(widths[groups.index(group)] for group in range(groups[-1] + 1))

    def kept_channels(self, model: nn.Module) -> tuple[int, ...]:
        """The width each channel group has in `model` (dense or slim): its first site's output channels."""
        base, groups = model.base_model, channel_groups(model.config)
        widths = [base.embedder.embedder.convolution.out_channels]
        widths += [stage.layers[0].layer[2].convolution.out_channels for stage in base.encoder.stages]
        return tuple(widths[groups.index(group)] for group in range(groups[-1] + 1))

    def channel_carriers(self, model: nn.Module) -> list[tuple[list[nn.Module], int]]:
        """Per channel group: the modules whose outputs carry it (the stem, every block of its stages), and the
        first layer (block) that reads it. Zeroing a channel in all those outputs is what removing it computes."""
        base, groups = model.base_model, channel_groups(model.config)
        sites: list[list[nn.Module]] = [[base.embedder]] + [list(stage.layers) for stage in base.encoder.stages]
        first_reader = [0] + list(itertools.accumulate(len(stage.layers) for stage in base.encoder.stages))
        carriers: list[tuple[list[nn.Module], int]] = []
        for site, group in enumerate(groups):
            if group == len(carriers):
                carriers.append(([], first_reader[site]))
            carriers[group][0].extend(sites[site])
        return carriers

    def channels_cut(self, model: nn.Module) -> bool:
        """Whether `model` (dense or slim) lost residual channels: some group is narrower than the config's."""
        return self.kept_channels(model) != self.channel_widths(model.config)

    @property
    def channel_readers(self) -> tuple[str, ...]:
        """The conv layers (a `convolution` and its `normalization`) of a block that read the block's input, which a
        cut residual stream starves: the reduce conv and the projection shortcut (`reconstruct`'s consumer refit)."""
        return ("layer.0", "shortcut")

    def kept_reader_outputs(self, layer: nn.Module, path: str) -> torch.Tensor:
        """The dense output channels that the (slim) conv layer at `path` (a `channel_readers` one) keeps."""
        return kept_outputs(get_submodule(layer, path).convolution)

    def kept_block_outputs(self, layer: nn.Module) -> torch.Tensor:
        """The dense residual channels a (slim) block writes, in its order: its last conv's kept outputs."""
        return kept_outputs(layer.layer[2].convolution)

    def channel_classifier(self, model: nn.Module) -> nn.Linear | None:
        """The Linear classifier reading the average-pooled last residual group (None: no such head). Pooling is an
        average, so the classifier is refit as a 1x1 conv on the last block's map (`reconstruct`)."""
        head = getattr(model, "classifier", None)
        linear = head[-1] if isinstance(head, nn.Sequential) and len(head) else None
        return linear if isinstance(linear, nn.Linear) else None

    def slim_channels(self, model: nn.Module, keep: list[torch.Tensor]) -> None:
        """Keep channels `keep[g]` of each group g, in place: the stem's filters, each stage's block outputs (last
        conv and shortcut, with their BatchNorms), and every conv and the classifier reading them."""
        base, groups = model.base_model, channel_groups(model.config)
        _slim_outputs(base.embedder.embedder, keep[groups[0]])
        for stage, module in enumerate(base.encoder.stages):
            into, out = keep[groups[stage]], keep[groups[stage + 1]]
            for block in module.layers:
                _slim_inputs(block, "layer.0.convolution", into)
                _slim_outputs(block.layer[2], out)
                if not isinstance(block.shortcut, nn.Identity):
                    _slim_inputs(block, "shortcut.convolution", into)
                    _slim_outputs(block.shortcut, out)
                into = out
        linear = self.channel_classifier(model)
        if linear is not None:
            last = keep[groups[-1]].to(linear.weight.device)
            new = nn.Linear(len(last), linear.out_features, bias=linear.bias is not None, device="meta")
            new.weight = nn.Parameter(_select(linear.weight, 1, last), requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
            model.classifier[-1] = new


RESNET = ResNetAdapter(
    model_types=("resnet",),
    unit_names=("1x1 reduce channels", "3x3 conv channels"),
    fixed_parts="the stem conv and the shortcut projections",
    layers="encoder.stages",
    attn_core="layer.0",
    query="layer.0.convolution",
    key="layer.0.convolution",
    value="layer.0.convolution",
    attn_out="layer.1.convolution",
    ffn_up="layer.1",
    ffn_down="layer.2.convolution",
    ffn_input="layer.1",
    feature="",
    head_count_attrs=(),
    patch_embedding="embedder.embedder.convolution",
    num_prefix_tokens=0,
    pooled_tokens=0,
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    classifiers={"ResNetForImageClassification": _pooled_classifier},
    # the BatchNorm repair first (reconstruct="auto"): on a development split of digits-resnet it kept more
    # accuracy at 0.6 and 0.5 than the refit (benchmarks/cnn_repair_dev.py)
    capabilities=Capabilities(fast_engine=True, repairs=("batchnorm", "weights", "scales"), readers=True, channels=True),
)
