"""MAC counts of encoder layers: the kept units times each unit's cost, which the adapter gives.

One place counts them: a model's `CostModel` gives its dense MACs, the MACs of the units some masks
keep, and those of the model as it runs (`count_macs`); its `MacCosts` at a token count per layer
are what the budget search spends. The search, the pruner and the model card all read it, so a
budget met there is met by `count_macs` and the card's numbers are the ones the model runs.

By default (the OPTIN paper's formulas, `ArchAdapter.head_macs` / `neuron_macs`), per head at
sequence length s, hidden d, head size dh: 3*s*d*dh (q, k, v) + 2*s*s*dh (scores and context)
+ s*dh*d (output projection); per FFN neuron: 2*s*d. Embeddings and the classifier are not
counted; a vision model's patch embedding is, and so is all an adapter's `fixed_macs` gives
(Swin: also its patch-merging reductions; CNNs: the stem and every conv no unit owns). Where one
kind of unit feeds the other (a ResNet bottleneck's 3x3 conv reads the reduce channels and
writes the mid channels) each kept pair adds `ArchAdapter.pair_macs`. Where residual channels are pruned
too (`OptinConfig.prune_channels`, ResNet), the formulas and the fixed MACs take the residual widths kept
(`channels=`): a block's reduce-conv channel reads its input width, its shortcut conv costs in x out. A layer that keeps no head
saves its shared attention (`ArchAdapter.shared_attention_macs`, SegFormer's reduction conv).

A vision model is counted at one image size (`ImageSize`, height x width): the calibration
images' when the pruner counts (all of one size: mixed sizes are refused when the data is read),
the one a pruned model records (`OptinConfig.image_size`, so a reload and the model card count
where the pruner did), `count_macs`'s `image_size`, or else the size the config states. Its token
count (`ArchAdapter.default_seq_len`) and every map a Swin, CNN or SegFormer layer runs follow from
it, so no config field has to be set by hand.

With a token schedule, layer i uses s = schedule[i], the number of tokens it really holds,
class (and distillation) tokens included, because every matmul of the layer runs on all of
them. (The reference counts s = tokens - 1 there, which disagrees both with its own dense base
of 197 tokens and with the FLOPs the model runs.) Token merging's similarity matmul, |A|*|B|*d
per round, is counted too, so the count equals what a FLOP counter measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Sequence

import torch
from torch import nn

from .arch import ArchAdapter, check_model
from .arch.base import ImageSize
from .masks import PruningMasks
from .result import RESULT_ATTRIBUTE
from .tokens import installed_schedule, merge_rounds


def check_seq_len(seq_len: float) -> None:
    """Refuse a length the MAC formulas cannot use (NaN would make every budget comparison false)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, Real) or not math.isfinite(seq_len) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} is not a positive finite number of tokens: pass e.g. the average unpadded length.")


def counted_at(seq_len: float, image_size: Sequence[int] | None, digits: int = 1) -> str:
    """What MACs were counted at, in the model's own terms: "64x64 images", or "12.3 tokens" (`digits` decimals) for text."""
    if image_size is not None:
        return f"{image_size[0]}x{image_size[1]} images"
    return f"{seq_len:.{digits}f} tokens"


def recorded_image_size(model: nn.Module) -> ImageSize | None:
    """The image size a pruned model's MACs were counted at (`OptinConfig.image_size` of the result it
    carries); None for a dense model, a text model, or one pruned before the size was recorded."""
    result = getattr(model, RESULT_ATTRIBUTE, None)
    size = None if result is None else result.config.image_size
    return None if size is None else (int(size[0]), int(size[1]))


def merge_macs(schedule: Sequence[int], num_prefix_tokens: int, hidden: int) -> float:
    """MACs of the matching that takes each layer's input down to its scheduled token count."""
    total = 0.0
    for before, after in zip(schedule, schedule[1:]):
        for size_a, size_b, _ in merge_rounds(before - num_prefix_tokens, after - num_prefix_tokens):
            total += size_a * size_b * hidden
    return total


@dataclass(frozen=True)
class MacCosts:
    """What each kind of unit of every layer costs at one token count per layer: the numbers the
    budget search spends and `count_macs` adds up, so a budget met by one is met by the other.

    head, neuron: [num_layers] MACs of one head / one FFN neuron. fixed: what no unit owns in the
    dense model (with every layer's shared attention, and any token matching). pair: [num_layers]
    what each kept (head, neuron) pair adds (`ArchAdapter.pair_macs`). shared: [num_layers] what
    a layer that keeps no head saves of `fixed` (`ArchAdapter.shared_attention_macs`).
    """

    head: torch.Tensor
    neuron: torch.Tensor
    fixed: float = 0.0
    pair: torch.Tensor | None = None
    shared: torch.Tensor | None = None

    def __post_init__(self) -> None:
        zeros = torch.zeros(len(self.head), dtype=torch.float64)
        for name in ("head", "neuron", "pair", "shared"):
            value = getattr(self, name)
            object.__setattr__(self, name, zeros if value is None else torch.as_tensor(value).double())

    def macs(self, heads: Sequence[float] | torch.Tensor, neurons: Sequence[float] | torch.Tensor) -> float:
        """MACs of a model whose layers keep `heads` and `neurons` units ([num_layers] counts each)."""
        heads, neurons = torch.as_tensor(heads).tolist(), torch.as_tensor(neurons).tolist()
        total = float(self.fixed) - sum(s for s, h in zip(self.shared.tolist(), heads) if h == 0)
        for h, n, head, neuron, pair in zip(heads, neurons, self.head.tolist(), self.neuron.tolist(), self.pair.tolist()):
            total += h * head + n * neuron
            total += h * n * pair
        return total

    def masked(self, masks: PruningMasks) -> float:
        """MACs of the units `masks` keep (at these costs' token counts)."""
        return self.macs(masks.head_mask.sum(1), masks.neuron_mask.sum(1))


@dataclass(frozen=True)
class CostModel:
    """One model's MAC counts, from its adapter's formulas: the dense model's, those of the units some
    masks keep, and those of the model as it is (slim or dense), at a sequence length or a token schedule.

    Built once per model (`CostModel.of`); a bare config (`CostModel(adapter, config)`) counts no
    fixed MACs and no model. `fixed` is what no unit owns as the model runs (`ArchAdapter.fixed_macs`);
    `kept` the heads and neurons each of its layers runs; `schedule` the token schedule it runs;
    `image_size` the (height, width) a vision model is counted at (None: text, or the config's); `channels` the
    residual width of each channel group the model runs (`ArchAdapter.kept_channels`), None for a family without.
    """

    adapter: ArchAdapter
    config: Any
    fixed: float = 0.0
    kept: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    schedule: tuple[int, ...] | None = None
    image_size: ImageSize | None = None
    channels: tuple[int, ...] | None = None

    @classmethod
    def of(cls, model: nn.Module, adapter: ArchAdapter | None = None, image_size: Sequence[int] | int | None = None) -> CostModel:
        """The cost model of `model`, dense or slim; `adapter` is its adapter where the caller has it.

        A vision model is counted at `image_size` (the calibration images'), else at the size a pruned
        model records, else at its config's (`ArchAdapter.image_size`, which refuses a text model's)."""
        adapter = adapter or check_model(model)
        config = model.config
        size = adapter.image_size(config, image_size if image_size is not None else recorded_image_size(model))
        layers = adapter.layers_of(model)
        kept = tuple(adapter.kept_heads(layer, config) for layer in layers), tuple(adapter.kept_neurons(layer) for layer in layers)
        schedule = installed_schedule(model) if adapter.supports("tokens") else None  # only a token-mode family merges
        fixed = float(adapter.fixed_macs(model, size))
        channels = tuple(adapter.kept_channels(model)) if adapter.supports("channels") else None
        return cls(adapter, config, fixed, kept, None if schedule is None else tuple(schedule), size, channels)

    @property
    def units(self) -> PruningMasks:
        """Every head and neuron of the dense model."""
        return PruningMasks.full(self.config, self.adapter)

    def at(self, schedule: Sequence[float], channels: Sequence[int] | None = None) -> MacCosts:
        """The costs when layer i holds schedule[i] tokens (token matching between layers included), with the
        residual widths `channels` (default: the counted model's own)."""
        a, config = self.adapter, self.config
        # Only a vision model's formulas take the image size: a text family's keep (seq_len, config, layer).
        sized = {} if self.image_size is None else {"image_size": self.image_size}
        widths = self.channels if channels is None else tuple(channels)
        if widths is not None:  # only a family with channel groups takes them
            sized["channels"] = widths
        per_layer = lambda formula: torch.tensor(  # noqa: E731
            [formula(s, config, i, **sized) for i, s in enumerate(schedule)], dtype=torch.float64
        )
        shared = per_layer(a.shared_attention_macs)
        fixed = self.fixed if widths == self.channels else float(a.fixed_macs_at(config, self.image_size, widths))
        if self.kept is not None:  # a layer of the counted model that keeps no head runs no shared attention
            fixed += sum(float(s) for s, heads in zip(shared.tolist(), self.kept[0]) if heads == 0)
        if len(set(schedule)) > 1:
            fixed += merge_macs(schedule, a.num_prefix_tokens, config.hidden_size)
        return MacCosts(per_layer(a.head_macs), per_layer(a.neuron_macs), fixed, per_layer(a.pair_macs), shared)

    def uniform(self, seq_len: float | None = None) -> list[float]:
        """Every layer at `seq_len` tokens (default: the image's token count; text needs it given)."""
        if seq_len is None:
            seq_len = self.adapter.default_seq_len(self.config, self.image_size)
        if seq_len is None:
            raise ValueError("count_macs needs seq_len for a text model (e.g. the average unpadded length).")
        check_seq_len(seq_len)
        return [seq_len] * len(self.adapter.layer_geometry(self.config))

    def dense(self, seq_len: float | None = None) -> float:
        """MACs of the dense model: every unit, every layer at `seq_len` tokens, no token merging."""
        return self.at(self.uniform(seq_len)).masked(self.units)

    def masked(self, masks: PruningMasks, seq_len: float | None = None) -> float:
        """MACs of the units `masks` keep, at their token schedule or else at `seq_len` tokens."""
        schedule = masks.tokens_per_layer()
        return self.at(schedule if schedule is not None else self.uniform(seq_len), self.kept_widths(masks)).masked(masks)

    def kept_widths(self, masks: PruningMasks) -> tuple[int, ...] | None:
        """The residual widths `masks` keep (every channel where they prune none); None for a family without."""
        if not self.adapter.supports("channels"):
            return None
        return masks.channels_per_group(self.adapter.channel_widths(self.config))

    def model_macs(self, seq_len: float | None = None, token_schedule: Sequence[int] | None = None) -> float:
        """MACs of the model as it is (see `count_macs`)."""
        if self.kept is None:
            raise ValueError("This cost model was built from a config: build it with CostModel.of(model) to count a model.")
        schedule = token_schedule if token_schedule is not None else self.schedule
        if schedule is not None:
            if seq_len is not None and seq_len != schedule[0]:
                raise ValueError(
                    f"seq_len={seq_len} disagrees with the token schedule {list(schedule)}: layer i holds schedule[i] "
                    "tokens, so the input length is schedule[0]. Leave seq_len out."
                )
        else:
            schedule = self.uniform(seq_len)
        return self.at(schedule).macs(*self.kept)


def count_macs(
    model: nn.Module, seq_len: float | None = None, token_schedule: Sequence[int] | None = None, *,
    image_size: Sequence[int] | int | None = None,
) -> float:
    """MACs of one example through the encoder of a dense or slimmed model.

    A vision model is counted on one `image_size` image ((height, width) or one side): default, the
    size a pruned model records (the calibration images'), else the size its config states; a config
    that states none (SegFormer, ResNet) needs it given. `seq_len` defaults to that image's token
    count; text needs it given. `token_schedule` (tokens per layer) defaults to the one the model runs,
    if it merges tokens; a `seq_len` given with a schedule must be its input length, schedule[0].
    """
    return CostModel.of(model, image_size=image_size).model_macs(seq_len, token_schedule)
