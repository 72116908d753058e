"""The link refit (`optin_hf.link_refit`): after the layers, the weights refit fits SegFormer's later patch-embedding
conv and its decode head's per-stage projections, which read a stage's output, to the dense modules' outputs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny import random_images, tiny_segformer

from optin_hf import PruningMasks
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.link_refit import LINKS, Link
from optin_hf.reconstruct import apply_reconstruction, reconstruct, unslim
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = "segformer.stages.1.patch_embeddings.proj"
HEAD = ["decode_head.linear_projections.0.proj", "decode_head.linear_projections.1.proj"]


def _masks(model) -> PruningMasks:
    """Layer 1 keeps no head, every layer half its Mix-FFN channels."""
    full = PruningMasks.full(model.config)
    heads, neurons = full.present()
    heads, neurons = heads.clone(), neurons.clone()
    heads[1] = False
    neurons[:, ::2] = False
    return dataclasses.replace(full, head_mask=heads, neuron_mask=neurons)


def _batches():
    return prepare_calibration(random_images(16, seed=4), num_samples=16, batch_size=8, max_length=64)


def _squared_error(model, dense, batches, path: str) -> float:
    """Σ|module(input in `model`) - dense module(input in `dense`)|² over `batches`, from plain forwards."""
    total = 0.0
    for batch in batches:
        seen = {}
        hooks = [net.get_submodule(path).register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, out))
                 for k, net in (("slim", model), ("dense", dense))]
        with torch.no_grad():
            model(pixel_values=batch["pixel_values"])
            dense(pixel_values=batch["pixel_values"])
        for hook in hooks:
            hook.remove()
        total += float((seen["slim"].double() - seen["dense"].double()).pow(2).sum())
    return total


def test_a_segformer_names_its_stage_readers():
    model = tiny_segformer()
    assert check_model(model).link_refits(model) == ([EMBED], HEAD)
    assert check_model(model.segformer).link_refits(model.segformer) == (["stages.1.patch_embeddings.proj"], [])


def test_each_link_refit_lowers_its_modules_error_as_a_plain_forward_measures_it():
    dense = tiny_segformer().eval()
    model = slim_model(copy.deepcopy(dense), _masks(dense))
    batches = _batches()
    result = reconstruct(model, dense, batches, "weights")
    links = {path: (before, after) for i, path, before, after in result.errors if i == -1}
    assert list(links) == [EMBED, *HEAD]
    for path, (before, after) in links.items():
        assert after < before, path
    # the last refit (the head's readers) is what the model now computes
    for path in HEAD:
        assert links[path][1] == pytest.approx(_squared_error(model, dense, batches, path), rel=1e-4)
    assert {f"{LINKS}.{path}.{name}" for path in links for name in ("weight", "bias")} <= set(result.tensors)


def test_with_nothing_pruned_the_links_keep_their_weights():
    dense = tiny_segformer().eval()
    model = copy.deepcopy(dense)
    result = reconstruct(model, dense, _batches(), "weights")
    for path in [EMBED, *HEAD]:
        torch.testing.assert_close(result.tensors[f"{LINKS}.{path}.weight"], Link(dense.get_submodule(path)).weight(),
                                   atol=1e-5, rtol=1e-4)


def test_the_artifact_and_unslim_give_the_refit_models_outputs():
    dense = tiny_segformer().eval()
    masks = _masks(dense)
    model = slim_model(copy.deepcopy(dense), masks)
    result = reconstruct(model, dense, _batches(), "weights")
    pixels = random_images(2, seed=9)
    pixels = torch.stack([p["pixel_values"] for p in pixels])
    with torch.no_grad():
        want = model(pixel_values=pixels).logits
        reloaded = slim_model(copy.deepcopy(dense), masks)  # what a masks-only artifact rebuilds
        apply_reconstruction(reloaded, result.tensors)
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, want)
        torch.testing.assert_close(unslim(model, dense, masks)(pixel_values=pixels).logits, want, atol=1e-5, rtol=1e-4)


def test_a_link_tensor_of_another_shape_is_refused():
    dense = tiny_segformer().eval()
    model = slim_model(copy.deepcopy(dense), _masks(dense))
    with pytest.raises(ValueError, match="shape"):
        apply_reconstruction(model, {f"{LINKS}.{EMBED}.weight": torch.zeros(3, 3)})
