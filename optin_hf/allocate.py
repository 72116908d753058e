"""The choice of masks: which heads and neurons to keep under a MAC budget, and in token mode
how many tokens each layer holds.

`choose_masks` is the pruner's one search step, from scores to masks. Its core is the budget search
over the scores (`allocate`, `allocate_uniform`, `allocate_with_tokens`, below); the options that
measure candidate masks on calibration data live in their own modules and are reached only from
here: the residual share (`channel_search`, `prune_channels`), the per-layer counts by the loss left
after the refit (`refit_allocation`, `allocation="refit"`) or by FLAP's standardized fluctuation
(`fluctuation_allocation`, `allocation="fluctuation"`), the units by the error the refit leaves
(`refit_selection`, `selection="refit"`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .channel_search import allocate_with_channels, channel_judge, least_widths
from .config import OptinConfig
from .fluctuation_allocation import best_by_scores, fluctuation_ranking, reading_point, scaled_counts
from .importance import ImportanceScores
from .macs import CostModel, MacCosts
from .masks import PruningMasks
from .refit_allocation import allocate_by_refit
from .refit_selection import select_by_refit


def _ranked(
    scores: torch.Tensor, unit_macs: torch.Tensor, multiple: int = 1, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ranking (best first) of blocks of units, with cumulative score and cost, each prefixed by 0.

    scores: [num_layers, units]; unit_macs: [num_layers] cost of one unit in each layer;
    present: bool [num_layers, units], the units that exist (None: all; padding of a narrower
    layer never enters the ranking). Each layer's units, best first, are cut into blocks of
    `multiple` (the last may be smaller), so any prefix of the ranking keeps a multiple of it in
    every layer (or all its units). Blocks rank by mean score: with `multiple=1` this is the
    plain ranking of units.
    Returns [blocks, multiple] flat unit indices in rank order (-1 pads a short block), and the
    cumulative scores and costs.
    """
    num_layers, units = scores.shape
    present = torch.ones_like(scores, dtype=torch.bool) if present is None else present
    multiple = max(1, min(multiple, units))  # a kind with no unit (a CNN without heads) ranks nothing
    per_layer = -(-units // multiple)
    pad = per_layer * multiple - units
    order = scores.double().masked_fill(~present, float("-inf")).argsort(dim=1, descending=True, stable=True)
    exists = present.gather(1, order)
    ranked = scores.double().gather(1, order).masked_fill(~exists, 0.0)
    flat = (order + torch.arange(num_layers)[:, None] * units).masked_fill(~exists, -1)
    members = torch.cat([flat, flat.new_full((num_layers, pad), -1)], 1).view(-1, multiple)
    valid = members >= 0
    sums = torch.cat([ranked, ranked.new_zeros(num_layers, pad)], 1).view(-1, multiple).sum(1)
    counts = valid.sum(1).double()
    costs = unit_macs.double().repeat_interleave(per_layer) * counts
    real = counts > 0  # blocks made only of a narrower layer's padding
    members, sums, counts, costs = members[real], sums[real], counts[real], costs[real]
    rank = (sums / counts).argsort(descending=True, stable=True)
    zero = torch.zeros(1, dtype=torch.float64)
    return members[rank], torch.cat([zero, sums[rank].cumsum(0)]), torch.cat([zero, costs[rank].cumsum(0)])


def check_scores(scores: torch.Tensor, kind: str) -> None:
    """Refuse scores that cannot rank: NaN/inf (a NaN setting, a broken file) or all zero (no information).

    scores: [num_layers, units of `kind`] (head, neuron or token)."""
    bad = ~torch.isfinite(scores)
    if bad.any():
        layer, unit = bad.nonzero()[0].tolist()
        raise ValueError(
            f"The {kind} scores hold {int(bad.sum())} NaN/inf value(s), the first at layer {layer}, {kind} {unit}: "
            "they cannot rank. Score again with finite settings, or load a valid scores file."
        )
    if not scores.any():
        raise ValueError(
            f"The {kind} scores are all zero: they carry no information to rank {kind}s by. Score the model "
            "(OptinPruner.compute_scores) or load the scores file that belongs to it."
        )


def _members(blocks: torch.Tensor) -> torch.Tensor:
    flat = blocks.flatten()
    return flat[flat >= 0]


def allocate(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    costs: MacCosts,
    budget: float,
    *,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    min_fill: float = 0.99,
    neurons_multiple_of: int = 1,
    units: PruningMasks | None = None,
) -> PruningMasks:
    """The budget search (`_search`) of the units to keep by their scores ([num_layers, units] each)
    under `budget` MACs at `costs`. Where a layer that keeps no head also saves MACs that `costs.fixed`
    holds (`costs.shared`: SegFormer's spatial-reduction conv), what such layers free is searched
    again, until the masks' real MACs (`MacCosts.masked`) reach the budget (a few rounds; never above it)."""
    args = (head_scores, neuron_scores, costs.head, costs.neuron)
    kw = dict(prune_heads=prune_heads, prune_neurons=prune_neurons, min_fill=min_fill,
              neurons_multiple_of=neurons_multiple_of, units=units, pair_macs=costs.pair)
    masks = _search(*args, budget, costs.fixed, **kw)
    if not costs.shared.any() or not prune_heads:
        return masks
    target = budget
    for _ in range(4):
        gap = budget - costs.masked(masks)
        if gap <= 1e-6 * budget:
            break
        target += gap
        trial = _search(*args, target, costs.fixed, **kw)
        if costs.masked(trial) > budget:
            break
        masks = trial
    # What is still free (a re-search that would overshoot) goes to the best neurons and the best
    # heads of layers that keep one already: a head of an emptied layer brings its shared MACs back.
    head_mask, neuron_mask = masks.head_mask.clone(), masks.neuron_mask.clone()
    head_present, neuron_present = (units or masks).present()
    open_heads = (~head_mask & head_present & head_mask.any(1, keepdim=True)).flatten().nonzero()
    blocks = _open_blocks(neuron_scores, neuron_mask, neuron_present, neurons_multiple_of) if prune_neurons else open_heads[:0]
    _fill(head_scores, neuron_scores, head_mask, neuron_mask, open_heads, blocks, costs.head, costs.neuron,
          costs.pair, budget - costs.masked(masks))
    return masks.with_masks(head_mask, neuron_mask)


def allocate_uniform(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    costs: MacCosts,
    budget: float,
    *,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    min_fill: float = 0.99,
    neurons_multiple_of: int = 1,
    units: PruningMasks | None = None,
) -> PruningMasks:
    """The budget search with every layer keeping the same counts (`OptinConfig.uniform_layers`): k heads
    and n neurons per layer, each layer its own k best heads and n best neurons, for the (k, n) under
    `budget` that keeps the most summed importance (splits that fill less than `min_fill` of the budget
    dropped when any fills it, as in `_search`). Every layer keeps at least one head and one block of
    `neurons_multiple_of` neurons, so the slim model is a standard config; n is a multiple of it (or all).
    """
    units = units or PruningMasks(torch.ones_like(head_scores, dtype=torch.bool), torch.ones_like(neuron_scores, dtype=torch.bool))
    widths = _widths(units)
    if len(widths[0]) > 1 or len(widths[1]) > 1:
        raise ValueError(
            f"uniform_layers=True keeps the same counts in every layer, and this model's layers differ (heads "
            f"{widths[0]}, neurons {widths[1]} per layer): set uniform_layers=False."
        )
    heads, neurons = widths[0][0], widths[1][0]
    for kind, scores, pruned in (("head", head_scores, prune_heads), ("neuron", neuron_scores, prune_neurons)):
        if pruned:
            check_scores(scores, kind)
    # cumulative[k]: the summed scores of every layer's k best units
    cumulative = [torch.cat([s.new_zeros(1), s.double().sort(dim=1, descending=True).values.sum(0).cumsum(0)])
                  for s in (head_scores[:, :heads], neuron_scores[:, :neurons])]
    step = max(1, min(neurons_multiple_of, neurons))
    head_counts = range(1, heads + 1) if prune_heads else [heads]
    neuron_counts = sorted({*range(step, neurons + 1, step), neurons}) if prune_neurons else [neurons]
    layers = head_scores.shape[0]
    options = []  # (filled, summed score, k, n)
    for k in head_counts:
        for n in neuron_counts:
            spent = costs.macs([k] * layers, [n] * layers)
            if spent <= budget + 1e-9:
                options.append((spent >= min_fill * budget, float(cumulative[0][k] + cumulative[1][n]), k, n))
    if not options:
        least = costs.macs([head_counts[0]] * layers, [neuron_counts[0]] * layers)
        raise ValueError(
            f"uniform_layers=True cannot reach the budget of {budget:.4g} MACs: keeping {head_counts[0]} head(s) and "
            f"{neuron_counts[0]} neuron(s) in every layer already costs {least:.4g}. Raise mac_constraint, lower "
            "neurons_multiple_of, or set uniform_layers=False."
        )
    _, _, k, n = max(options)
    keep = [s[:, :width].double().argsort(dim=1, descending=True, stable=True)[:, :count]
            for s, width, count in ((head_scores, heads, k), (neuron_scores, neurons, n))]
    head_mask, neuron_mask = torch.zeros_like(head_scores, dtype=torch.bool), torch.zeros_like(neuron_scores, dtype=torch.bool)
    head_mask.scatter_(1, keep[0], True)
    neuron_mask.scatter_(1, keep[1], True)
    return units.with_masks(head_mask, neuron_mask)


def _widths(units: PruningMasks) -> list[list[int]]:
    """The distinct per-layer widths of heads and of neurons ([heads], [neurons]): one each where layers are equal."""
    return [sorted(set(present.sum(1).tolist())) for present in units.present()]


def _open_blocks(scores: torch.Tensor, kept: torch.Tensor, present: torch.Tensor, multiple: int) -> torch.Tensor:
    """Each layer's neurons not yet kept, best first, in blocks of `multiple` ([blocks, multiple]
    flat indices, -1 padding the last block of a layer), so taking a layer's blocks in order keeps
    a multiple of it (or all) where the kept count already is one."""
    width = scores.shape[1]
    blocks = []
    for layer in range(scores.shape[0]):
        free = (~kept[layer] & present[layer]).nonzero().flatten()
        free = free[scores[layer, free].argsort(descending=True, stable=True)] + layer * width
        for start in range(0, len(free), multiple):
            block = free[start : start + multiple]
            blocks.append(torch.cat([block, block.new_full((multiple - len(block),), -1)]))
    return torch.stack(blocks) if blocks else torch.zeros(0, multiple, dtype=torch.long)


def _search(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    head_macs: torch.Tensor,
    neuron_macs: torch.Tensor,
    budget: float,
    fixed_macs: float = 0.0,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    min_fill: float = 0.99,
    neurons_multiple_of: int = 1,
    units: PruningMasks | None = None,
    pair_macs: torch.Tensor | None = None,
) -> PruningMasks:
    """Keep the k best heads and fill the rest of the budget with the best neurons, for the k
    that maximises the summed importance kept (the OPTIN search; ranks are global, so layers
    end up with different counts).

    head_macs / neuron_macs: [num_layers] MACs of one head / neuron per layer. `fixed_macs`
    is counted but never pruned (e.g. a patch embedding); structures not being pruned are
    added to it. Each layer keeps a multiple of `neurons_multiple_of` neurons (or all of
    them): CPU and GPU matmul kernels run such widths markedly faster per column. `units`
    (`PruningMasks.full(config)`) says which units exist where layers differ in width; None:
    every unit of the scores' shape. `pair_macs` ([num_layers], None = 0) is what each kept
    (head, neuron) pair of a layer adds (`ArchAdapter.pair_macs`): with k heads chosen, a layer's
    neurons then cost neuron_macs + kept heads x pair_macs each, so every split is costed exactly.
    """
    prune_heads = prune_heads and head_scores.shape[1] > 0  # a family without heads (ConvNeXt)
    units = units or PruningMasks(torch.ones_like(head_scores, dtype=torch.bool), torch.ones_like(neuron_scores, dtype=torch.bool))
    head_present, neuron_present = units.present()
    if pair_macs is not None and not pair_macs.any():
        pair_macs = None
    # A kind that is not pruned keeps all its units: its pairs fold into the other kind's unit cost.
    if pair_macs is not None and not prune_heads:
        neuron_macs, pair_macs = neuron_macs.double() + head_present.sum(1) * pair_macs.double(), None
    elif pair_macs is not None and not prune_neurons:
        head_macs, pair_macs = head_macs.double() + neuron_present.sum(1) * pair_macs.double(), None
    for kind, scores, pruned in (("head", head_scores, prune_heads), ("neuron", neuron_scores, prune_neurons)):
        if pruned:
            check_scores(scores, kind)
    if not all(math.isfinite(float(x)) for x in (budget, fixed_macs, head_macs.sum(), neuron_macs.sum())):
        raise ValueError(f"The MAC counts are not finite (budget {budget}): the sequence length must be a finite number of tokens.")
    heads_total = float((head_macs.double() * head_present.sum(1)).sum())
    neurons_total = float((neuron_macs.double() * neuron_present.sum(1)).sum())
    fixed = fixed_macs + (0.0 if prune_heads else heads_total) + (0.0 if prune_neurons else neurons_total)
    room = budget - fixed
    if room < 0:
        # only a kind that has units and is kept whole could give MACs back
        kept = [s for s, on, width in (("prune_heads", prune_heads, head_scores.shape[1]),
                                       ("prune_neurons", prune_neurons, neuron_scores.shape[1])) if not on and width]
        raise ValueError(
            f"The budget of {budget:.4g} MACs cannot be reached: the parts not being pruned already cost {fixed:.4g} "
            f"({fixed_macs:.4g} of them owned by no unit). Raise mac_constraint"
            + (f", or set {' and '.join(f'{s}=True' for s in kept)}." if kept else ".")
        )
    h_order, h_score, h_cost = _ranked(head_scores, head_macs, 1, head_present)
    n_order, n_score, n_cost = _ranked(neuron_scores, neuron_macs, neurons_multiple_of, neuron_present)
    if not prune_heads:
        h_score, h_cost = h_score[-1:], torch.zeros(1, dtype=torch.float64)
    if not prune_neurons:
        n_score, n_cost = n_score[-1:], torch.zeros(1, dtype=torch.float64)
    fits = h_cost <= room + 1e-9
    k_range = fits.nonzero().flatten()
    left = (room - h_cost[k_range]).clamp_min(0) + 1e-9
    if pair_macs is None:
        n_fill = torch.searchsorted(n_cost, left, right=True) - 1
        n_used = n_cost[n_fill]
    else:
        n_costs = _paired_costs(h_order, n_order, k_range, head_scores.shape[1], neuron_scores.shape[1], neuron_macs, pair_macs)
        n_fill = (torch.searchsorted(n_costs, left[:, None], right=True) - 1).squeeze(1)
        n_used = n_costs.gather(1, n_fill[:, None]).squeeze(1)
    total = h_score[k_range] + n_score[n_fill]
    # Splits that leave more than (1 - min_fill) of the budget unused are dropped when any
    # split fills it: a coarse head can otherwise leave a visible gap below the target.
    filled = fixed + h_cost[k_range] + n_used >= min_fill * budget
    if filled.any():
        total = torch.where(filled, total, torch.tensor(float("-inf"), dtype=total.dtype))
    best = int(total.argmax())
    k = int(k_range[best]) if prune_heads else len(h_order)
    n = int(n_fill[best]) if prune_neurons else len(n_order)
    head_mask = torch.zeros(head_scores.numel(), dtype=torch.bool)
    head_mask[_members(h_order[:k])] = True
    neuron_mask = torch.zeros(neuron_scores.numel(), dtype=torch.bool)
    neuron_mask[_members(n_order[:n])] = True
    head_mask, neuron_mask = head_mask.view_as(head_scores), neuron_mask.view_as(neuron_scores)
    spent = fixed + float((head_mask.sum(1) * head_macs.double()).sum() + (neuron_mask.sum(1) * neuron_macs.double()).sum())
    if pair_macs is not None:
        spent += float((head_mask.sum(1) * neuron_mask.sum(1) * pair_macs.double()).sum())
    _fill(head_scores, neuron_scores, head_mask, neuron_mask, h_order[k:] if prune_heads else h_order[:0],
          n_order[n:] if prune_neurons else n_order[:0], head_macs, neuron_macs, pair_macs, budget - spent)
    return units.with_masks(head_mask, neuron_mask)


def _fill(
    head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
    heads_left: torch.Tensor, blocks_left: torch.Tensor, head_macs: torch.Tensor, neuron_macs: torch.Tensor,
    pair_macs: torch.Tensor | None, room: float,
) -> None:
    """Spend what the best split leaves of the budget (in place): the best remaining heads and
    neuron blocks that still fit, skipping those that do not.

    The search keeps a prefix of each ranking, so where unit costs differ between layers (Swin,
    SegFormer, CNN stages) the next unit in rank order may be too dear while cheaper ones would
    fit; without this pass such a model can stay several percent under its budget. A layer's
    neuron blocks are taken in their order, and none after one that did not fit, so every layer
    still keeps a multiple of `neurons_multiple_of` (or all its units).
    """
    head_width, neuron_width = head_scores.shape[1], neuron_scores.shape[1]
    candidates = [(float(head_scores.flatten()[i]), "head", i, torch.tensor([i])) for i in heads_left[:, 0].tolist()]
    for block in blocks_left:
        members = block[block >= 0]
        candidates.append((float(neuron_scores.flatten()[members].sum()), "neuron", int(members[0]), members))
    closed: set[int] = set()  # layers whose neuron blocks stopped
    for _, kind, first, members in sorted(candidates, key=lambda c: -c[0]):
        layer = first // (head_width if kind == "head" else neuron_width)
        if kind == "neuron" and layer in closed:
            continue
        pairs = 0.0 if pair_macs is None else float(pair_macs[layer])
        if kind == "head":
            cost = float(head_macs[layer]) + pairs * float(neuron_mask[layer].sum())
        else:
            cost = len(members) * (float(neuron_macs[layer]) + pairs * float(head_mask[layer].sum()))
        if cost > room + 1e-9:
            closed.update([layer] if kind == "neuron" else [])
            continue
        room -= cost
        (head_mask if kind == "head" else neuron_mask).view(-1)[members] = True


def _paired_costs(
    h_order: torch.Tensor, n_order: torch.Tensor, k_range: torch.Tensor, head_width: int, neuron_width: int,
    neuron_macs: torch.Tensor, pair_macs: torch.Tensor,
) -> torch.Tensor:
    """[len(k_range), neuron blocks + 1]: cumulative cost of the ranked neuron blocks when the k best
    heads are kept, each neuron costing neuron_macs + (its layer's kept heads) x pair_macs."""
    num_layers = neuron_macs.shape[0]
    head_layers = torch.zeros(len(h_order) + 1, num_layers, dtype=torch.float64)
    head_layers[torch.arange(1, len(h_order) + 1), h_order[:, 0] // head_width] = 1.0
    kept = head_layers.cumsum(0)[k_range]  # [splits, num_layers]: heads each layer keeps
    block_layer = n_order[:, 0] // neuron_width
    block_size = (n_order >= 0).sum(1).double()
    costs = block_size * (neuron_macs.double()[block_layer] + kept[:, block_layer] * pair_macs.double()[block_layer])
    return torch.cat([costs.new_zeros(len(k_range), 1), costs.cumsum(1)], 1)


MIN_KEPT_SHARE = 0.1  # the reference's floor: a layer never keeps 10% of its tokens or fewer

# costs(schedule): the unit costs when layer i holds schedule[i] tokens (`CostModel.at`).
Costs = Callable[[list[int]], MacCosts]


def kept_tokens(removed: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Which tokens each layer keeps ([num_layers, tokens] bool) when each (layer, position) in
    `removed` (same shape) is removed from that layer onward, after the reference's clean-up.

    Layer 0 keeps every token. Removal from a layer onward makes each layer's kept set a
    subset of the previous one's. A layer that would keep as many tokens as the previous one,
    or MIN_KEPT_SHARE of its tokens or fewer (or no patch token), keeps all of the previous
    layer's.
    """
    num_layers, num_tokens = removed.shape
    kept = torch.ones(num_layers, num_tokens, dtype=torch.bool)
    gone = torch.zeros(num_tokens, dtype=torch.bool)
    for layer in range(1, num_layers):
        gone |= removed[layer]
        count = num_tokens - int(gone.sum())
        shrinks = max(MIN_KEPT_SHARE * num_tokens, num_prefix_tokens) < count < int(kept[layer - 1].sum())
        kept[layer] = ~gone if shrinks else kept[layer - 1]
    return kept


def remove_tokens(token_scores: torch.Tensor, num_prefix_tokens: int, macs_of: Callable[[list[int]], float], target: float) -> list[int]:
    """Remove token positions least important first until `macs_of(schedule) <= target`.

    token_scores: [num_layers, tokens]. Candidates are the non-prefix positions of layers
    1..L-1 (layer 0 and the class/distillation tokens are never removed). After each removal
    the schedule is re-derived and the MACs recounted; a removal that does not lower them (the
    token is already gone, or the clean-up undoes it) is skipped. Stops early when no candidate
    is left; the caller fills or cuts what remains with heads and neurons.
    """
    num_layers, num_tokens = token_scores.shape
    candidates = torch.zeros(num_layers, num_tokens, dtype=torch.bool)
    candidates[1:, num_prefix_tokens:] = True
    index = candidates.flatten().nonzero().flatten()
    order = index[token_scores.flatten()[index].argsort(stable=True)]
    removed = torch.zeros(num_layers * num_tokens, dtype=torch.bool)
    schedule = [num_tokens] * num_layers
    macs = macs_of(schedule)
    for i in order.tolist():
        if macs <= target:
            break
        removed[i] = True
        trial = kept_tokens(removed.view(num_layers, num_tokens), num_prefix_tokens).sum(1).tolist()
        trial_macs = macs_of(trial)
        if trial_macs < macs:
            schedule, macs = trial, trial_macs
        else:
            removed[i] = False
    return schedule


def allocate_with_tokens(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    token_scores: torch.Tensor,
    costs: Costs,
    budget: float,
    *,
    params_share: float,
    num_prefix_tokens: int,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    neurons_multiple_of: int = 1,
    units: PruningMasks | None = None,
) -> PruningMasks:
    """OPTIN's tau search: heads, neurons and a token schedule under one MAC budget.

    The cut (base - budget) is split: heads and neurons take `params_share` of it with the
    usual search at the full token count, tokens the rest (`remove_tokens`, with the kept heads
    and neurons costed at each layer's token count). Last, heads and neurons are searched
    again at the schedule's per-layer costs with the whole budget, which fills the MACs that
    the last token removal overshot (one token in every later layer: several percent on small
    models) and cuts more if the tokens could not reach the budget.
    """
    check_scores(token_scores, "token")
    num_layers, num_tokens = token_scores.shape
    dense = costs([num_tokens] * num_layers)
    kw = dict(prune_heads=prune_heads, prune_neurons=prune_neurons, neurons_multiple_of=neurons_multiple_of, units=units)
    units = units or PruningMasks(torch.ones_like(head_scores, dtype=torch.bool), torch.ones_like(neuron_scores, dtype=torch.bool))
    base = dense.masked(units)
    first = allocate(head_scores, neuron_scores, dense, base - params_share * (base - budget), **kw)
    heads, neurons = first.head_mask.sum(1), first.neuron_mask.sum(1)
    schedule = remove_tokens(token_scores, num_prefix_tokens, lambda s: costs(s).macs(heads, neurons), budget)
    masks = allocate(head_scores, neuron_scores, costs(schedule), budget, **kw)
    return masks.with_masks(masks.head_mask, masks.neuron_mask, torch.tensor(schedule))


def rearrange_layer(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """PTF's mask rearrangement of one layer: the same number of kept units, re-picked under the
    layer's block of the Fisher matrix.

    keep: bool [units]; grads: [examples, units], each example's gradient of its loss with respect
    to each unit's mask. Removing a set S is estimated to cost |sum_{u in S} g_u|^2 (summed over
    examples), so units whose gradients cancel can go together. Greedy, as PTF: start from the
    units of smallest diagonal Fisher; take in the next unit, then give back the one whose return
    leaves the smallest cost. The cost never rises above that of the diagonal choice.
    """
    units = keep.numel()
    pruned = units - int(keep.sum())
    if pruned in (0, units):
        return keep.clone()
    grads = grads.double()
    order = grads.pow(2).sum(0).argsort().tolist()
    removed = order[:pruned]
    for unit in order[pruned:]:
        removed.append(unit)
        chosen = grads[:, removed]
        cost = (chosen.sum(1, keepdim=True) - chosen).pow(2).sum(0)  # cost of giving back each one
        del removed[int(cost.argmin())]
    out = torch.ones(units, dtype=torch.bool)
    out[removed] = False
    return out


def rearrange_masks(masks: PruningMasks, grads: dict[str, torch.Tensor]) -> PruningMasks:
    """`rearrange_layer` on every layer of the kinds in grads ({"head": [examples, layers, heads], ...})."""
    new = {"head": masks.head_mask.clone(), "neuron": masks.neuron_mask.clone()}
    present = dict(zip(("head", "neuron"), masks.present()))
    for kind, g in grads.items():
        for layer in range(new[kind].shape[0]):
            n = int(present[kind][layer].sum())  # a narrower layer's padding is never kept
            new[kind][layer, :n] = rearrange_layer(new[kind][layer, :n], g[:, layer, :n])
    return masks.with_masks(new["head"], new["neuron"], masks.token_schedule)


def check_budget(costs: CostModel, config: OptinConfig, seq_len: float | None, mac_constraint: float) -> None:
    """Refuse a `mac_constraint` below the fewest MACs pruning can leave, before any scoring (the search
    would find out only after it): what no unit owns (`ArchAdapter.fixed_macs`), and all a kind that is
    not pruned costs. In token mode that kind's cost shrinks with the tokens, so only the fixed part counts.
    `seq_len`: the MAC length (None: the adapter's; a text model with none is not checked here)."""
    c, adapter = config, costs.adapter
    seq_len = seq_len if seq_len is not None else adapter.default_seq_len(costs.config, costs.image_size)
    if seq_len is None:
        return  # a text model with neither data nor seq_len: the pruner asks for the length
    at = costs.at(costs.uniform(seq_len))
    dense = at.masked(costs.units)
    if c.prune_channels:  # the least is at the narrowest residual widths the search tries
        at = costs.at(costs.uniform(seq_len), least_widths(costs.channels))
    floor = {adapter.fixed_parts: at.fixed}
    kept_whole: list[str] = []  # settings that would let the search cut a kind it now keeps whole
    if not c.prune_tokens:
        kinds = zip(("prune_heads", "prune_neurons"), adapter.unit_names, (at.head, at.neuron), costs.units.present())
        for setting, name, unit_cost, present in kinds:
            total = float((unit_cost * present.sum(1)).sum())
            if not getattr(c, setting) and total:
                floor[f"its {name}, which {setting}=False keeps whole"] = total
                kept_whole.append(f"{setting}=True")
    least = sum(floor.values())
    if least <= mac_constraint * dense:
        return

    def share(macs: float) -> float:
        """A share of the dense MACs, rounded up: a mac_constraint of it is reachable."""
        return math.ceil(macs / dense * 1000) / 1000

    parts = " and ".join(f"{name} ({macs / dense:.3f})" for name, macs in floor.items() if macs)
    advice = f"Set mac_constraint to at least {share(least)}"
    if kept_whole:
        fixed = floor[adapter.fixed_parts]
        advice += f", or {' and '.join(kept_whole)}" + (f" (then the least is {share(fixed)})" if fixed else "")
    tokens = ", which token pruning does not reduce" if c.prune_tokens else ""
    raise ValueError(
        f"mac_constraint={mac_constraint:g} cannot be reached on this {costs.config.model_type} model: the least "
        f"pruning can leave is {least / dense:.3f} of its {dense:.4g} MACs, {parts}{tokens}. {advice}."
    )


def choose_masks(
    model: nn.Module,
    scores: ImportanceScores,
    costs: CostModel,
    seq_len: float,
    config: OptinConfig,
    mac_constraint: float,
    batches: list[dict[str, torch.Tensor]] | None = None,
    *,
    select: bool = False,
) -> tuple[PruningMasks, dict[str, float]]:
    """The masks of the dense `model` (`costs`: its cost model) that keep `mac_constraint` of its MACs at `seq_len`,
    chosen from `scores` as `config` asks, and the seconds the refit-measured options took ({"allocation_s": ...}).

    How many units each layer keeps: the budget search over the scores (per-layer-uniform under `uniform_layers`,
    with a token schedule in token mode, at the residual share `channel_search` judges best under
    `prune_channels`), then, under `allocation="refit"`, the counts by the loss each layer's cuts leave after the
    refit. Which units: the best-scored (re-picked by PTF's rearrangement where the scores carry per-example
    gradients), or, with `select` and `selection="refit"`, those whose removal the refit repairs best. `batches`:
    the refit's calibration batches, on which those options measure (None: no data was given)."""
    c = config
    check_budget(costs, c, seq_len, mac_constraint)
    budget = mac_constraint * costs.dense(seq_len)
    kw = dict(prune_heads=c.prune_heads, prune_neurons=c.prune_neurons, neurons_multiple_of=c.neurons_multiple_of)
    # The scores' search runs under the other allocations too: it refuses scores that cannot rank and a budget
    # it cannot reach before their measurements (the refit's many slim-and-refit runs).
    masks = _by_scores(model, scores, costs, seq_len, c, budget, batches, units=costs.units, **kw)
    timings: dict[str, float] = {}
    if c.allocation == "fluctuation":
        if batches is None:
            raise ValueError("allocation='fluctuation' measures FLAP's fluctuation on calibration data: pass data (or set "
                             "allocation='scores').")
        start = time.perf_counter()
        masks = _by_fluctuation(model, scores, costs, seq_len, c, budget, batches, **kw)
        timings["allocation_s"] = time.perf_counter() - start
    if c.allocation == "refit":
        if batches is None:
            raise ValueError("allocation='refit' measures refit cuts on calibration data: pass data (or set allocation='scores').")
        start = time.perf_counter()
        masks = allocate_by_refit(
            model, costs.adapter, scores.head_scores, scores.neuron_scores, costs.at(costs.uniform(seq_len)), costs.units,
            budget, batches, c.reconstruct, c.reconstruct_ridge, rounds=c.allocation_rounds, inputs=c.reconstruct_inputs, **kw,
        )
        timings["allocation_s"] = time.perf_counter() - start
    if select and c.selection == "refit":  # the allocation's counts, its units re-chosen by the error the refit leaves
        if batches is None:
            raise ValueError("selection='refit' chooses units by the refit's error on calibration data: pass data (or set "
                             "selection='scores').")
        start = time.perf_counter()
        masks = select_by_refit(model, masks, batches, c.reconstruct_ridge, costs.adapter)
        timings["selection_s"] = time.perf_counter() - start
    return masks, timings


def _by_fluctuation(
    model: nn.Module, scores: ImportanceScores, costs: CostModel, seq_len: float, config: OptinConfig, budget: float,
    batches: list[dict[str, torch.Tensor]], **kw: Any,
) -> PruningMasks:
    """`choose_masks` under `allocation="fluctuation"` (`optin_hf.fluctuation_allocation`): the uniform split's heads,
    the neurons in the fluctuation's shape read at its reading point (`reading_point`), scaled to the
    budget's uniform split; each layer's kept units its best by `scores` (`kw`: the searches' settings)."""
    widths = _widths(costs.units)
    if len(widths[0]) > 1 or len(widths[1]) > 1:
        raise ValueError(
            f"allocation='fluctuation' starts from one split of heads and neurons for every layer, and this model's "
            f"layers differ (heads {widths[0]}, neurons {widths[1]} per layer: a pruned model?): set allocation='scores'."
        )
    at = costs.at(costs.uniform(seq_len))
    split = allocate_uniform(scores.head_scores, scores.neuron_scores, at, budget, units=costs.units, **kw)
    reading = reading_point(budget, costs.dense(seq_len))
    shape_split = split if reading == budget else allocate_uniform(
        scores.head_scores, scores.neuron_scores, at, reading, units=costs.units, **kw)
    ranking = fluctuation_ranking(model, costs.adapter, shape_split, at, costs.units, batches, config.num_samples,
                                  config.allocation_band, config.neurons_multiple_of)
    shape = allocate(*ranking, at, reading, units=costs.units, **kw).neuron_mask.sum(1)
    if reading > budget:
        shape = scaled_counts(shape, int(split.neuron_mask.sum()), split.neuron_mask.shape[1], config.neurons_multiple_of)
    return best_by_scores(scores, costs.units, split.head_mask.sum(1), shape)


def _by_scores(
    model: nn.Module, scores: ImportanceScores, costs: CostModel, seq_len: float, config: OptinConfig, budget: float,
    batches: list[dict[str, torch.Tensor]] | None, **kw: Any,
) -> PruningMasks:
    """`choose_masks`' budget search over the scores alone (`kw`: the searches' settings)."""
    c, adapter = config, costs.adapter
    if c.prune_channels:  # the residual share is judged on calibration data (`channel_search`)
        if batches is None:
            raise ValueError("prune_channels=True picks the residual share by the slim, repaired model's loss on "
                             "calibration data: pass data.")
        if scores.channel_scores is None:
            raise ValueError(
                f"prune_channels=True needs residual channel scores, which these {scores.criterion!r} scores lack: score "
                "with importance='optin' (or 'random') and prune_channels=True."
            )
        check_scores(scores.channel_scores, "channel")
        judge = channel_judge(model, adapter, batches, c.reconstruct, c.reconstruct_ridge, c.temperature)
    if c.prune_tokens:
        if c.uniform_layers:
            raise ValueError("uniform_layers=True keeps the same counts in every layer, which a token schedule does not: "
                             "set prune_tokens=False or uniform_layers=False.")
        if scores.token_scores is None:
            raise ValueError(
                f"prune_tokens=True needs token scores, which these {scores.criterion!r} scores lack: score with "
                "importance='optin' (or 'random') and prune_tokens=True, or import the reference's rankings."
            )
        tokens = adapter.default_seq_len(costs.config, costs.image_size)
        if seq_len != tokens:
            raise ValueError(f"seq_len={seq_len}: in token mode the MACs are counted at the image's {tokens} tokens.")
        return allocate_with_tokens(
            scores.head_scores, scores.neuron_scores, scores.token_scores, costs.at, budget,
            params_share=c.resolved_token_cut_share(), num_prefix_tokens=adapter.num_prefix_tokens, **kw
        )
    search = allocate_uniform if c.uniform_layers else allocate
    if c.prune_channels:
        return allocate_with_channels(scores, costs, seq_len, budget, search, judge, **kw)
    masks = search(scores.head_scores, scores.neuron_scores, costs.at(costs.uniform(seq_len)), budget, **kw)
    return rearrange_masks(masks, scores.example_grads) if scores.example_grads else masks
