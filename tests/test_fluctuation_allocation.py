"""optin_hf/fluctuation_allocation.py (`allocation="fluctuation"`): the uniform split's heads in every layer, the
neurons spread over layers by FLAP's standardized fluctuation within a band, read at 0.8 of the MACs and scaled to
the budget's uniform count, on a tiny Llama with grouped KV heads."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import family, tiny_llm

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
from optin_hf.arch.capabilities import Capabilities
from optin_hf.data import prepare_calibration
from optin_hf.fluctuation_allocation import SHAPE_AT, scaled_counts
from optin_hf.importance.flap import standardized_fluctuation
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = family("llama")
SETTINGS = {**LLAMA.settings, "num_samples": 6, "neurons_multiple_of": 1, "mac_constraint": SHAPE_AT}
DATA = LLAMA.examples(8, 1)


def masks_of(model, **settings):
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, **settings}))
    return pruner, pruner.compute_masks(model, DATA)


def fluctuation(model) -> torch.Tensor:
    """[layers, neurons]: each neuron's standardized fluctuation on the scoring's examples, computed apart."""
    batches = prepare_calibration(DATA, num_samples=SETTINGS["num_samples"], batch_size=8, max_length=64)
    return torch.stack(standardized_fluctuation(model, check_model(model), batches)[1])


def test_at_the_shapes_budget_the_neurons_follow_one_fluctuation_threshold():
    """Unbanded, at the budget the shape is read at, the neuron counts are what one threshold of the standardized
    fluctuation across all layers keeps (every layer's weakest kept neuron is above every layer's strongest dropped
    one), the heads are the uniform search's in every layer, and the MACs fill the budget."""
    model = tiny_llm("llama")
    _, uniform = masks_of(model, uniform_layers=True)
    pruner, masks = masks_of(model, allocation="fluctuation", allocation_band=1.0)
    assert masks.head_mask.sum(1).tolist() == uniform.head_mask.sum(1).tolist()
    counts = masks.neuron_mask.sum(1)
    assert len(set(counts.tolist())) > 1  # the layers differ: not the uniform counts again
    ranked = fluctuation(model).sort(dim=1, descending=True).values
    weakest_kept = torch.stack([ranked[i, c - 1] for i, c in enumerate(counts.tolist()) if c > 0])
    strongest_dropped = torch.stack([ranked[i, c] for i, c in enumerate(counts.tolist()) if c < ranked.shape[1]])
    assert weakest_kept.min() >= strongest_dropped.max()
    dense = count_macs(model, pruner.seq_len)
    slim = slim_model(copy.deepcopy(model), masks)
    assert SHAPE_AT - 0.03 <= count_macs(slim, pruner.seq_len) / dense <= SHAPE_AT


def test_a_deeper_budget_scales_the_shape_to_its_uniform_split():
    """At 0.5 of the MACs each layer keeps the shape read at SHAPE_AT scaled to 0.5's uniform split: the same heads
    and the same total of neurons as that split (so its MACs), in the shape's proportions (within one neuron)."""
    model = tiny_llm("llama")
    _, shape = masks_of(model, allocation="fluctuation", allocation_band=1.0)
    _, uniform = masks_of(model, uniform_layers=True, mac_constraint=0.5)
    pruner, masks = masks_of(model, allocation="fluctuation", allocation_band=1.0, mac_constraint=0.5)
    assert masks.head_mask.sum(1).tolist() == uniform.head_mask.sum(1).tolist()
    counts, total = masks.neuron_mask.sum(1), int(uniform.neuron_mask.sum())
    assert int(counts.sum()) == total
    exact = shape.neuron_mask.sum(1).double() * total / float(shape.neuron_mask.sum())
    assert (counts - exact).abs().max() < 1
    slim = slim_model(copy.deepcopy(model), masks)
    assert count_macs(slim, pruner.seq_len) <= 0.5 * count_macs(model, pruner.seq_len)


def test_scaled_counts_keep_the_total_the_multiple_and_the_width():
    counts = scaled_counts(torch.tensor([1304, 1304, 696, 1000]), 4 * 464, 1536, 8)
    assert int(counts.sum()) == 4 * 464 and (counts % 8 == 0).all() and (counts <= 1536).all()
    exact = torch.tensor([1304, 1304, 696, 1000]) * 4 * 464 / 4304
    assert (counts - exact).abs().max() < 8
    full = scaled_counts(torch.tensor([10, 0]), 16, 12)  # more than a layer holds goes to the others
    assert full.tolist() == [12, 4]


def test_the_band_bounds_each_layers_count_around_the_uniform_one():
    """allocation_band=b keeps every layer within round(b x 48) neurons of the uniform split's count; the unbanded
    allocation goes past that bound on this model, so the band is what holds it."""
    model = tiny_llm("llama")
    _, uniform = masks_of(model, uniform_layers=True)
    n = int(uniform.neuron_mask.sum(1)[0])
    _, free = masks_of(model, allocation="fluctuation", allocation_band=1.0)
    _, banded = masks_of(model, allocation="fluctuation", allocation_band=0.03)
    slack = round(0.03 * 48)  # 1
    assert (free.neuron_mask.sum(1) - n).abs().max() > slack
    assert (banded.neuron_mask.sum(1) - n).abs().max() <= slack
    assert banded.neuron_mask.sum(1).tolist() != [n] * 3


def test_each_layer_keeps_its_best_units_by_the_criterions_scores():
    """The fluctuation only counts: which neurons and heads a layer keeps is the criterion's choice (selection
    'scores'), so the kept ones are each layer's top ones by OPTIN's scores."""
    model = tiny_llm("llama")
    pruner, masks = masks_of(model, allocation="fluctuation", allocation_band=1.0)
    for scores, mask in ((pruner.scores.head_scores, masks.head_mask), (pruner.scores.neuron_scores, masks.neuron_mask)):
        for row, kept in zip(scores, mask):
            if 0 < kept.sum() < len(kept):
                assert row[kept].min() >= row[~kept].max()


def test_a_fluctuation_allocation_with_the_refit_selection_meets_its_budget_and_slims_as_masked():
    model = tiny_llm("llama")
    dense = copy.deepcopy(model)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "allocation": "fluctuation", "selection": "refit", "reconstruct": "weights"}))
    pruner.prune_model(model, DATA)
    assert count_macs(model, pruner.seq_len) <= SHAPE_AT * count_macs(dense, pruner.seq_len)
    assert pruner.timings["allocation_s"] > 0
    assert len(set(pruner.masks.neuron_mask.sum(1).tolist())) > 1


@pytest.mark.parametrize("settings, message", [
    ({"allocation_band": 0.3}, "allocation='fluctuation'"),
    ({"allocation": "fluctuation", "allocation_band": -0.1}, "finite fraction >= 0"),
    ({"allocation": "fluctuation", "allocation_band": float("nan")}, "finite"),
    ({"allocation": "fluctuation", "uniform_layers": True}, "uniform_layers"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        OptinConfig(**settings)


def test_a_model_whose_layers_differ_is_refused_with_the_fix():
    """Swin's stages differ in heads and neurons: there is no split common to every layer to start from."""
    swin = family("swin")
    pruner = OptinPruner(OptinConfig(**{**swin.settings, "allocation": "fluctuation"}))
    with pytest.raises(ValueError, match="allocation='fluctuation'.*layers differ.*allocation='scores'"):
        pruner.compute_masks(swin.build(), swin.examples(4, 1))


@pytest.mark.parametrize("name", ["bert", "distilbert", "vit", "dinov2", "gpt2", "qwen3"])
def test_every_family_with_equal_layers_takes_it_and_meets_its_budget(name):
    """Encoders, vision transformers and the other decoders take it too: one threshold of FLAP's fluctuation spreads
    their neurons, and the slim model meets the budget."""
    chosen = family(name)
    model = chosen.build()
    pruner = OptinPruner(OptinConfig(**{**chosen.settings, "allocation": "fluctuation", "neurons_multiple_of": 1}))
    masks = pruner.compute_masks(model, chosen.examples(4, 1))
    slim = slim_model(copy.deepcopy(model), masks)
    macs = count_macs(slim, chosen.seq_len) / count_macs(model, chosen.seq_len)
    assert 0.55 <= macs <= chosen.settings["mac_constraint"] + 1e-6


@pytest.mark.parametrize("name, expected", [("llama", "fluctuation"), ("qwen2", "fluctuation"), ("gpt2", "scores"),
                                            ("bert", "scores")])
def test_the_default_allocation_is_the_familys_own_and_the_config_names_it(name, expected, tmp_path):
    """allocation="auto" (the default) runs the family's declared allocation: the very masks of naming it, and the
    pruner's config, and so the saved one, name what ran."""
    chosen = family(name)
    settings = {**chosen.settings, "neurons_multiple_of": 1}
    assert OptinConfig(**settings).allocation == "auto"
    data = chosen.examples(4, 1)
    default, named = OptinPruner(OptinConfig(**settings)), OptinPruner(OptinConfig(**settings, allocation=expected))
    masks = default.compute_masks(chosen.build(), data)
    assert same(masks, named.compute_masks(chosen.build(), data))
    assert default.config.allocation == expected
    model = chosen.build()
    default.prune_model(model, data, masks=masks)
    default.save(model, tmp_path / "pruned")
    assert OptinConfig.from_pretrained(tmp_path / "pruned").allocation == expected


@pytest.mark.parametrize("settings", [{"uniform_layers": True}, {"prune_neurons": False},
                                      {"prune_steps": 2, "reconstruct": "weights"}])
def test_the_default_allocation_is_the_scores_where_the_settings_rule_a_per_layer_one_out(settings):
    """Settings that a per-layer allocation refuses (or leave the fluctuation no neurons to spread) take the scores'
    search under "auto" on a Llama, where naming "fluctuation" would be refused."""
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, **settings}))
    masks = pruner.compute_masks(tiny_llm("llama"), DATA)
    assert pruner.config.allocation == "scores"
    assert same(masks, OptinPruner(OptinConfig(**{**SETTINGS, **settings, "allocation": "scores"})).compute_masks(tiny_llm("llama"), DATA))


def same(a, b) -> bool:
    return torch.equal(a.head_mask, b.head_mask) and torch.equal(a.neuron_mask, b.neuron_mask)


def test_a_family_declares_a_known_allocation_and_the_refit_s_only_with_a_refit():
    with pytest.raises(ValueError, match="'scores', 'fluctuation' or 'refit'"):
        Capabilities(allocation="uniform")
    with pytest.raises(ValueError, match="counts units by the loss the refit leaves: declare repairs=\\('weights', ...\\)"):
        Capabilities(allocation="refit", repairs=("batchnorm",))
    assert Capabilities(allocation="refit", repairs=("batchnorm", "weights")).allocation == "refit"
