"""SegFormer (optin_hf/arch/segformer.py): what is its own (efficient attention on a reduced key/value map, Mix-FFN
channels with their depthwise conv, the per-pixel KL). What every family does (geometry, MACs, slim == masked, save
and reload, the fast engine's fallback) is tests/test_conformance.py's."""

from __future__ import annotations

import pytest
import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.engine.run import engine_for
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model
from tiny import FAMILIES, PIXELS, flop_macs, tiny_segformer
from tiny import random_images as images

SETTINGS = FAMILIES["segformer"].settings


pytestmark = pytest.mark.usefixtures("one_thread")


def encoder_macs(model) -> float:
    """Torch's count of the encoder's matmuls and convs, in MACs (FLOPs / 2), for one image."""
    return flop_macs(model.segformer, PIXELS[:1])


def test_head_and_neuron_macs_follow_the_reduced_key_value_map():
    """Stage 0: 8x8 tokens, keys and values on 4x4; stage 1: 4x4 tokens, no reduction."""
    config = tiny_segformer().config
    adapter = check_model(tiny_segformer())
    assert adapter.default_seq_len(config) == 64  # 32x32 image, stride-4 patches
    n, nr, d, dh = 64, 16, 8, 8
    assert adapter.head_macs(64, config, 0) == n * d * dh + 2 * nr * d * dh + 2 * n * nr * dh + n * dh * d
    assert adapter.neuron_macs(64, config, 0) == 2 * n * d + 9 * n
    n, d = 16, 16
    assert adapter.head_macs(64, config, 2) == 4 * n * d * dh + 2 * n * n * dh
    assert adapter.neuron_macs(64, config, 2) == 2 * n * d + 9 * n


def test_a_seq_len_other_than_its_image_size_is_refused():
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(tiny_segformer(), seq_len=50)


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


def test_optin_scores_see_the_per_pixel_kl():
    """The KL term is live: a head of the last layer (judged by its own output's MD and the logits) moves them."""
    from optin_hf.capture import capture_dense
    from optin_hf.engine.reference import masked_run_losses

    model = tiny_segformer()
    adapter = check_model(model)
    batches = [{"pixel_values": torch.stack([x["pixel_values"] for x in images(2, 1)])}]
    capture = capture_dense(model, adapter, batches, md_tokens=32, seed=0)
    assert capture.outputs[0].logits.shape == (2, 64, 4)  # 8 x 8 pixels, each a position
    mask = torch.ones(3, 2)
    mask[2, 0] = 0
    with apply_masks(model, adapter, head_mask=mask):
        md, kl = masked_run_losses(model, adapter, batches, capture, 2, 4.0)
    assert md > 0 and kl > 0


def test_the_fast_engine_reads_the_map_height_and_width_from_each_layer_call():
    """On 24x40 images the maps are 6x10 then 3x5, so a layer piece that swapped or guessed the sides the Mix-FFN's
    depthwise conv runs on would not reproduce the dense run: the fast engine's scores are the reference's."""
    g = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(3, 24, 40, generator=g)} for _ in range(4)]
    model = tiny_segformer()
    assert engine_for(model, check_model(model), OptinConfig(engine="fast")) == "fast"
    scores = {
        engine: OptinPruner(OptinConfig(**{**SETTINGS, "importance": "optin", "engine": engine})).compute_scores(model, data)
        for engine in ("fast", "reference")
    }
    for name in ("head_scores", "neuron_scores"):
        torch.testing.assert_close(getattr(scores["fast"], name), getattr(scores["reference"], name), rtol=1e-4, atol=0)
