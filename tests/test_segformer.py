"""SegFormer (optin_hf/arch/segformer.py): stages of different widths, efficient attention on a
reduced key/value map, Mix-FFN channels with their depthwise conv; scored, allocated, slimmed,
counted and saved."""

from __future__ import annotations

import pytest
import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.engine.run import engine_for
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model
from test_masks import same
from tiny import flop_macs, random_images, scores_by_criterion

SETTINGS = dict(mac_constraint=0.6, reconstruct="none", num_samples=4, batch_size=2, neuron_group_size=8, md_tokens=64,
                neurons_multiple_of=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_segformer(seed: int = 0, num_labels: int = 4) -> SegformerForSemanticSegmentation:
    """Two stages: 1 head of 8 (keys and values on a map reduced 2x2), then 2 heads of 8; FFNs 32 wide."""
    torch.manual_seed(seed)
    config = SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 2], decoder_hidden_size=16, num_labels=num_labels,
        initializer_range=0.2, drop_path_rate=0.0,
    )
    model = SegformerForSemanticSegmentation(config)
    model.config._attn_implementation = "eager"  # the CPU sdpa kernel is invisible to the FLOP counter
    return model.eval()


images = random_images


PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS).logits


def encoder_macs(model) -> float:
    """Torch's count of the encoder's matmuls and convs, in MACs (FLOPs / 2), for one image."""
    return flop_macs(model.segformer, PIXELS[:1])


@pytest.fixture(scope="module")
def scored():
    """Each criterion's scores of one tiny SegFormer (optin on the reference engine)."""
    return scores_by_criterion(tiny_segformer(), images(4, 1), SETTINGS)


def test_layers_have_their_stage_geometry():
    model = tiny_segformer()
    adapter = check_model(model)
    geometry = adapter.layer_geometry(model.config)
    assert [(g.heads, g.head_dim, g.hidden, g.neurons) for g in geometry] == [(1, 8, 8, 32)] + [(2, 8, 16, 32)] * 2
    assert len(adapter.layers_of(model)) == 3
    full = PruningMasks.full(model.config)
    assert full.head_counts.tolist() == [1, 2, 2] and full.heads_per_layer() == [1, 2, 2]
    assert adapter.default_seq_len(model.config) == 64  # 32x32 image, stride-4 patches


def test_head_and_neuron_macs_follow_the_reduced_key_value_map():
    """Stage 0: 8x8 tokens, keys and values on 4x4; stage 1: 4x4 tokens, no reduction."""
    config = tiny_segformer().config
    adapter = check_model(tiny_segformer())
    n, nr, d, dh = 64, 16, 8, 8
    assert adapter.head_macs(64, config, 0) == n * d * dh + 2 * nr * d * dh + 2 * n * nr * dh + n * dh * d
    assert adapter.neuron_macs(64, config, 0) == 2 * n * d + 9 * n
    n, d = 16, 16
    assert adapter.head_macs(64, config, 2) == 4 * n * d * dh + 2 * n * n * dh
    assert adapter.neuron_macs(64, config, 2) == 2 * n * d + 9 * n


def test_count_macs_equals_the_flop_counter_dense_and_slim():
    model = tiny_segformer()
    assert count_macs(model) == encoder_macs(model)
    masks = PruningMasks.full(model.config)
    masks.head_mask[0] = False  # a layer with no head drops its spatial-reduction conv too
    masks.head_mask[2, 1] = False
    masks.neuron_mask[1, 5:] = False
    masks.neuron_mask[2] = False  # and one with no FFN channel
    slim_model(model, masks)
    assert count_macs(model) == encoder_macs(model)
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(model, seq_len=50)


def test_the_geometry_follows_num_encoder_blocks_not_the_list_lengths():
    """The encoder builds num_encoder_blocks stages from the lists' first entries (the model runs with longer
    lists): the layers, the masks and the MACs are those stages', so pruning counts what it runs."""
    torch.manual_seed(0)
    config = SegformerConfig(image_size=32, num_encoder_blocks=2, depths=[1, 2, 2, 2], sr_ratios=[2, 1, 1, 1],
                             hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 2, 4, 8], mlp_ratios=[4, 2, 2, 2],
                             decoder_hidden_size=16, num_labels=4)
    model = SegformerForSemanticSegmentation(config).eval()
    model.config._attn_implementation = "eager"
    assert PruningMasks.full(model.config).head_mask.shape == (3, 2) == (len(check_model(model).layers_of(model)), 2)
    assert count_macs(model) == encoder_macs(model)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "importance": "magnitude"}))
    dense = count_macs(model)
    pruner.prune_model(model, images(2, 1))
    assert count_macs(model) == encoder_macs(model) <= 0.6 * dense


def test_a_config_without_image_size_is_refused_with_the_fix():
    model = tiny_segformer()
    del model.config.image_size
    with pytest.raises(ValueError, match="set model.config.image_size"):
        count_macs(model)


def test_a_channel_keeps_its_depthwise_conv_filter():
    model = tiny_segformer()
    mlp = model.segformer.stages[1].blocks[0].mlp
    filters = mlp.dwconv.dwconv.weight.detach().clone()
    masks = PruningMasks.full(model.config)
    masks.neuron_mask[1, [0, 5, 6]] = False
    slim_model(model, masks)
    kept = [i for i in range(32) if i not in (0, 5, 6)]
    assert mlp.dwconv.dwconv.groups == 29 and torch.equal(mlp.dwconv.dwconv.weight, filters[kept])
    assert mlp.fc1.out_features == 29 and mlp.fc2.in_features == 29
    # the spatial reduction belongs to keys and values: a head removed leaves it whole
    attention = model.segformer.stages[0].blocks[0].attention
    assert attention.sequence_reduction.sequence_reduction.weight.shape == (8, 8, 2, 2)


def test_the_fast_engine_falls_back_to_the_reference_one():
    model = tiny_segformer()
    assert engine_for(model, check_model(model), OptinConfig(engine="fast")) == "reference"


@pytest.mark.parametrize("importance", ["optin", "magnitude", "random"])
def test_score_allocate_slim_save_load(importance, scored, tmp_path):
    model = tiny_segformer()
    scores = scored[importance]
    assert scores.head_scores.shape == (3, 2) and scores.neuron_scores.shape == (3, 32)
    assert not scores.head_scores[0, 1:].any()  # padding of the 1-head layer is not scored
    assert scores.head_scores[1:].all() and scores.neuron_scores.all()
    pruner = OptinPruner(OptinConfig(importance=importance, **SETTINGS))
    masks = pruner.compute_masks(model, scores=scores)
    assert masks.head_counts.tolist() == [1, 2, 2]

    dense = count_macs(model)
    with apply_masks(model, check_model(model), masks.head_mask.float(), masks.neuron_mask.float()):
        masked = logits(model)
    pruner.prune_model(model, masks=masks)
    slim = logits(model)
    assert slim.shape == (3, 4, 8, 8)
    assert (slim - masked).abs().max() < 1e-4
    macs = count_macs(model)
    assert macs == encoder_macs(model)
    # The budget counts every spatial-reduction conv; one whose layer kept no head no longer runs.
    unrun = check_model(model).fixed_macs(tiny_segformer()) - check_model(model).fixed_macs(model)
    assert 0.98 * 0.6 * dense - unrun <= macs <= 0.6 * dense

    pruner.save(model, tmp_path / "segformer")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "segformer")
    loaded.config._attn_implementation = "eager"
    assert type(loaded) is SegformerForSemanticSegmentation
    assert torch.equal(logits(loaded), slim)
    assert same(PruningMasks.load(tmp_path / "segformer" / "optin_masks.safetensors"), masks)


def test_optin_scores_see_the_per_pixel_kl():
    """The KL term is live: a head of the last layer (judged by its own output's MD and the logits) moves them."""
    from optin_hf.capture import capture_dense
    from optin_hf.engine.reference import masked_run_losses

    model = tiny_segformer()
    adapter = check_model(model)
    batches = [{"pixel_values": torch.stack([x["pixel_values"] for x in images(2, 1)])}]
    capture = capture_dense(model, adapter, batches, md_tokens=32, seed=0)
    assert capture.logits.shape == (2, 4, 8, 8)
    mask = torch.ones(3, 2)
    mask[2, 0] = 0
    with apply_masks(model, adapter, head_mask=mask):
        md, kl = masked_run_losses(model, adapter, batches, capture, 2, 4.0)
    assert md > 0 and kl > 0


def test_reconstruction_is_refused_before_scoring():
    model = tiny_segformer()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, reconstruct="weights"))
    with pytest.raises(ValueError, match=r"segformer adapter does not give: prune it with OptinConfig\(reconstruct='none'\)"):
        pruner.prune_model(model, images(2, 1))
    assert pruner.scores is None
