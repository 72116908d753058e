"""optin_hf/refit_allocation.py: per-layer counts chosen by the loss each layer's cuts leave after the refit.

The greedy choice is checked on hand-made loss curves (which cut it takes, what it gives back), the measured
curves against an independent prune-refit-KL run, and the pipeline on a tiny SegFormer."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, random_images, tiny_segformer

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.capture import scoring_forward
from optin_hf.losses import kl_loss
from optin_hf.macs import MacCosts
from optin_hf.refit_allocation import _Cut, _depths, allocate_cuts, measure_cuts, unit_orders
from optin_hf.result import pruning_result

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {**FAMILIES["segformer"].settings, "reconstruct": "weights", "num_samples": 8, "batch_size": 4}


def _two_layers() -> tuple[MacCosts, PruningMasks, dict[str, torch.Tensor]]:
    """Two layers of 2 heads (10 MACs each) and 4 neurons (5 MACs each): 80 MACs dense, nothing fixed."""
    costs = MacCosts(torch.tensor([10.0, 10.0]), torch.tensor([5.0, 5.0]))
    units = PruningMasks(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    return costs, units, unit_orders(torch.tensor([[2.0, 1.0]] * 2), torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2), units)


def _cuts(layer1_heads: list[float], layer1_neurons: list[float]) -> list[_Cut]:
    """Layer 0 loses much whatever is cut; layer 1's heads and neurons follow the given curves."""
    return [
        _Cut("head", 0, 2, 1, [2, 1, 0], [0.0, 5.0, 10.0]),
        _Cut("head", 1, 2, 1, [2, 1, 0], [0.0, *layer1_heads]),
        _Cut("neuron", 0, 4, 1, [4, 2, 0], [0.0, 5.0, 10.0]),
        _Cut("neuron", 1, 4, 1, [4, 2, 0], [0.0, *layer1_neurons]),
    ]


def test_the_cut_the_refit_repairs_is_taken_whole():
    # layer 1's attention costs little to lose entirely (its loss barely grows), so it goes before anything else
    costs, units, orders = _two_layers()
    masks = allocate_cuts(_cuts([0.1, 0.2], [1.0, 3.0]), orders, costs, units, 60.0)
    assert masks.head_mask.sum(1).tolist() == [2, 0] and masks.neuron_mask.sum(1).tolist() == [4, 4]
    assert costs.masked(masks) == 60.0


def test_what_the_budget_leaves_is_given_back_where_it_relieves_most():
    # cutting layer 1's neurons to 2 saves 10 for 0.1 (the best rate) and lands at 70; one neuron back (75) still fits
    costs, units, orders = _two_layers()
    masks = allocate_cuts(_cuts([0.5, 1.0], [0.1, 1.0]), orders, costs, units, 75.0)
    assert masks.head_mask.sum(1).tolist() == [2, 2] and masks.neuron_mask.sum(1).tolist() == [4, 3]
    assert masks.neuron_mask[1].tolist() == [True, True, True, False]  # the best-scored neurons stay
    assert costs.masked(masks) == 75.0


def test_depths_keep_multiples_and_end_empty():
    assert _depths(128, 8) == [128, 96, 64, 32, 0]
    assert _depths(2, 1) == [2, 1, 0]
    assert _depths(12, 8) == [12, 8, 0]


def test_each_measured_loss_is_the_kl_of_that_cut_pruned_and_refit():
    model = tiny_segformer()
    adapter = check_model(model)
    images = random_images(8, seed=3)
    pruner = OptinPruner(OptinConfig(**SETTINGS))
    scores = pruner.compute_scores(model, images)
    units = PruningMasks.full(model.config, adapter)
    orders = unit_orders(scores.head_scores, scores.neuron_scores, units)
    batches = pruner._reconstruction_batches(model, adapter, images, None)
    cuts = measure_cuts(model, adapter, orders, units, batches, "weights", 1e-3)
    assert [(c.kind, c.layer) for c in cuts] == [("head", i) for i in range(3)] + [("neuron", i) for i in range(3)]
    cut = next(c for c in cuts if c.kind == "neuron" and c.layer == 1)
    neuron_mask = units.neuron_mask.clone()
    neuron_mask[1] = False
    neuron_mask[1, orders["neuron"][1, : cut.kept[2]]] = True
    pruned = copy.deepcopy(model)
    OptinPruner(OptinConfig(**SETTINGS)).prune_model(pruned, images, masks=units.with_masks(units.head_mask, neuron_mask))
    with torch.no_grad():
        kl = kl_loss([adapter.kl_outputs(scoring_forward(model, b), b) for b in batches],
                     [adapter.kl_outputs(scoring_forward(pruned, b), b) for b in batches], 1.0)
    assert cut.loss[2] == pytest.approx(float(kl), rel=1e-6) and cut.loss[2] > 0


def test_a_segformer_pruned_with_refit_allocation_meets_its_budget():
    model = tiny_segformer()
    dense = count_macs(model, image_size=32)
    pruner = OptinPruner(OptinConfig(**SETTINGS, allocation="refit"))
    pruner.prune_model(model, random_images(8, seed=3))
    assert count_macs(model) <= 0.6 * dense * (1 + 1e-9)
    assert pruning_result(model).config.allocation == "refit"  # saved in optin_config.json
    assert pruner.timings["allocation_s"] > 0


@pytest.mark.parametrize("settings, words", [
    ({"allocation": "refit", "reconstruct": "none"}, "does not run"),
    ({"allocation": "refit", "reconstruct": "weights", "prune_steps": 2}, "prune_steps"),
    ({"allocation": "layers"}, "unknown"),
])
def test_settings_refit_allocation_cannot_run_are_refused(settings, words):
    with pytest.raises(ValueError, match=words):
        OptinConfig(**settings)


def test_refit_allocation_without_data_says_so():
    model = tiny_segformer()
    pruner = OptinPruner(OptinConfig(**SETTINGS))
    scores = pruner.compute_scores(model, random_images(8, seed=3))
    refit = OptinPruner(OptinConfig(**SETTINGS, allocation="refit", image_size=[32, 32]))
    with pytest.raises(ValueError, match="pass data"):
        refit.compute_masks(model, scores=scores)
