import pytest
import torch
from transformers import ViTConfig

from optin_hf.allocate import allocate, allocate_with_tokens, kept_tokens, remove_tokens
from optin_hf.arch import get_adapter
from optin_hf.macs import CostModel, MacCosts


def removed_at(num_layers: int, num_tokens: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    removed = torch.zeros(num_layers, num_tokens, dtype=torch.bool)
    for layer, position in pairs:
        removed[layer, position] = True
    return removed


def check_schedule_rules(kept: torch.Tensor, num_prefix_tokens: int) -> None:
    counts = kept.sum(1)
    assert kept[0].all() and kept[:, :num_prefix_tokens].all()
    for layer in range(1, kept.shape[0]):
        assert not (kept[layer] & ~kept[layer - 1]).any()  # a subset of the previous layer's
        shrinks = counts[layer] < counts[layer - 1]
        assert not shrinks or counts[layer] > 0.1 * kept.shape[1]


def test_kept_tokens_follow_the_reference_clean_up():
    # 4 layers x 20 tokens (1 prefix). Layer 1 drops 2, layer 2 adds nothing new, layer 3 would
    # leave 2 tokens (10% of 20): it keeps layer 2's set instead. Layer-0 removals are ignored.
    removed = removed_at(4, 20, [(0, 5), (1, 3), (1, 4), (2, 3), (3, 1)] + [(3, p) for p in range(5, 20)])
    kept = kept_tokens(removed, 1)
    assert kept.sum(1).tolist() == [20, 18, 18, 18]
    assert not kept[1, 3] and not kept[1, 4] and kept[1, 5]
    check_schedule_rules(kept, 1)


def test_kept_tokens_are_removed_from_their_layer_onward():
    kept = kept_tokens(removed_at(3, 10, [(1, 2), (2, 7)]), 1)
    assert kept.sum(1).tolist() == [10, 9, 8] and not kept[2, 2] and not kept[2, 7]
    check_schedule_rules(kept, 1)


def test_remove_tokens_least_important_first_until_target():
    scores = torch.arange(4 * 9, dtype=torch.float64).view(4, 9).flip(0)  # the last layer matters least
    scores[:, 0] = -1.0  # the class token is never a candidate, whatever its score
    costs = lambda schedule: float(sum(schedule))  # noqa: E731
    # Layer 3 goes first, down to 2 tokens (1 would leave no patch token), then layer 2.
    assert remove_tokens(scores, 1, costs, target=25.0) == [9, 9, 5, 2]


def test_remove_tokens_skips_removals_that_do_not_lower_macs():
    scores = torch.zeros(3, 10, dtype=torch.float64)
    scores[2] = -1.0  # layer 2 first: 8 removals, then the 10% floor stops it; layer 1 follows
    schedule = remove_tokens(scores, 1, lambda s: float(sum(s)), target=0.0)
    assert schedule == [10, 2, 2]


def test_allocate_with_tokens_splits_the_cut_and_fills_the_budget():
    num_layers, num_tokens, hidden = 4, 17, 64
    config = ViTConfig(hidden_size=hidden, num_attention_heads=4)  # head size 16
    g = torch.Generator().manual_seed(0)
    heads, neurons, tokens = torch.rand(4, 4, generator=g), torch.rand(4, 128, generator=g), torch.rand(4, 17, generator=g)

    costs = CostModel(get_adapter(config), config)  # a config only: no fixed MACs

    dense = costs.at([num_tokens] * num_layers)
    base = float(dense.head.sum() * 4 + dense.neuron.sum() * 128)
    totals, filled = {}, {}
    for share in (0.0, 0.3, 1.0):
        masks = allocate_with_tokens(heads, neurons, tokens, costs.at, 0.5 * base, params_share=share, num_prefix_tokens=1)
        schedule = masks.tokens_per_layer()
        at = costs.at(schedule)
        total = at.fixed + float((masks.head_mask.sum(1) * at.head).sum() + (masks.neuron_mask.sum(1) * at.neuron).sum())
        assert total <= 0.5 * base
        totals[share], filled[share] = sum(schedule), total / (0.5 * base)
    assert totals[0.0] < totals[0.3] < totals[1.0] == num_layers * num_tokens  # share 1: heads and neurons only
    # Heads and neurons refill what the last token removal overshot; with share 0 they are all
    # kept already, so that case stays within one token's MACs of the budget.
    assert filled[0.3] >= 0.99 and filled[1.0] >= 0.99 and filled[0.0] > 0.9


def test_neurons_multiple_of_keeps_each_layers_best_in_whole_blocks():
    g = torch.Generator().manual_seed(1)
    heads, neurons = torch.rand(4, 6, generator=g), torch.rand(4, 50, generator=g)
    head_macs, neuron_macs = torch.full((4,), 64.0), torch.tensor([2.0, 2.0, 3.0, 3.0])
    base = float(head_macs.sum() * 6 + neuron_macs.sum() * 50)
    for budget in (0.8, 0.6, 0.4):
        for multiple in (1, 8):
            masks = allocate(heads, neurons, MacCosts(head_macs, neuron_macs), budget * base, neurons_multiple_of=multiple)
            kept = masks.neuron_mask.sum(1)
            assert all(int(c) % multiple == 0 or int(c) == 50 for c in kept), kept
            for layer, count in enumerate(kept.tolist()):  # each layer keeps its top-`count` neurons
                assert set(masks.neuron_mask[layer].nonzero().flatten().tolist()) == set(neurons[layer].topk(count).indices.tolist())
            total = float((masks.head_mask.sum(1) * head_macs).sum() + (kept * neuron_macs).sum())
            assert 0.99 * budget * base <= total <= budget * base
            if multiple == 1:  # blocks of one are the plain global ranking: the n best neurons overall
                best = neurons.flatten().topk(int(kept.sum())).indices
                assert torch.equal(masks.neuron_mask.flatten().nonzero().flatten(), best.sort().values)


def test_rearrangement_keeps_counts_and_lets_cancelling_units_go_together():
    from optin_hf.allocate import rearrange_layer

    # The diagonal Fisher removes units 0 and 1 (the smallest), whose gradients add up (cost 4.01);
    # unit 2's gradient cancels unit 0's, so removing 0 and 2 costs 0.04 and unit 1 stays.
    grads = torch.tensor([[1.0, 1.0, -1.2, 3.0], [0.0, 0.1, 0.0, 3.0]])  # [examples, units]
    keep = torch.tensor([False, False, True, True])  # what the diagonal scores chose
    assert rearrange_layer(keep, grads).tolist() == [False, True, False, True]


def test_rearrangement_never_costs_more_than_the_diagonal_choice():
    from optin_hf.allocate import rearrange_layer

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        grads = torch.randn(6, 9, generator=g, dtype=torch.float64)
        keep = torch.zeros(9, dtype=torch.bool)
        keep[:5] = True
        new = rearrange_layer(keep, grads)
        diagonal = grads.pow(2).sum(0).argsort()[:4]  # the 4 removed by the diagonal Fisher
        cost = lambda removed: float(grads[:, removed].sum(1).pow(2).sum())  # noqa: E731
        assert int(new.sum()) == 5 and cost(~new) <= cost(diagonal) + 1e-12


def subsets(layers: int, units: int) -> torch.Tensor:
    """Every keep-set of `layers` x `units`: [2 ** (layers * units), layers, units] bool."""
    bits = layers * units
    codes = torch.arange(2**bits)[:, None]
    return ((codes >> torch.arange(bits)) & 1).bool().view(-1, layers, units)


def brute_force_best(heads, neurons, head_cost, neuron_cost, budget, fixed, prune_heads, prune_neurons, multiple, min_fill=0.99):
    """The best summed kept score over ALL keep-sets that fit the budget, keep a multiple of
    `multiple` neurons per layer (or all), and fill `min_fill` of it when any keep-set does."""
    h_sets, n_sets = subsets(*heads.shape), subsets(*neurons.shape)
    if not prune_heads:
        h_sets = h_sets[h_sets.flatten(1).all(1)]
    if not prune_neurons:
        n_sets = n_sets[n_sets.flatten(1).all(1)]
    counts = n_sets.sum(2)
    n_sets = n_sets[((counts % multiple == 0) | (counts == neurons.shape[1])).all(1)]
    h_score, n_score = (h_sets * heads).flatten(1).sum(1), (n_sets * neurons).flatten(1).sum(1)
    cost = fixed + (h_sets.flatten(1).sum(1) * head_cost)[:, None] + (n_sets.flatten(1).sum(1) * neuron_cost)[None, :]
    total = h_score[:, None] + n_score[None, :]
    fits = cost <= budget + 1e-9
    filled = fits & (cost >= min_fill * budget)
    return float(total[filled if filled.any() else fits].max())


@pytest.mark.parametrize(
    "layers, num_heads, width, multiple",
    [(2, 3, 6, 1), (3, 2, 4, 1), (2, 3, 6, 2), (3, 3, 4, 2), (2, 2, 6, 3)],
)
def test_allocate_finds_the_best_keep_set_by_brute_force(layers, num_heads, width, multiple):
    """allocate is exact, not a heuristic, when each kind of unit costs the same in every layer
    (the plain mode: MACs counted at one sequence length), scores are >= 0 and
    `neurons_multiple_of` divides the width: its best head count k with the best k heads and as
    many of the best neurons as fit is then the best of all keep-sets under the budget and its
    rules (neurons per layer a multiple, or all; fill min_fill of the budget if possible).
    With per-layer costs (token mode) or a partial last block it ranks by score, greedily."""
    g = torch.Generator().manual_seed(layers * 100 + num_heads * 10 + width + multiple)
    for trial in range(6):
        heads = torch.rand(layers, num_heads, generator=g, dtype=torch.float64)
        neurons = torch.rand(layers, width, generator=g, dtype=torch.float64)
        head_cost, neuron_cost = 1 + 9 * float(torch.rand(1, generator=g)), 1 + 3 * float(torch.rand(1, generator=g))
        fixed = float(torch.rand(1, generator=g)) * 5
        prune_heads, prune_neurons = [(True, True), (True, True), (True, True), (True, False), (False, True), (True, True)][trial]
        base = fixed + layers * (num_heads * head_cost + width * neuron_cost)
        for share in (0.35, 0.6, 0.85):
            budget = share * base
            kept_elsewhere = (0 if prune_heads else layers * num_heads * head_cost) + (0 if prune_neurons else layers * width * neuron_cost)
            if fixed + kept_elsewhere > budget:
                continue
            masks = allocate(
                heads, neurons, MacCosts(torch.full((layers,), head_cost), torch.full((layers,), neuron_cost), fixed), budget,
                prune_heads=prune_heads, prune_neurons=prune_neurons, neurons_multiple_of=multiple,
            )
            cost = fixed + float(masks.head_mask.sum() * head_cost + masks.neuron_mask.sum() * neuron_cost)
            kept = masks.neuron_mask.sum(1)
            assert cost <= budget + 1e-9 and all(int(c) % multiple == 0 or int(c) == width for c in kept)
            got = float(heads[masks.head_mask].sum() + neurons[masks.neuron_mask].sum())
            want = brute_force_best(heads, neurons, head_cost, neuron_cost, budget, fixed, prune_heads, prune_neurons, multiple)
            assert got == pytest.approx(want, abs=1e-9), (trial, share)


@pytest.mark.parametrize("seed", range(40))
def test_what_the_split_leaves_is_spent_on_units_that_still_fit(seed):
    """Layers of different unit costs (Swin, SegFormer, CNN stages): the budget is met, and no
    unkept head, nor any layer's next neuron block, would still fit in what is left."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, width, multiple = 3, 4, 12, int(torch.randint(1, 5, (1,), generator=g))
    head_scores, neuron_scores = torch.rand(layers, heads, generator=g), torch.rand(layers, width, generator=g)
    head_macs = torch.tensor([40.0, 9.0, 3.0])[torch.randperm(layers, generator=g)]
    neuron_macs = torch.tensor([5.0, 2.0, 1.0])[torch.randperm(layers, generator=g)]
    dense = float(head_macs.sum() * heads + neuron_macs.sum() * width)
    budget = float(torch.empty(1).uniform_(0.3, 0.9, generator=g)) * dense
    masks = allocate(head_scores, neuron_scores, MacCosts(head_macs, neuron_macs), budget, neurons_multiple_of=multiple)
    kept_h, kept_n = masks.head_mask.sum(1), masks.neuron_mask.sum(1)
    spent = float((kept_h * head_macs).sum() + (kept_n * neuron_macs).sum())
    assert spent <= budget + 1e-9
    left = budget - spent
    assert all(kept_h[l] == heads or head_macs[l] > left for l in range(layers))
    for l in range(layers):
        assert kept_n[l] % multiple == 0 or kept_n[l] == width
        block = min(multiple, width - int(kept_n[l]))
        assert kept_n[l] == width or block * neuron_macs[l] > left
    # each layer keeps its best neurons and heads (the fill never skips a better unit of a layer)
    for scores, mask in ((head_scores, masks.head_mask), (neuron_scores, masks.neuron_mask)):
        for l in range(layers):
            if mask[l].any() and (~mask[l]).any():
                assert scores[l][mask[l]].min() >= scores[l][~mask[l]].max()


@pytest.mark.parametrize("seed", range(20))
def test_what_emptied_attention_frees_is_spent(seed):
    """A layer that keeps no head also saves its shared attention MACs (SegFormer's reduction conv,
    counted in fixed_macs): the real MACs stay under the budget, and what is left could buy no
    head of a layer that keeps heads and no neuron."""
    g = torch.Generator().manual_seed(seed)
    head_scores, neuron_scores = torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g)
    head_macs, neuron_macs = torch.tensor([60.0, 8.0, 2.0]), torch.tensor([1.0, 1.0, 0.5])
    shared = torch.tensor([120.0, 30.0, 0.0])
    fixed = 100.0 + float(shared.sum())
    dense = fixed + float(head_macs.sum() * 4 + neuron_macs.sum() * 16)
    budget = 0.6 * dense

    def real(m):
        heads, neurons = m.head_mask.sum(1).double(), m.neuron_mask.sum(1).double()
        return fixed - float(shared[heads == 0].sum()) + float((heads * head_macs).sum() + (neurons * neuron_macs).sum())

    masks = allocate(head_scores, neuron_scores, MacCosts(head_macs, neuron_macs, fixed, shared=shared), budget)
    left = budget - real(masks)
    assert left >= -1e-9
    kept_h, kept_n = masks.head_mask.sum(1), masks.neuron_mask.sum(1)
    # nothing that still fits is left out: a head of a layer that keeps heads, a neuron anywhere
    assert all(kept_h[l] in (0, 4) or head_macs[l] > left for l in range(3))
    assert all(kept_n[l] == 16 or neuron_macs[l] > left for l in range(3))
    without = allocate(head_scores, neuron_scores, MacCosts(head_macs, neuron_macs, fixed), budget)
    assert real(masks) >= real(without)  # never less of the budget used than the search that ignores them
