"""The CNN repair, `reconstruct="batchnorm"` (optin_hf/reconstruct.py): a ResNet's BatchNorm running
means re-estimated on the slim model, saved and reloaded full and masks-only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model
from optin_hf.checkpoint import save_pruned
from optin_hf.reconstruct import apply_reconstruction, batch_norms
from optin_hf.slim import slim_model
from tiny import random_images as images, tiny_cnn, tiny_model

CALIBRATION = images(16, 1)
PIXELS = torch.stack([ex["pixel_values"] for ex in images(6, 9)])
SETTINGS = dict(reconstruct="batchnorm", reconstruct_samples=16, batch_size=4, neurons_multiple_of=1)


@torch.no_grad()
def trained_resnet() -> nn.Module:
    """The tiny ResNet with running statistics that are its own on the calibration images, as a trained
    network's are on its data: then the dense model's BatchNorms are centred and pruning is what moves them."""
    model = tiny_cnn("resnet")
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None
    model.train()
    model(pixel_values=torch.stack([ex["pixel_values"] for ex in CALIBRATION]))
    return model.eval()


def masks_of(model: nn.Module) -> PruningMasks:
    """Half the channels of every block go; the first block keeps all of its own (so its BatchNorms stay)."""
    masks = PruningMasks.full(model.config)
    masks.head_mask[1:, ::2] = False
    masks.neuron_mask[1:, 1::2] = False
    return masks


def pruned(repair: str, base: nn.Module | None = None) -> tuple[nn.Module, OptinPruner]:
    model = copy.deepcopy(base) if base is not None else trained_resnet()
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "reconstruct": repair}))
    pruner.prune_model(model, CALIBRATION if repair != "none" else None, masks=masks_of(model))
    return model, pruner


@torch.no_grad()
def bn_inputs(model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """Each BatchNorm of block `layer` -> the mean over the calibration images and positions of what it receives."""
    seen: dict[str, list] = {}
    norms = batch_norms(check_model(model).layers_of(model)[layer])
    handles = [norm.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0])) for name, norm in norms]
    model(pixel_values=torch.stack([ex["pixel_values"] for ex in CALIBRATION]))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs).double().mean(dim=(0, 2, 3)) for name, xs in seen.items()}


@torch.no_grad()
def feature_error(model: nn.Module, dense: nn.Module) -> float:
    """Squared distance of the encoder's pooled output to the dense model's, on the calibration images."""
    pixels = torch.stack([ex["pixel_values"] for ex in CALIBRATION])
    return float((model.base_model(pixel_values=pixels).pooler_output - dense.base_model(pixel_values=pixels).pooler_output).pow(2).sum())


def test_the_running_means_are_those_the_slim_model_meets_and_the_variances_stay():
    repaired, pruner = pruned("batchnorm")
    plain, _ = pruned("none")
    layers, plain_layers = check_model(repaired).layers_of(repaired), check_model(plain).layers_of(plain)
    for i in range(1, len(layers)):
        measured = bn_inputs(repaired, i)
        for name, norm in batch_norms(layers[i]):
            if norm.num_features:
                torch.testing.assert_close(norm.running_mean.double(), measured[name], atol=1e-5, rtol=1e-5)
                assert torch.equal(norm.running_var, dict(batch_norms(plain_layers[i]))[name].running_var)
    # the first block lost nothing: its statistics are the trained ones, not re-estimated
    for (_, norm), (_, before) in zip(batch_norms(layers[0]), batch_norms(plain_layers[0])):
        assert torch.equal(norm.running_mean, before.running_mean)
    assert {key.split(".")[1] for key in pruner.reconstruction.tensors} == {"1", "2"}
    assert all(before > after == 0.0 for _, _, before, after in pruner.reconstruction.errors)


def test_the_repair_brings_the_features_back_toward_the_dense_model():
    dense = trained_resnet()
    repaired, _ = pruned("batchnorm", dense)
    plain, _ = pruned("none", dense)
    assert feature_error(repaired, dense) < 0.5 * feature_error(plain, dense)


@pytest.mark.parametrize("masks_only", [False, True])
def test_save_and_load_reproduce_the_repaired_model(masks_only, tmp_path):
    base = trained_resnet()
    base.save_pretrained(tmp_path / "base")  # the base a masks-only checkpoint names
    base = type(base).from_pretrained(tmp_path / "base").eval()
    repaired, pruner = pruned("batchnorm", base)
    plain, _ = pruned("none", base)
    save_pruned(repaired, tmp_path / "slim", masks_only=masks_only)
    assert (tmp_path / "slim" / "optin_reconstruction.safetensors").is_file() == masks_only
    loaded = AutoOptinModel.from_pretrained(tmp_path / "slim")
    with torch.no_grad():
        out, reloaded, unrepaired = (m(pixel_values=PIXELS).logits for m in (repaired, loaded, plain))
    torch.testing.assert_close(reloaded, out, atol=1e-5, rtol=1e-5)
    assert (out - unrepaired).abs().max() > 1e-3  # the repair changed outputs, so the reload carried it
    # a loaded full checkpoint carries its running means, so it saves again as masks only
    save_pruned(loaded, tmp_path / "again", masks_only=True)
    with torch.no_grad():
        torch.testing.assert_close(AutoOptinModel.from_pretrained(tmp_path / "again")(pixel_values=PIXELS).logits, out, atol=1e-5, rtol=1e-5)


def test_running_means_of_other_masks_are_refused():
    repaired, pruner = pruned("batchnorm")
    other = slim_model(trained_resnet(), PruningMasks.full(repaired.config))
    with pytest.raises(ValueError, match=r"layers\.1\.layer\.0\.normalization\.running_mean has shape \(4,\) but the slim model needs \(8,\)"):
        apply_reconstruction(other, pruner.reconstruction.tensors)
    with pytest.raises(ValueError, match="'layers.1.nowhere.running_mean', which is not a reconstruction tensor"):
        apply_reconstruction(other, {"layers.1.nowhere.running_mean": torch.zeros(4)})


@pytest.mark.parametrize(("model", "fix"), [
    (lambda: tiny_cnn("convnext"), "reconstruct='none'"),
    (lambda: tiny_model("vit"), r"reconstruct='weights'\) \(or 'scales' or 'none'\)"),
])
def test_families_without_batchnorms_are_refused_with_the_fix(model, fix):
    with pytest.raises(ValueError, match=rf"reconstruct='batchnorm' re-estimates the running means of the BatchNorms.*adapter does not give: prune it with OptinConfig\({fix}"):
        OptinPruner(OptinConfig(reconstruct="batchnorm")).prune_model(model(), images(2, 1))


def test_a_resnet_refit_names_its_repair():
    with pytest.raises(ValueError, match=r"resnet adapter does not give: prune it with OptinConfig\(reconstruct='batchnorm'"):
        OptinPruner(OptinConfig(reconstruct="weights")).prune_model(tiny_cnn("resnet"), images(2, 1))


def test_batchnorm_repair_in_steps_is_refused():
    with pytest.raises(ValueError, match="reconstruct='batchnorm' does not give: set prune_steps=1"):
        OptinConfig(reconstruct="batchnorm", prune_steps=2)
