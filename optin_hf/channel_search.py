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
model measurably does better for it on calibration data. Then the stem's group (the first) alone is tried at each
smaller share, the others at the chosen one (`STEM_APART`): a wide stem runs on the largest map, so its channels
cost the most MACs each (the wide-stem ResNet's 7x7 stem is 28.8% of its MACs).

The judge repairs each trial as the pruner then does: with the refit (`reconstruct="weights"`, or "batchnorm")
the convs that read the cut channels are refit too (`reconstruct`), so the share it picks is the repaired model's.
On the wide-stem ResNet's development folds (benchmarks/resnet_channel_refit.py), shares down to 0.3 and the
stem apart lowered the dev cross-entropy at 0.6 and 0.5 of the MACs against shares down to 0.5.

`prune_channels=None` (the default) turns this on where it can run (`channels_by_default`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from .arch import ArchAdapter
from .capture import scoring_forward
from .config import OptinConfig
from .criteria import AUTO_IMPORTANCE
from .importance import CRITERIA, ImportanceScores
from .losses import KLOutputs, kl_loss
from .macs import CostModel
from .masks import PruningMasks
from .reconstruct import reconstruct
from .slim import slim_model

SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the residual shares tried, each group's share of its channels
STEM_APART = True  # then the stem's group alone at each smaller share (the module docstring)
# The most residual channels the default (`prune_channels=None`) scores: each is one reference-engine run through the
# model from its first reader on, 0.5-0.7 s per run of 4 images at 224 px on a ResNet-50 (shared 2-core CPU), so its
# 3,904 channels would take about 20 CPU hours on 128 images; the small ResNets measured here have 240-296.
MAX_DEFAULT_CHANNELS = 1024

# judge(masks) -> the loss of the model those masks slim (lower is better)
Judge = Callable[[PruningMasks], float]


def channels_by_default(config: OptinConfig, adapter: ArchAdapter, model_config, offloaded: bool) -> bool | None:
    """What `prune_channels=None` means for `config` on a model of `model_config` (`adapter`'s family): cut residual
    channels where the family has them, at most MAX_DEFAULT_CHANNELS of them (their scoring's cost), and every other
    setting can run with them (a criterion that scores them, the scores' counts and unit choice, one step, no token
    or per-layer-uniform pruning, a repair other than "scales", the model in memory); None while importance="auto"
    (each candidate's pruner resolves its own)."""
    c = config
    if c.importance == AUTO_IMPORTANCE:
        return None
    return bool(adapter.supports("channels") and not offloaded and getattr(CRITERIA[c.importance], "scores_channels", False)
                and sum(adapter.channel_widths(model_config)) <= MAX_DEFAULT_CHANNELS
                and c.reconstruct != "scales" and c.allocation in ("auto", "scores") and c.selection == "scores"
                and not (c.prune_tokens or c.uniform_layers or c.prune_steps > 1))


def least_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The narrowest residual widths the search tries (the smallest share of every group)."""
    return tuple(max(1, round(min(SHARES) * width)) for width in widths)


def share_mask(scores: torch.Tensor, widths: tuple[int, ...], shares: tuple[float, ...]) -> torch.Tensor:
    """bool [channels]: each group's best `shares[g]` of its channels by `scores` (at least one)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    start = 0
    for width, share, part in zip(widths, shares, scores.split(list(widths))):
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
    one per residual share (then, with STEM_APART, the stem's group alone cut further); `search` is the head/neuron
    search (`allocate.allocate`) with its settings `kwargs`. `scores` carry finite channel scores
    (`allocate.choose_masks` refuses others)."""
    widths = costs.adapter.channel_widths(costs.config)
    tried: dict[tuple[float, ...], tuple[float, PruningMasks] | None] = {}

    def trial(shares: tuple[float, ...]) -> None:
        channel_mask = share_mask(scores.channel_scores, widths, shares)
        kept = tuple(int(part.sum()) for part in channel_mask.split(list(widths)))
        try:
            masks = search(scores.head_scores, scores.neuron_scores, costs.at(costs.uniform(seq_len), kept), budget, **kwargs)
        except ValueError:  # these widths alone already exceed the budget
            tried[shares] = None
            return
        masks = dataclasses.replace(masks, channel_mask=channel_mask)
        tried[shares] = judge(masks), masks

    def best() -> tuple[tuple[float, ...], tuple[float, PruningMasks]] | None:
        found = [(shares, result) for shares, result in tried.items() if result is not None]
        return min(found, key=lambda item: item[1][0]) if found else None

    for share in SHARES:
        trial((share,) * len(widths))
    if STEM_APART and len(widths) > 1 and best() is not None:
        chosen = best()[0][1]
        for share in [share for share in SHARES if share < chosen]:
            trial((share,) + (chosen,) * (len(widths) - 1))
    if best() is None:
        raise ValueError(f"The budget of {budget:.4g} MACs cannot be reached at any residual share: raise mac_constraint.")
    return best()[1][1]


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
