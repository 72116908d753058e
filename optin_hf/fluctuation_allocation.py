"""Fluctuation allocation: how many FFN neurons each layer keeps, shaped by FLAP's adaptive structure search.

The budget search over OPTIN's scores gives a split of the budget between heads and neurons, and with
`uniform_layers` the same counts in every layer. Across layers its scores disagree with what the refit
repairs: on the LLM default, OPTIN's per-layer counts cut the last layers' MLPs to a sixth and lose
far more than the uniform counts (benchmarks/RESULTS.md). FLAP (An et al., AAAI 2024) ranks the
channels of all layers together after standardizing each layer's fluctuation metric (an input
channel's variance times the squared weights reading it) apart.

Here every layer keeps the uniform split's heads, and its neurons follow a shape read from FLAP's
search at SHAPE_AT of the MACs (or at the budget, where milder): the neurons the uniform split keeps
there, re-spread over layers by one threshold of the standardized fluctuation, each layer within
`band` x its width of the uniform count. At the budget each layer keeps that shape's count times the
budget's uniform count over the shape's, so the layers together keep the uniform split's neurons and
its MACs. Why a fixed reading point: one threshold on per-layer standardized scores lies below the
layers' means at a mild cut and above them at a deep one, so a layer whose fluctuation is a few
outliers over a flat bulk keeps all its channels at 0.8 of the MACs and almost none at 0.6. Read at
each budget, that flip cost SmolLM2 15% perplexity at 0.6; the shape read at 0.8 and scaled gained
5% there (development plays, benchmarks/RESULTS.md, s42). SHAPE_AT and the default band were chosen
on those plays.

Which units a layer keeps stays the criterion's choice, or `selection="refit"`'s. The statistics are
read on the scoring's windows (`num_samples`, the first calibration windows): one dense pass, no refit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .arch import ArchAdapter
from .importance import ImportanceScores
from .importance.flap import standardized_fluctuation
from .macs import MacCosts
from .masks import PruningMasks

SHAPE_AT = 0.8  # the fraction of the MACs at which the shape is read (or the budget, where milder)


def reading_point(budget: float, dense: float) -> float:
    """The MACs at which the shape is read: SHAPE_AT of the dense model's `dense`, or `budget` where milder."""
    return max(budget, SHAPE_AT * dense)


def fluctuation_ranking(
    model: nn.Module, adapter: ArchAdapter, split: PruningMasks, costs: MacCosts, units: PruningMasks,
    batches: list[dict[str, torch.Tensor]], windows: int, band: float, multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, neuron) scores for the budget search that reads the shape: `split`'s heads (the uniform search's)
    first, then neurons by their standardized fluctuation on the first `windows` rows of `batches` (times each
    neuron's MACs, as FLAP's threshold ranks them), the heads `split` drops last. A layer keeps within `band` x its
    width (rounded to `multiple`) of `split`'s neuron count: the neurons ranked above that floor come first, those
    past the ceiling last."""
    _, neurons = standardized_fluctuation(model, adapter, _first(batches, windows))
    present = units.present()[1]
    fluctuation = torch.stack([F.pad(n, (0, present.shape[1] - n.numel())) for n in neurons])
    shifted = (fluctuation - float(fluctuation[present].min())) * present * costs.neuron.double()[:, None]
    width, kept = present.sum(1, keepdim=True), split.neuron_mask.sum(1, keepdim=True)
    step = max(1, multiple)
    slack = (band * width / step).round().long() * step
    rank = shifted.masked_fill(~present, float("-inf")).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    # The search keeps the most summed score under the budget: a floor neuron outscores all free ones together, and
    # a kept head all neurons together, so none is traded away; what is past a ceiling (or a dropped head) scores -1.
    floor = 1.0 + float(shifted.sum())
    neuron_order = torch.where(rank < kept - slack, floor + shifted, shifted)
    neuron_order = torch.where((rank >= kept + slack) & present, -1.0, neuron_order)
    head = 1.0 + float(neuron_order.clamp_min(0).sum())
    return torch.where(split.head_mask, head, -1.0).double(), neuron_order.double()


def scaled_counts(shape: torch.Tensor, total: int, width: int, multiple: int = 1) -> torch.Tensor:
    """[layers] counts in proportion to `shape` ([layers] counts) that sum to `total`, each a multiple of
    `multiple` in [0, width] (largest remainders first; `total` a multiple of `multiple`)."""
    step = max(1, multiple)
    exact = shape.double() * total / max(float(shape.sum()), 1.0)
    counts = (exact / step).floor().long().clamp(0, width // step) * step
    order = (exact - counts).argsort(descending=True, stable=True)
    short = (total - int(counts.sum())) // step
    while short > 0:  # one step to each layer with room, largest remainder first, until the total is met
        room = [layer for layer in order.tolist() if counts[layer] + step <= width][:short]
        if not room:
            break
        counts[room] += step
        short -= len(room)
    return counts


def _first(batches: list[dict[str, torch.Tensor]], windows: int) -> list[dict[str, torch.Tensor]]:
    """The first `windows` rows of `batches`."""
    taken, left = [], windows
    for batch in batches:
        if left <= 0:
            break
        rows = next(iter(batch.values())).shape[0]
        taken.append({k: v[:left] if torch.is_tensor(v) and v.shape[:1] == (rows,) else v for k, v in batch.items()})
        left -= rows
    return taken


def best_by_scores(scores: ImportanceScores, units: PruningMasks, heads: torch.Tensor, neurons: torch.Tensor) -> PruningMasks:
    """Each layer keeping its `heads[l]` and `neurons[l]` best existing units by `scores`."""
    kept = []
    for score, count, present in zip((scores.head_scores, scores.neuron_scores), (heads, neurons), units.present()):
        rank = score.double().masked_fill(~present, float("-inf")).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        kept.append(rank < count.reshape(-1, 1))
    return units.with_masks(*kept)
