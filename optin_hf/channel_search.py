"""The budget search with coupled residual channels (`OptinConfig.prune_channels`): how many of them to keep.

A residual channel's MACs are not its own: every reduce conv of its stages reads it (so each kept head costs
per kept channel), every last conv writes it (so does each kept neuron), and it sizes the stem and the
shortcut convs (what `fixed_macs` counts). So channels cannot be ranked in one list with heads and neurons,
and their scores do not weigh against the heads' and neurons' either: a channel of the last stage, redundant
alone, scores far below the stem's, and a search that summed the scores of all three kinds cut the last
stage to one channel (benchmarks/resnet_wide_stem.py).

So every group keeps the same share of its channels (its best by score), for each share of `SHARES`; the
heads and neurons are searched under the budget at the widths that share leaves (`CostModel.at`,
`allocate.allocate`), and `judge` (the calibration loss of the slim, repaired model, `channel_judge`) picks
the share. Keeping every channel is one of the candidates, so the search cuts residual width only where the
model measurably does better for it on calibration data.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from .arch import ArchAdapter
from .capture import scoring_forward
from .importance import ImportanceScores
from .losses import KLOutputs, kl_loss
from .macs import CostModel
from .masks import PruningMasks
from .reconstruct import reconstruct
from .slim import slim_model

SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the residual shares tried, each group's share of its channels

# judge(masks) -> the loss of the model those masks slim (lower is better)
Judge = Callable[[PruningMasks], float]


def least_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The narrowest residual widths the search tries (the smallest share of every group)."""
    return tuple(max(1, round(min(SHARES) * width)) for width in widths)


def share_mask(scores: torch.Tensor, widths: tuple[int, ...], share: float) -> torch.Tensor:
    """bool [channels]: each group's best `share` of its channels by `scores` (at least one)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    start = 0
    for width, part in zip(widths, scores.split(list(widths))):
        keep[start + part.argsort(descending=True, stable=True)[: max(1, round(share * width))]] = True
        start += width
    return keep


def allocate_with_channels(
    scores: ImportanceScores,
    costs: CostModel,
    seq_len: float,
    budget: float,
    search: Callable[..., PruningMasks],
    judge: Judge,
    **kwargs: Any,
) -> PruningMasks:
    """The masks (heads, neurons and residual channels) under `budget` MACs whose slim model `judge` finds best, of
    one per residual share; `search` is the head/neuron search (`allocate.allocate`) with its settings `kwargs`.
    `scores` carry finite channel scores (`allocate.choose_masks` refuses others)."""
    widths = costs.adapter.channel_widths(costs.config)
    best: tuple[float, PruningMasks] | None = None
    for share in SHARES:
        channel_mask = share_mask(scores.channel_scores, widths, share)
        kept = tuple(int(part.sum()) for part in channel_mask.split(list(widths)))
        try:
            masks = search(scores.head_scores, scores.neuron_scores, costs.at(costs.uniform(seq_len), kept), budget, **kwargs)
        except ValueError:  # these widths alone already exceed the budget
            continue
        masks = dataclasses.replace(masks, channel_mask=channel_mask)
        loss = judge(masks)
        if best is None or loss < best[0]:
            best = loss, masks
    if best is None:
        raise ValueError(f"The budget of {budget:.4g} MACs cannot be reached at any residual share: raise mac_constraint.")
    return best[1]


def channel_judge(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], repair: str, ridge: float,
    temperature: float,
) -> Judge:
    """The loss a residual share is judged by: the KL (`losses.kl_loss`) between the dense `model`'s logits and
    those of the model some masks slim, repaired by `repair` on `batches` as the pruner then repairs it."""
    was_training = model.training
    model.eval()  # a train-mode forward would move the BatchNorm statistics
    try:
        with torch.no_grad():
            dense = [KLOutputs.of(adapter.logits_of(scoring_forward(model, batch))) for batch in batches]
    finally:
        model.train(was_training)

    @torch.no_grad()
    def judge(masks: PruningMasks) -> float:
        slim = slim_model(copy.deepcopy(model), masks, adapter).eval()
        if repair != "none":
            reconstruct(slim, model, batches, repair, ridge, adapter)
        outputs = [KLOutputs.of(adapter.logits_of(scoring_forward(slim, batch))) for batch in batches]
        return float(kl_loss(dense, outputs, temperature))

    return judge
