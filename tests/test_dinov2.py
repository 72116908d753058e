"""DINOv2 (optin_hf/arch/dinov2.py): what is its own. The conformance suite checks the rest on `tiny.tiny_dinov2`."""

from __future__ import annotations

import pytest
from transformers import Dinov2Config, Dinov2ForImageClassification

from optin_hf import OptinConfig, OptinPruner


def test_the_swiglu_variant_is_refused_naming_its_config_field():
    """The giant model's gated FFN has no fc1/fc2: refused up front by its config field, not as a missing module."""
    config = Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          use_swiglu_ffn=True)
    model = Dinov2ForImageClassification(config).eval()
    with pytest.raises(ValueError, match=r"use_swiglu_ffn=True .* not supported.*use_swiglu_ffn=False"):
        OptinPruner(OptinConfig(mac_constraint=0.6)).prune_model(model, [])
