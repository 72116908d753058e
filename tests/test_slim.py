import pytest
import torch
from tiny import ARCHS, batch, output, tiny_model

from optin_hf import PruningMasks, count_macs
from optin_hf.arch import get_adapter
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model


def random_masks(model, seed=0) -> PruningMasks:
    """Random masks with one layer keeping no head and one keeping no neuron."""
    full = PruningMasks.full(model.config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(full.head_mask.shape, generator=g) > 0.4
    neurons = torch.rand(full.neuron_mask.shape, generator=g) > 0.5
    heads[0] = False
    neurons[1] = False
    heads[2, 1] = True
    return PruningMasks(heads, neurons)


# Eager attention on every family's task model is tests/test_conformance.py's: here the other kernel and the bare encoder.
@pytest.mark.parametrize(("arch", "attn"), [*((arch, "sdpa") for arch in ARCHS), ("bert-encoder", "eager"), ("bert-encoder", "sdpa")])
def test_slim_outputs_equal_masked_dense(arch, attn):
    model = tiny_model(arch, attn=attn)
    masks = random_masks(model)
    inputs = batch(arch)
    dense = output(model, inputs)
    with apply_masks(model, get_adapter(model), masks.head_mask.float(), masks.neuron_mask.float()):
        masked = output(model, inputs)
    assert (masked - dense).abs().max() > 1e-3  # the masks really change the model
    slim = slim_model(model, masks)
    assert (output(slim, inputs) - masked).abs().max() < 1e-4


def test_slim_model_macs_drop_with_masks():
    model = tiny_model("bert")
    base = count_macs(model, 10)
    masks = random_masks(model)
    slim_model(model, masks)
    assert count_macs(model, 10) < base


def test_masks_that_do_not_fit_are_refused():
    model = tiny_model("bert")
    bad = PruningMasks(torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 48, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not fit"):
        slim_model(model, bad)
    assert get_adapter(model).kept_heads(get_adapter(model).layers_of(model)[0], model.config) == 4
