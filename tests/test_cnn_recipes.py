"""The digits-resnet and digit-scenes-segformer recipes' repair settings on tiny models of their families.

digits-resnet counts each block's channels by the loss left after the refit, in two measured rounds (ragged stages:
8 and 16 inner channels); digit-scenes-segformer also re-chooses the units at those counts by the refit's error. Both must meet
their budget, keep the counts the refit allocation chose, and record what ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import random_images, tiny_cnn, tiny_segformer

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
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
    model = tiny_cnn("resnet")
    dense = count_macs(model, image_size=32)
    pruner = OptinPruner(OptinConfig(**settings))
    pruner.prune_model(model, random_images(8, seed=3))
    assert count_macs(model) <= 0.6 * dense * (1 + 1e-9)
    config = pruning_result(model).config
    assert (config.allocation, config.allocation_rounds, config.reconstruct) == ("refit", 2, "weights")
    assert pruner.timings["allocation_s"] > 0
    adapter = check_model(model)
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
