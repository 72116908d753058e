"""Swin (optin_hf/arch/swin.py): what is Swin's own. What every family does (geometry, MACs, slim == masked, save
and reload, the fast engine's fallback) is tests/test_conformance.py's."""

from __future__ import annotations

import pytest
import torch

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.slim import slim_model
from tiny import random_images as images, tiny_swin


def test_a_seq_len_other_than_its_image_size_is_refused():
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(tiny_swin(), seq_len=50)


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
