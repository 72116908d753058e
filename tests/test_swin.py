"""Swin (optin_hf/arch/swin.py): what is Swin's own. What every family does (geometry, MACs, slim == masked, save
and reload, the fast engine's fallback) is tests/test_conformance.py's."""

from __future__ import annotations

import pytest
import torch

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
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


def test_the_attention_output_goes_from_shifted_padded_windows_back_to_token_order():
    """A 40x40 image makes a 10x10 first-stage map, padded to 12x12 for the 4x4 windows, which the second block
    shifts by 2. The attention output projection's rows in token order (`token_order`, what the refit pairs with
    the residual) added to the layer input are the FFN's input, as the layer computes it."""
    model = tiny_swin()
    block = model.swin.encoder.layers[0].blocks[1]
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], call=(args[1:], kwargs)), with_kwargs=True),
        block.attention.o_proj.register_forward_hook(lambda m, args, out: seen.update(y=out)),
        block.layernorm_after.register_forward_pre_hook(lambda m, args: seen.update(r=args[0])),
    ]
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)))
    for handle in handles:
        handle.remove()
    assert block.shift_size == 2 and seen["y"].shape == (2 * 9, 16, 16)  # 9 windows of 16 rows an image
    args, kwargs = seen["call"]
    ordered = check_model(model).token_order(block, seen["y"], *args, **kwargs)
    assert ordered.shape == (2, 100, 16)  # the padding dropped
    torch.testing.assert_close(seen["x"] + ordered, seen["r"])


def test_token_pruning_is_refused():
    with pytest.raises(ValueError, match="needs a vit or deit model, not 'swin'"):
        OptinPruner(OptinConfig(prune_tokens=True, reconstruct="none")).compute_scores(tiny_swin(), images(2, 1))
