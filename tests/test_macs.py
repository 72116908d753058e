import re

import pytest
import torch
from tiny import ARCHS, is_vision, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from optin_hf import count_macs
from optin_hf.arch import get_adapter
from test_slim import random_masks

from optin_hf.slim import slim_model

LAYER = re.compile(r"\.layers?\.\d+$")


def flop_counter_macs(model, seq_len: int) -> float:
    """Independent count: torch's FLOP counter over the encoder layers (+ patch embedding), /2."""
    inputs = (
        {"pixel_values": torch.randn(1, 3, 16, 16)}
        if is_vision(model.config.model_type)
        else {"input_ids": torch.randint(5, 100, (1, seq_len))}
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    flops = sum(v for k, v in counts.items() if LAYER.search(k) or k.endswith("patch_embeddings.projection"))
    return flops / 2


@pytest.mark.parametrize("slim", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_count_macs_matches_torch_flop_counter(arch, slim):
    model = tiny_model(arch, attn="eager")
    if slim:
        slim_model(model, random_masks(model))
    seq_len = get_adapter(model).default_seq_len(model.config) or 11
    assert count_macs(model, seq_len) == pytest.approx(flop_counter_macs(model, seq_len), rel=1e-9)


def test_text_model_needs_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        count_macs(tiny_model("bert"))
