"""Swin (optin_hf/arch/swin.py): stages of different widths scored, allocated, slimmed, counted and saved."""

from __future__ import annotations


import pytest
import torch
from transformers import SwinConfig, SwinForImageClassification

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.engine.run import engine_for
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model
from test_masks import same
from tiny import flop_macs, random_images, scores_by_criterion

SETTINGS = dict(mac_constraint=0.6, reconstruct="none", num_samples=4, batch_size=2, neuron_group_size=16)


def tiny_swin(seed: int = 0) -> SwinForImageClassification:
    torch.manual_seed(seed)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        num_labels=5, initializer_range=0.2)
    model = SwinForImageClassification(config)
    model.config._attn_implementation = "eager"  # the CPU sdpa kernel is invisible to the FLOP counter
    for stage in model.swin.encoder.layers:  # a trained model's bias tables are not zero
        for block in stage.blocks:
            torch.nn.init.normal_(block.attention.relative_position_bias.relative_position_bias_table, std=1.0)
    return model.eval()


images = random_images


PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def encoder_macs(model) -> float:
    """Torch's count of the encoder's matmuls and convs, in MACs (FLOPs / 2), for one image."""
    return flop_macs(model.swin, PIXELS[:1])


@pytest.fixture(scope="module")
def scored():
    """Each criterion's scores of one tiny Swin (optin on the reference engine)."""
    return scores_by_criterion(tiny_swin(), images(4, 1), SETTINGS)


def test_layers_have_their_stage_geometry():
    model = tiny_swin()
    adapter = check_model(model)
    geometry = adapter.layer_geometry(model.config)
    assert [(g.heads, g.head_dim, g.hidden, g.neurons) for g in geometry] == [(2, 8, 16, 64)] * 2 + [(4, 8, 32, 128)] * 2
    assert len(adapter.layers_of(model)) == 4
    full = PruningMasks.full(model.config)
    assert full.head_counts.tolist() == [2, 2, 4, 4] and full.neuron_counts.tolist() == [64, 64, 128, 128]
    assert full.heads_per_layer() == [2, 2, 4, 4]


def test_count_macs_equals_the_flop_counter_dense_and_slim():
    model = tiny_swin()
    assert count_macs(model) == encoder_macs(model)
    masks = PruningMasks.full(model.config)
    masks.head_mask[0] = False  # a layer with no head
    masks.head_mask[2, [0, 3]] = False
    masks.neuron_mask[1, 5:] = False
    masks.neuron_mask[3] = False  # and one with no neuron
    slim_model(model, masks)
    assert count_macs(model) == encoder_macs(model)
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(model, seq_len=50)


def test_the_fast_engine_falls_back_to_the_reference_one():
    model = tiny_swin()
    assert engine_for(model, check_model(model), OptinConfig(engine="fast")) == "reference"


@pytest.mark.parametrize("importance", ["optin", "magnitude", "random"])
def test_score_allocate_slim_save_load(importance, scored, tmp_path):
    model = tiny_swin()
    scores = scored[importance]
    assert scores.head_scores.shape == (4, 4) and scores.neuron_scores.shape == (4, 128)
    assert not scores.head_scores[:2, 2:].any() and not scores.neuron_scores[:2, 64:].any()  # padding is not scored
    assert scores.head_scores[:, :2].all() and scores.neuron_scores[:, :64].all()
    pruner = OptinPruner(OptinConfig(importance=importance, **SETTINGS))
    masks = pruner.compute_masks(model, scores=scores)
    assert masks.head_counts.tolist() == [2, 2, 4, 4]
    assert masks.neurons_per_layer() != [64, 64, 128, 128]

    dense = count_macs(model)
    with apply_masks(model, check_model(model), masks.head_mask.float(), masks.neuron_mask.float()):
        masked = model(**{"pixel_values": PIXELS}).logits
    pruner.prune_model(model, masks=masks)
    slim = model(pixel_values=PIXELS).logits
    assert (slim - masked).abs().max() < 1e-4
    macs = count_macs(model)
    assert macs == encoder_macs(model)
    assert 0.98 * 0.6 * dense <= macs <= 0.6 * dense

    pruner.save(model, tmp_path / "swin")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "swin")
    loaded.config._attn_implementation = "eager"
    assert type(loaded) is SwinForImageClassification
    assert torch.equal(loaded(pixel_values=PIXELS).logits, slim)
    assert same(PruningMasks.load(tmp_path / "swin" / "optin_masks.safetensors"), masks)


def test_a_head_keeps_its_column_of_the_relative_position_bias_table():
    model = tiny_swin()
    block = model.swin.encoder.layers[1].blocks[1]  # the 4-head stage's shifted-window block
    table = block.attention.relative_position_bias.relative_position_bias_table.detach().clone()
    masks = PruningMasks.full(model.config)
    masks.head_mask[3, [0, 2]] = False
    slim_model(model, masks)
    assert torch.equal(block.attention.relative_position_bias.relative_position_bias_table, table[:, [1, 3]])
    assert block.attention.num_attention_heads == 2


def test_reconstruction_is_refused_before_scoring():
    model = tiny_swin()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, reconstruct="weights"))
    with pytest.raises(ValueError, match=r"swin adapter does not give: prune it with OptinConfig\(reconstruct='none'\)"):
        pruner.prune_model(model, images(2, 1))
    assert pruner.scores is None


def test_token_pruning_is_refused():
    with pytest.raises(ValueError, match="needs a vit or deit model, not 'swin'"):
        OptinPruner(OptinConfig(prune_tokens=True, reconstruct="none")).compute_scores(tiny_swin(), images(2, 1))
