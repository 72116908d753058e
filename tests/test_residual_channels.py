"""Coupled residual channels (`OptinConfig.prune_channels`, ResNet): a channel tied by a stage's residual adds is
one unit, removed from the stem or every block output of its stages, their shortcut convs and their readers."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import pytest
import torch
from tiny import family
from transformers import ResNetConfig

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.allocate import allocate
from optin_hf.arch import check_model
from optin_hf.arch.resnet import RESNET, channel_groups
from optin_hf.channel_search import SHARES, allocate_with_channels
from optin_hf.checkpoint import save_pruned
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.importance.residual_channels import residual_channel_scores, zero_channel
from optin_hf.macs import CostModel
from optin_hf.reconstruct import reconstruct
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = family("resnet")
IMAGE = (32, 32)  # its config's image size


def channel_masks(model, seed: int = 0) -> PruningMasks:
    """About half of every residual group kept (at least one each), heads and neurons all kept."""
    widths = check_model(model).channel_widths(model.config)
    keep = torch.rand(sum(widths), generator=torch.Generator().manual_seed(seed)) > 0.5
    start = 0
    for width in widths:
        keep[start] = True
        start += width
    return dataclasses.replace(PruningMasks.full(model.config), channel_mask=keep)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**TINY.inputs).logits


def test_groups_follow_the_shortcuts():
    # the tiny model: a 4-wide stem, then stages of 32 and 64 each behind a shortcut conv: three groups
    assert channel_groups(TINY.build().config) == [0, 1, 2]
    assert RESNET.channel_widths(TINY.build().config) == (4, 32, 64)
    # a stem as wide as the first stage, which does not downsample, is added as it is: one group
    tied = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
    assert channel_groups(tied) == [0, 0, 1] and RESNET.channel_widths(tied) == (16, 32)


def test_the_slim_model_computes_the_masked_one_and_counts_its_macs():
    model = TINY.build()
    adapter, masks = check_model(model), channel_masks(model)
    widths = adapter.channel_widths(model.config)
    dense_logits = logits(model)
    with ExitStack() as stack:  # every removed channel zeroed wherever its group is carried
        for (carriers, _), keep, width in zip(adapter.channel_carriers(model), masks.channel_keeps(widths), widths):
            for channel in sorted(set(range(width)) - set(keep.tolist())):
                stack.enter_context(zero_channel(carriers, channel))
        masked = logits(model)
    assert (masked - dense_logits).abs().max() > 1e-3  # the channels matter
    dense_fixed = adapter.fixed_macs(model, IMAGE)
    predicted = CostModel.of(model).masked(masks)
    slim_model(model, masks)
    torch.testing.assert_close(logits(model), masked, atol=1e-5, rtol=1e-5)
    assert adapter.kept_channels(model) == masks.channels_per_group(widths)
    assert model.config.optin["channels_per_group"] == list(masks.channels_per_group(widths))
    assert count_macs(model, TINY.seq_len) == TINY.torch_macs(model) == predicted
    assert adapter.fixed_macs(model, IMAGE) < dense_fixed  # the stem and the shortcut convs shrank


def test_a_dead_channel_scores_nothing():
    """A channel that every block of its stage outputs as zero changes nothing when removed: score 0, where the
    same channel alive scores above it."""
    model = TINY.build()
    batches = [{"pixel_values": TINY.inputs["pixel_values"]}]
    widths = RESNET.channel_widths(model.config)
    alive = residual_channel_scores(model, check_model(model), batches, 64, 0, 4.0, 10.0)
    start = widths[0] + widths[1]
    own = int(alive[start:].argmax())  # the last stage's most important channel
    channel = start + own
    with torch.no_grad():
        for block in model.resnet.encoder.stages[1].layers:
            norms = [block.layer[2].normalization] + ([block.shortcut.normalization] if hasattr(block.shortcut, "normalization") else [])
            for norm in norms:
                norm.weight[own], norm.bias[own] = 0.0, -1.0  # ReLU(negative) = 0 in every output
    dead = residual_channel_scores(model, check_model(model), batches, 64, 0, 4.0, 10.0)
    assert dead.shape == (sum(widths),) and abs(dead[channel]) < 1e-9 < 1e-6 < alive[channel]


def costs_and_scores(channel_scale: float) -> tuple[CostModel, ImportanceScores]:
    model = TINY.build()
    costs = CostModel.of(model, image_size=IMAGE)
    full = costs.units
    g = torch.Generator().manual_seed(1)
    scores = ImportanceScores(torch.rand(full.head_mask.shape, generator=g), torch.rand(full.neuron_mask.shape, generator=g),
                              channel_scores=channel_scale * torch.rand(sum(RESNET.channel_widths(model.config)), generator=g))
    return costs, scores


@pytest.mark.parametrize("prefer", ["all", "fewest"])
def test_the_search_meets_the_budget_at_the_share_the_judge_prefers(prefer):
    costs, scores = costs_and_scores(1.0)
    budget = 0.6 * costs.dense()
    widths = RESNET.channel_widths(costs.config)
    judged = []

    def judge(masks: PruningMasks) -> float:
        judged.append(masks)
        kept = int(masks.channel_mask.sum())
        return -kept if prefer == "all" else kept

    masks = allocate_with_channels(scores, costs, costs.uniform()[0], budget, allocate, judge, units=costs.units,
                                   neurons_multiple_of=1)
    # every share for all groups, then the stem's alone at each share below the one chosen (none below the least)
    assert len(judged) == (2 * len(SHARES) - 1 if prefer == "all" else len(SHARES))
    # each under the budget, and close to it unless the residual widths left room for every head and neuron
    assert all(costs.masked(m) <= budget for m in judged)
    assert all(costs.masked(m) >= 0.98 * budget or (m.head_mask.sum(), m.neuron_mask.sum()) == (
        costs.units.head_mask.sum(), costs.units.neuron_mask.sum()) for m in judged)
    if prefer == "all":  # every channel kept: the masks of the search without channels
        plain = allocate(scores.head_scores, scores.neuron_scores, costs.at(costs.uniform()), budget, units=costs.units,
                         neurons_multiple_of=1)
        assert masks.channel_mask.all()
        assert torch.equal(masks.head_mask, plain.head_mask) and torch.equal(masks.neuron_mask, plain.neuron_mask)
    else:  # the least share of every group, its best channels by score
        assert masks.channels_per_group(widths) == tuple(max(1, round(min(SHARES) * w)) for w in widths)
        for keep, part in zip(masks.channel_keeps(widths), scores.channel_scores.split(list(widths))):
            assert set(keep.tolist()) == set(part.argsort(descending=True)[: len(keep)].tolist())


def test_the_stem_is_cut_apart_when_the_judge_prefers_it():
    """A judge that wants the stem narrow and the stages whole gets the least stem share with every stage channel."""
    costs, scores = costs_and_scores(1.0)
    widths = RESNET.channel_widths(costs.config)

    def judge(masks: PruningMasks) -> float:
        stem, *stages = masks.channels_per_group(widths)
        return stem - 10 * sum(stages)

    masks = allocate_with_channels(scores, costs, costs.uniform()[0], 0.9 * costs.dense(), allocate, judge,
                                   units=costs.units, neurons_multiple_of=1)
    assert masks.channels_per_group(widths) == (max(1, round(min(SHARES) * widths[0])), *widths[1:])


def test_prune_repair_save_and_reload(tmp_path):
    base = TINY.build()
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base").eval()
    pruner = OptinPruner(OptinConfig(**{**TINY.settings, "mac_constraint": 0.6, "prune_channels": True, "reconstruct": "batchnorm"}))
    model = pruner.prune_model(base, TINY.examples(16, 1))
    assert not pruner.masks.channel_mask.all() and pruner.scores.channel_scores is not None
    dense = type(base).from_pretrained(tmp_path / "base")
    assert count_macs(model) <= 0.6 * count_macs(dense, image_size=IMAGE) * (1 + 1e-9)
    # the repair re-estimates the means of the blocks whose input lost channels, even where no inner unit went
    assert pruner.reconstruction.tensors
    out = logits(model)
    for masks_only in (False, True):
        save_pruned(model, tmp_path / f"slim{masks_only}", masks_only=masks_only)
        loaded = AutoOptinModel.from_pretrained(tmp_path / f"slim{masks_only}")
        assert loaded.config.optin == model.config.optin
        torch.testing.assert_close(logits(loaded), out, atol=1e-5, rtol=1e-5)
    masks = PruningMasks.load(tmp_path / "slimFalse" / "optin_masks.safetensors")
    assert torch.equal(masks.channel_mask, pruner.masks.channel_mask)


def test_only_channels_pruned_is_repaired_too():
    """Masks that keep every head and neuron and cut residual channels (the stem's too): every block's input changed,
    so the BatchNorm repair refits the convs reading the cut channels and the classifier (`test_channel_refit`), then
    re-estimates the means of every block, from the first."""
    dense = TINY.build()
    model = slim_model(TINY.build(), channel_masks(dense))
    plain = logits(model)
    batches = prepare_calibration(TINY.examples(16, 1), num_samples=16, batch_size=8, max_length=64)
    repair = reconstruct(model, dense, batches, "batchnorm")
    assert {key.split(".")[1] for key in repair.tensors if key.startswith("layers.")} == {"0", "1", "2"}
    assert {"classifier.weight", "layers.0.layer.0.convolution.weight", "layers.2.shortcut.convolution.weight"} <= set(repair.tensors)
    means = [(before, after) for _, path, before, after in repair.errors if path not in ("layer.0", "shortcut", "classifier")]
    assert means and all(before > after == 0.0 for before, after in means)
    assert all(before > after for _, _, before, after in repair.errors)
    assert not torch.equal(logits(model), plain)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reconstruct": "scales"}, "reconstruct='scales' cannot repair the convs reading residual channels"),
        ({"importance": "magnitude"}, "prune_channels=True needs residual channel scores, and importance='magnitude'"),
    ],
)
def test_what_channels_cannot_run_with_is_refused_up_front(settings, message):
    pruner = OptinPruner(OptinConfig(**{**TINY.settings, "prune_channels": True, **settings}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pruner.prune_model(TINY.build(), TINY.examples(4, 1))
    assert pruner.scores is None


def test_config_refuses_channels_with_step_or_token_pruning():
    with pytest.raises(ValueError, match="prune_channels=True prunes residual widths in one step"):
        OptinConfig(prune_channels=True, prune_steps=2)


def test_masks_that_do_not_fit_are_refused():
    model = TINY.build()
    full = PruningMasks.full(model.config)
    with pytest.raises(ValueError, match="channel_mask has 3 channels"):
        dataclasses.replace(full, channel_mask=torch.ones(3, dtype=torch.bool)).check_fits(model.config)
    empty = torch.ones(100, dtype=torch.bool)
    empty[:4] = False  # the stem keeps none
    with pytest.raises(ValueError, match="every group keeps at least one"):
        dataclasses.replace(full, channel_mask=empty).check_fits(model.config)
    bert = family("bert").build()
    with pytest.raises(ValueError, match="which a bert model has none of"):
        dataclasses.replace(PruningMasks.full(bert.config), channel_mask=torch.ones(4, dtype=torch.bool)).check_fits(bert.config)
