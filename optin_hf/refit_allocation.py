"""Refit-aware allocation: how many heads and neurons each layer keeps, judged by the loss the refit leaves.

OPTIN scores one unit at a time on the dense model, before any repair, and the budget search ranks
those scores across layers. The least-squares refit (`optin_hf.reconstruct`) then repairs some cuts
almost wholly and others hardly at all: on the digit-scenes SegFormer, removing a whole attention of
the first stage's second layer costs 44.5 mIoU points unrepaired and 0.6 refit (the next sublayers'
refits rebuild its sum), while removing a first-stage Mix-FFN costs 52 unrepaired and still 32 refit.
Scores taken before the refit cannot tell these apart, so the search keeps attention that the refit
would have replaced and cuts the FFN channels that nothing replaces (`benchmarks/RESULTS.md`).

Here each (layer, kind) is cut alone, its worst-scored units first, at `LEVELS` depths (a quarter of
its units, half, ...; all): the cut model is slimmed, refit as the run will refit it, and its KL from
the dense outputs on the refit's calibration batches measured. Taking the cuts as additive, the
counts follow greedily: the cut of least added loss per MAC saved, until the budget is met, then
units given back, most loss-relieving per MAC first, while they fit (a layer's loss between two
measured depths is read off the straight line between them). Which units a layer keeps stays the
scores' choice (or `selection="refit"`'s). It costs (layers x kinds x LEVELS) slim-and-refit runs,
so it is meant for small models (`OptinConfig.allocation`).

Cuts measured one at a time from the dense model are priced as if alone, and two blocks' cuts whose
errors add up (or that repair each other) are not. With `rounds` > 1 the allocation walks down a
ladder of budgets, evenly spaced in MACs from the dense model to the target: each round measures
every (layer, kind)'s cuts from the counts the previous round left (the rest of the model slimmed to
those counts and refit with it, so the cut is priced among the others), as the loss it adds to that
model's, and deepens from there to the round's budget. A round only removes units (it gives back only
within what the previous round kept). On digits-resnet's development folds 2 rounds lowered the dev
cross-entropy at 0.6 and 0.5 of the MACs (0.139 -> 0.121, 0.301 -> 0.212; `benchmarks/RESULTS.md`);
each round costs one more measurement.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter
from .capture import scoring_forward
from .losses import bounded, kl_loss
from .macs import MacCosts
from .masks import PruningMasks
from .reconstruct import reconstruct
from .slim import slim_model

LEVELS = 4  # measured depths per (layer, kind): a quarter of its units, half, three quarters, all


@dataclass
class _Cut:
    """One (layer, kind)'s measured loss curve: kept counts (all first, then each depth) and the KL at each."""

    kind: str
    layer: int
    width: int
    step: int  # a count moves by this (neurons_multiple_of for neurons: every layer keeps a multiple, or all)
    kept: list[int]
    loss: list[float]

    def loss_at(self, count: int) -> float:
        """The loss with `count` units kept, on the straight line between the measured depths around it."""
        for high, low, at_high, at_low in zip(self.kept, self.kept[1:], self.loss, self.loss[1:]):
            if low <= count <= high:
                return at_high + (at_low - at_high) * (high - count) / (high - low)
        raise ValueError(f"{count} {self.kind}s is outside layer {self.layer}'s 0..{self.width}")


def _depths(width: int, step: int) -> list[int]:
    """Kept counts at each depth, all first, every count a multiple of `step` (or all), distinct, ending at 0."""
    counts = [width]
    for level in range(1, LEVELS + 1):
        count = (width * (LEVELS - level) // LEVELS) // step * step
        if count < counts[-1]:
            counts.append(count)
    return counts


@torch.no_grad()
def _outputs(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]) -> list:
    return [adapter.kl_outputs(scoring_forward(model, batch), batch) for batch in batches]


def _keep(order: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """bool [width]: the `count` best units of a layer whose units `order` ranks best first."""
    mask = torch.zeros(width, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def measure_cuts(
    model: nn.Module,
    adapter: ArchAdapter,
    orders: dict[str, torch.Tensor],
    units: PruningMasks,
    batches: list[dict[str, torch.Tensor]],
    mode: str,
    ridge: float,
    *,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    neurons_multiple_of: int = 1,
    start: dict[str, list[int]] | None = None,
    inputs: bool = False,
) -> list[_Cut]:
    """Each (layer, kind)'s loss curve: the dense `model` with that kind of that layer cut alone to each depth
    (its units ranked by `orders[kind]`, [layers, width] best first), slimmed, refit (`mode`, `ridge`) on
    `batches`, and its KL from the dense outputs on them measured. Independent of the budget.
    `start`: per-kind kept counts ([layers] each) that every other layer stays at and each cut deepens from
    (None: every unit); each loss is then what the cut adds to the loss of the model slimmed to `start`.
    `inputs`: the refit fits the input projections too (`OptinConfig.reconstruct_inputs`), as the final repair will."""
    counts = start or _all_counts(units)
    steps = {"head": 1, "neuron": max(1, neurons_multiple_of)}
    cuts = [_Cut(kind, layer, width, steps[kind], _depths(width, steps[kind]), [0.0])
            for kind, pruned in (("head", prune_heads), ("neuron", prune_neurons)) if pruned
            for layer, width in enumerate(counts[kind]) if width]
    was_training = model.training
    model.eval()
    try:
        dense = [bounded(o) for o in _outputs(model, adapter, batches)]

        def loss(trial_counts: dict[str, list[int]]) -> float:
            trial = copy.deepcopy(model)
            masks = _masks(orders, units, trial_counts)
            slim_model(trial, masks, adapter)
            # no refit conv, no link refit: refitting ResNet's 3x3 convs too priced the cuts worse on digits-resnet's
            # development folds, at 3x the time (benchmarks/resnet_block_refit.py), and SegFormer's link refit
            # (optin_hf.link_refit) chose counts that lost more on a development fold; the final repair has both. The
            # input projections' refit (`inputs`) is priced as the final repair runs it: on the digit-scenes SegFormer's
            # development folds that chose counts that lost less (benchmarks/RESULTS.md, s33)
            reconstruct(trial, model, batches, mode, ridge, adapter, progress=False, refit_convs=False, inputs=inputs,
                        masks=masks)
            return float(kl_loss(dense, _outputs(trial, adapter, batches), 1.0))

        base = 0.0 if start is None else loss(counts)
        with tqdm(total=sum(len(cut.kept) - 1 for cut in cuts), desc="Refit-aware allocation", unit="cut") as bar:
            for cut in cuts:
                for count in cut.kept[1:]:
                    trial_counts = {kind: list(values) for kind, values in counts.items()}
                    trial_counts[cut.kind][cut.layer] = count
                    cut.loss.append(loss(trial_counts) - base)
                    bar.update()
    finally:
        model.train(was_training)
    return cuts


def _all_counts(units: PruningMasks) -> dict[str, list[int]]:
    """Per-kind counts ([layers] each) of every unit the dense model has."""
    head_present, neuron_present = units.present()
    return {"head": head_present.sum(1).tolist(), "neuron": neuron_present.sum(1).tolist()}


def _masks(orders: dict[str, torch.Tensor], units: PruningMasks, counts: dict[str, list[int]]) -> PruningMasks:
    """Masks keeping each layer's `counts` best-ordered units."""
    return units.with_masks(*(torch.stack([_keep(orders[kind][i], k, mask.shape[1]) for i, k in enumerate(counts[kind])])
                              for kind, mask in (("head", units.head_mask), ("neuron", units.neuron_mask))))


def unit_orders(head_scores: torch.Tensor, neuron_scores: torch.Tensor, units: PruningMasks) -> dict[str, torch.Tensor]:
    """Each layer's units best-scored first ([layers, width] per kind), its padding last."""
    return {kind: scores.double().masked_fill(~present, float("-inf")).argsort(dim=1, descending=True, stable=True)
            for kind, scores, present in zip(("head", "neuron"), (head_scores, neuron_scores), units.present())}


def allocate_cuts(
    cuts: list[_Cut], orders: dict[str, torch.Tensor], costs: MacCosts, units: PruningMasks, budget: float,
    start: dict[str, list[int]] | None = None,
) -> PruningMasks:
    """The masks within `budget` MACs (at `costs`) that the measured `cuts` pick (see the module docstring), from
    the `start` counts the cuts were measured from (None: every unit)."""
    counts = {kind: list(values) for kind, values in (start or _all_counts(units)).items()}
    _remove(cuts, counts, costs, budget)
    _give_back(cuts, counts, costs, budget)
    return _masks(orders, units, counts)


def ladder(top: float, budget: float, rounds: int) -> list[float]:
    """The rounds' budgets: `rounds` steps evenly spaced in MACs from `top` (the dense model's) down to `budget`."""
    return [top - (top - budget) * (i + 1) / rounds for i in range(rounds - 1)] + [budget]  # the last one exact


def allocate_by_refit(
    model: nn.Module,
    adapter: ArchAdapter,
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    costs: MacCosts,
    units: PruningMasks,
    budget: float,
    batches: list[dict[str, torch.Tensor]],
    mode: str,
    ridge: float,
    *,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    neurons_multiple_of: int = 1,
    rounds: int = 1,
    inputs: bool = False,
) -> PruningMasks:
    """Masks of the dense `model` within `budget` MACs (at `costs`), their per-layer counts chosen by the loss
    left after the `mode` refit on `batches` (see the module docstring), the units within a layer by the scores.
    `rounds`: measured rounds down a ladder of budgets to `budget` (1: every cut measured from the dense model;
    `OptinConfig.allocation_rounds`, checked there). `inputs`: each cut's refit fits the input projections too."""
    orders = unit_orders(head_scores, neuron_scores, units)
    full, start = _all_counts(units), None
    for step in ladder(costs.macs(full["head"], full["neuron"]), budget, rounds):
        cuts = measure_cuts(model, adapter, orders, units, batches, mode, ridge, prune_heads=prune_heads,
                            prune_neurons=prune_neurons, neurons_multiple_of=neurons_multiple_of, start=start, inputs=inputs)
        masks = allocate_cuts(cuts, orders, costs, units, step, start)
        start = {"head": masks.head_mask.sum(1).tolist(), "neuron": masks.neuron_mask.sum(1).tolist()}
    return masks


def _macs(costs: MacCosts, counts: dict[str, list[int]], cut: _Cut | None = None, count: int = 0) -> float:
    """MACs at `counts`, with `cut`'s layer at `count` where given."""
    trial = {kind: list(values) for kind, values in counts.items()}
    if cut is not None:
        trial[cut.kind][cut.layer] = count
    return costs.macs(trial["head"], trial["neuron"])


def _remove(cuts: list[_Cut], counts: dict[str, list[int]], costs: MacCosts, budget: float) -> None:
    """Deepen, in place, the cut of least added loss per MAC saved (looking past any depth, so a cut whose last
    step saves most, as a whole attention with its reduction conv does, is seen) until `counts` fit `budget`."""
    depth = {id(cut): 0 for cut in cuts}
    while (now := _macs(costs, counts)) > budget * (1 + 1e-9):
        best = None
        for cut in cuts:
            at = depth[id(cut)]
            for level in range(at + 1, len(cut.kept)):
                saved = now - _macs(costs, counts, cut, cut.kept[level])
                if saved > 0:
                    rate = (cut.loss[level] - cut.loss[at]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, cut, level)
        if best is None:
            raise ValueError(f"The budget of {budget:.4g} MACs cannot be reached by cutting heads and neurons: raise mac_constraint.")
        _, cut, level = best
        depth[id(cut)] = level
        counts[cut.kind][cut.layer] = cut.kept[level]


def _give_back(cuts: list[_Cut], counts: dict[str, list[int]], costs: MacCosts, budget: float) -> None:
    """Restore, in place, one step of units at a time where it relieves the most loss per MAC and still fits."""
    while True:
        now, best = _macs(costs, counts), None
        for cut in cuts:
            count = counts[cut.kind][cut.layer]
            if count >= cut.width:
                continue
            more = min(count + cut.step, cut.width)
            added = _macs(costs, counts, cut, more) - now
            if now + added > budget * (1 + 1e-9):
                continue
            rate = (cut.loss_at(count) - cut.loss_at(more)) / max(added, 1e-12)
            if rate <= 0:  # units that, by the measured curve, relieve nothing stay out
                continue
            if best is None or rate > best[0]:
                best = (rate, cut, more)
        if best is None:
            return
        _, cut, more = best
        counts[cut.kind][cut.layer] = more
