"""The budget search: which heads and neurons to keep under a MAC budget."""

from __future__ import annotations

import torch

from .masks import PruningMasks


def _ranked(scores: torch.Tensor, unit_macs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ranking (best first) with cumulative score and cost, each prefixed by 0.

    scores: [num_layers, units]; unit_macs: [num_layers] cost of one unit in each layer.
    """
    flat = scores.flatten()
    order = flat.argsort(descending=True, stable=True)
    costs = unit_macs.double()[:, None].expand_as(scores).flatten()[order]
    zero = torch.zeros(1, dtype=torch.float64)
    return order, torch.cat([zero, flat[order].double().cumsum(0)]), torch.cat([zero, costs.cumsum(0)])


def allocate(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    head_macs: torch.Tensor,
    neuron_macs: torch.Tensor,
    budget: float,
    fixed_macs: float = 0.0,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    min_fill: float = 0.99,
) -> PruningMasks:
    """Keep the k best heads and fill the rest of the budget with the best neurons, for the k
    that maximises the summed importance kept (the OPTIN search; ranks are global, so layers
    end up with different counts).

    head_macs / neuron_macs: [num_layers] MACs of one head / neuron per layer. `fixed_macs`
    is counted but never pruned (e.g. a patch embedding); structures not being pruned are
    added to it.
    """
    heads_total = float(head_macs.double().sum() * head_scores.shape[1])
    neurons_total = float(neuron_macs.double().sum() * neuron_scores.shape[1])
    fixed = fixed_macs + (0.0 if prune_heads else heads_total) + (0.0 if prune_neurons else neurons_total)
    room = budget - fixed
    if room < 0:
        raise ValueError(
            f"The budget of {budget:.4g} MACs cannot be reached: the parts not being pruned already cost "
            f"{fixed:.4g}. Raise mac_constraint or enable pruning of both heads and neurons."
        )
    h_order, h_score, h_cost = _ranked(head_scores, head_macs)
    n_order, n_score, n_cost = _ranked(neuron_scores, neuron_macs)
    if not prune_heads:
        h_score, h_cost = h_score[-1:], torch.zeros(1, dtype=torch.float64)
    if not prune_neurons:
        n_score, n_cost = n_score[-1:], torch.zeros(1, dtype=torch.float64)
    fits = h_cost <= room + 1e-9
    k_range = fits.nonzero().flatten()
    n_fill = torch.searchsorted(n_cost, (room - h_cost[k_range]).clamp_min(0) + 1e-9, right=True) - 1
    total = h_score[k_range] + n_score[n_fill]
    # Splits that leave more than (1 - min_fill) of the budget unused are dropped when any
    # split fills it: a coarse head can otherwise leave a visible gap below the target.
    filled = fixed + h_cost[k_range] + n_cost[n_fill] >= min_fill * budget
    if filled.any():
        total = torch.where(filled, total, torch.tensor(float("-inf"), dtype=total.dtype))
    best = int(total.argmax())
    k = int(k_range[best]) if prune_heads else head_scores.numel()
    n = int(n_fill[best]) if prune_neurons else neuron_scores.numel()
    head_mask = torch.zeros(head_scores.numel(), dtype=torch.bool)
    head_mask[h_order[:k]] = True
    neuron_mask = torch.zeros(neuron_scores.numel(), dtype=torch.bool)
    neuron_mask[n_order[:n]] = True
    return PruningMasks(head_mask.view_as(head_scores), neuron_mask.view_as(neuron_scores))
