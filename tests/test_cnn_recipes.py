"""The digits-resnet and digit-scenes-segformer recipes' repair settings on tiny models of their families.

digits-resnet counts each block's channels by the loss left after the refit, in two measured rounds (ragged stages:
8 and 16 inner channels), and refits the convs reading each block's input and the classifier too;
digit-scenes-segformer also re-chooses the units at those counts by the refit's error, and refits the input
projections too, in the allocation's priced cuts as in the final repair. Both must meet their budget, keep the
counts the refit allocation chose, and record what ran."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import random_images, tiny_cnn, tiny_segformer

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.capture import scoring_forward
from optin_hf.losses import kl_loss
from optin_hf.reconstruct import reconstruct
from optin_hf.refit_allocation import measure_cuts, unit_orders
from optin_hf.slim import slim_model
from optin_hf.result import pruning_result
from optin_hf.tasks.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = {"num_samples": 8, "batch_size": 4, "neuron_group_size": 8, "reconstruct_samples": 8}


def _recipe(name: str) -> dict:
    """The recipe's OptinConfig fields, with a tiny model's calibration size."""
    return {**load_recipe(RECIPES / f"{name}.yaml").optin.to_dict(), **SMALL}


def test_the_resnet_recipe_refits_and_counts_by_the_refit_on_ragged_stages():
    settings = _recipe("digits-resnet")
    assert (settings["reconstruct"], settings["allocation"], settings["allocation_rounds"]) == ("weights", "refit", 2)
    assert settings["reconstruct_readers"]
    model = tiny_cnn("resnet")
    dense = count_macs(model, image_size=32)
    pruner = OptinPruner(OptinConfig(**settings))
    pruner.prune_model(model, random_images(8, seed=3))
    assert count_macs(model) <= 0.6 * dense * (1 + 1e-9)
    config = pruning_result(model).config
    assert (config.allocation, config.allocation_rounds, config.reconstruct) == ("refit", 2, "weights")
    # the widths kept, each block's reduce conv and the classifier were refit too, and the artifact carries them
    assert config.reconstruct_readers and {"classifier.weight", "layers.2.layer.0.convolution.weight"} <= pruner.reconstruction.tensors.keys()
    assert pruner.timings["allocation_s"] > 0
    adapter = check_model(model)
    assert not adapter.channels_cut(model)  # the refit allocation keeps the residual widths
    # the stages' blocks are 8, 8 and 16 channels wide: the slim blocks keep what the masks say, within their own width
    kept = [adapter.kept_heads(layer, model.config) for layer in adapter.layers_of(model)]
    assert kept == pruner.masks.head_mask.sum(1).tolist() and all(k <= width for k, width in zip(kept, (8, 8, 16)))
    assert [adapter.kept_neurons(layer) for layer in adapter.layers_of(model)] == pruner.masks.neuron_mask.sum(1).tolist()


def test_the_segformer_recipe_re_chooses_units_at_the_refit_allocations_counts():
    settings = _recipe("digit-scenes-segformer")
    assert (settings["allocation"], settings["selection"]) == ("refit", "refit")
    data = random_images(8, seed=3)
    allocated = OptinPruner(OptinConfig(**{**settings, "selection": "scores"}))
    allocated.prune_model(tiny_segformer(), data)
    model = tiny_segformer()
    dense = count_macs(model, image_size=32)
    pruner = OptinPruner(OptinConfig(**settings))
    pruner.prune_model(model, data)
    assert count_macs(model) <= 0.6 * dense * (1 + 1e-9)
    # the selection keeps each layer's counts and changes only which units
    assert pruner.masks.head_mask.sum(1).tolist() == allocated.masks.head_mask.sum(1).tolist()
    assert pruner.masks.neuron_mask.sum(1).tolist() == allocated.masks.neuron_mask.sum(1).tolist()
    assert pruning_result(model).config.selection == "refit"
    assert pruner.timings["selection_s"] > 0
    # the recipe's input refit ran and its projections are in the artifact
    assert pruning_result(model).config.reconstruct_inputs
    assert any(".inputs." in key for key in pruner.reconstruction.tensors)


def test_the_segformer_recipe_prices_its_allocations_cuts_with_the_input_refit():
    settings = _recipe("digit-scenes-segformer")
    assert settings["reconstruct_inputs"] and settings["allocation"] == "refit"
    model, images = tiny_segformer(), random_images(8, seed=3)
    adapter = check_model(model)
    pruner = OptinPruner(OptinConfig(**settings))
    scores = pruner.compute_scores(model, images)
    units = PruningMasks.full(model.config, adapter)
    orders = unit_orders(scores.head_scores, scores.neuron_scores, units)
    batches = pruner._reconstruction_batches(model, adapter, images, None)
    cuts = measure_cuts(model, adapter, orders, units, batches, "weights", 1e-3, inputs=True)
    # layer 0's Mix-FFN cut to half: the later layers read a drifted stream, which their input projections' refit fits
    cut = next(c for c in cuts if c.kind == "neuron" and c.layer == 0)
    neuron_mask = units.neuron_mask.clone()
    neuron_mask[0] = False
    neuron_mask[0, orders["neuron"][0, : cut.kept[2]]] = True
    masks = units.with_masks(units.head_mask, neuron_mask)

    def refit_kl(inputs: bool) -> float:
        pruned = slim_model(copy.deepcopy(model), masks, adapter)
        reconstruct(pruned, model, batches, "weights", 1e-3, adapter, progress=False, refit_convs=False, inputs=inputs, masks=masks)
        with torch.no_grad():
            return float(kl_loss([adapter.kl_outputs(scoring_forward(model, b), b) for b in batches],
                                 [adapter.kl_outputs(scoring_forward(pruned, b), b) for b in batches], 1.0))

    assert cut.loss[2] == pytest.approx(refit_kl(True), rel=1e-6)
    assert cut.loss[2] != pytest.approx(refit_kl(False), rel=1e-3)
