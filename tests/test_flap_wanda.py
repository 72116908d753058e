"""FLAP and Wanda-sp as criteria (optin_hf/importance/flap.py, wanda.py), on a tiny Llama with grouped KV heads.
That they score every family is tests/test_families.py's `test_every_criterion_scores_every_family`."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import family, tiny_llm

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.macs import CostModel
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.importance.channels import input_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = family("llama")


def scores(model, importance: str, data=None, **settings):
    config = OptinConfig(**{**LLAMA.settings, "importance": importance, "num_samples": 6, **settings})
    return OptinPruner(config).compute_scores(model, data or LLAMA.examples(6, 1))


def test_channel_statistics_read_real_tokens_only():
    """Padding rows never enter the statistics: six examples padded into one batch give what six unpadded batches
    of one give."""
    model = tiny_llm("llama")
    adapter = check_model(model)
    examples = LLAMA.examples(6, 1)
    together = input_statistics(model, adapter, prepare_calibration(examples, num_samples=6, batch_size=6, max_length=64))
    apart = input_statistics(model, adapter, prepare_calibration(examples, num_samples=6, batch_size=1, max_length=64))
    assert together[0]["ffn_down"].count == sum(len(e["input_ids"]) for e in examples)
    for a, b in zip(together, apart, strict=True):
        for sub in ("attn_out", "ffn_down"):
            assert a[sub].count == b[sub].count
            torch.testing.assert_close(a[sub].total, b[sub].total, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a[sub].squares, b[sub].squares, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["flap", "wanda_sp"])
def test_a_silent_unit_scores_lowest_in_its_layer(importance):
    """An MLP channel whose gate and up rows are zero feeds down_proj a constant 0 (no fluctuation, no norm); a KV
    group whose o_proj columns are zero reaches nothing: each scores lowest among its layer's units."""
    model = tiny_llm("llama")
    layer = check_model(model).layers_of(model)[1]
    with torch.no_grad():
        layer.mlp.gate_proj.weight[5] = 0
        layer.mlp.up_proj.weight[5] = 0
        layer.self_attn.o_proj.weight[:, 16:32] = 0  # KV group 1: query heads 2 and 3, 8 features each
    result = scores(model, importance)
    assert int(result.neuron_scores[1].argmin()) == 5
    assert int(result.head_scores[1].argmin()) == 1
    assert result.neuron_scores[1, 5] < result.neuron_scores[1].median()


def test_flap_standardizes_each_layer_and_module_apart():
    """Scaling one layer's down projection leaves that layer's FLAP neuron scores where they were relative to each
    other: the fluctuation is standardized per layer and per module. All scores are non-negative, the least 0."""
    model = tiny_llm("llama")
    data = LLAMA.examples(6, 1)
    before = scores(model, "flap", data)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        check_model(scaled).layers_of(scaled)[2].mlp.down_proj.weight.mul_(10)
    after = scores(scaled, "flap", data)
    torch.testing.assert_close(after.neuron_scores[2] - after.neuron_scores[2].min(),
                               before.neuron_scores[2] - before.neuron_scores[2].min())
    assert min(float(before.head_scores.min()), float(before.neuron_scores.min())) == 0.0
    assert (before.head_scores >= 0).all() and (before.neuron_scores >= 0).all()


def test_wanda_sp_scores_are_quantiles_within_each_layer():
    result = scores(tiny_llm("llama"), "wanda_sp")
    for rows, units in ((result.head_scores, 2), (result.neuron_scores, 48)):
        for row in rows:
            assert sorted((row / row.max()).tolist()) == pytest.approx([k / units for k in range(1, units + 1)])


@pytest.mark.parametrize("importance", ["flap", "wanda_sp"])
def test_scores_are_per_unit_times_its_macs(importance):
    """Each score is the unit's own score times its MACs, so the budget search, which keeps the most summed score,
    keeps what lies above a threshold of the unit's own score, as FLAP and Wanda-sp do: a KV group (about 20x a
    channel's MACs here) is not dropped for its size alone. Each kind keeps its best, and Wanda-sp's quantiles
    cut every layer to within one unit of the same share."""
    model = tiny_llm("llama")
    pruner = OptinPruner(OptinConfig(**{**LLAMA.settings, "importance": importance, "neurons_multiple_of": 1,
                                        "allocation": "scores"}))  # FLAP's and Wanda-sp's own allocation
    masks = pruner.compute_masks(model, LLAMA.examples(6, 1))
    costs = CostModel.of(model).at([pruner.seq_len] * 3)
    assert float(costs.head[0]) > 15 * float(costs.neuron[0])
    for scores_, cost, mask in ((pruner.scores.head_scores, costs.head, masks.head_mask),
                                (pruner.scores.neuron_scores, costs.neuron, masks.neuron_mask)):
        own = scores_ / cost[:, None]
        assert own[mask].min() >= own[~mask].max()
    if importance == "wanda_sp":
        assert own.max() == 1.0  # a quantile
        for counts in (masks.heads_per_layer(), masks.neurons_per_layer()):
            assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("importance", ["flap", "wanda_sp"])
def test_each_prunes_a_tiny_llm_to_its_budget(importance):
    model = tiny_llm("llama")
    dense = copy.deepcopy(model)
    pruner = OptinPruner(OptinConfig(**{**LLAMA.settings, "importance": importance, "neurons_multiple_of": 1}))
    pruner.prune_model(model, LLAMA.examples(6, 1))
    ratio = count_macs(model, pruner.seq_len) / count_macs(dense, pruner.seq_len)
    assert 0.58 <= ratio <= 0.6
