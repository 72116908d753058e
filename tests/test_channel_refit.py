"""The refit of the convs that read cut residual channels (`prune_channels=True`, `reconstruct="weights"`, ResNet):
each block's reduce conv and projection shortcut whose input lost channels, and the classifier after the pooling,
are fit to the dense model's outputs from the slim model's own inputs, and the artifact carries them."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from huggingface_hub import create_repo, upload_folder
from hub_server import FakeHub
from tiny import family
from transformers import ResNetConfig

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model, get_submodule
from optin_hf.arch.resnet import RESNET
from optin_hf.channel_search import MAX_DEFAULT_CHANNELS, channel_judge, channels_by_default
from optin_hf.data import prepare_calibration
from optin_hf.reconstruct import apply_reconstruction, reconstruct
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = family("resnet")


def channel_masks(model, keep_all: bool = False) -> PruningMasks:
    """About half of every residual group kept (its first channel always), or every channel; heads and neurons all kept."""
    widths = check_model(model).channel_widths(model.config)
    keep = torch.rand(sum(widths), generator=torch.Generator().manual_seed(0)) > 0.5
    keep[torch.tensor([0, *widths[:-1]]).cumsum(0)] = True
    return dataclasses.replace(PruningMasks.full(model.config), channel_mask=keep | keep_all)


def batches() -> list[dict[str, torch.Tensor]]:
    return prepare_calibration(TINY.examples(16, 1), num_samples=16, batch_size=8, max_length=64)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**TINY.inputs).logits


@torch.no_grad()
def consumer_errors(model, dense, data) -> dict[str, float]:
    """Σ squared difference to the dense model of each consumer's pre-BatchNorm output at the channels it keeps (the
    classifier's logits), each block run on the slim model's own input: what the refit of that consumer fits."""
    adapter = check_model(model)
    errors: dict[str, float] = {}
    for batch in data:
        seen: dict = {}
        hooks = []
        for name, net in (("slim", model), ("dense", dense)):
            for i, layer in enumerate(adapter.layers_of(net)):
                for path in adapter.channel_readers:
                    conv = getattr(get_submodule(layer, path), "convolution", None)
                    if conv is not None:
                        hooks.append(conv.register_forward_hook(
                            lambda m, a, out, key=(name, i, path): seen.__setitem__(key, (a[0], out))))
        try:
            model(**batch)
            dense(**batch)
        finally:
            for hook in hooks:
                hook.remove()
        for (name, i, path), (x, out) in seen.items():
            if name != "slim":
                continue
            slim_conv = get_submodule(adapter.layers_of(model)[i], path)
            dense_conv = get_submodule(adapter.layers_of(dense)[i], path).convolution
            if slim_conv.convolution.in_channels == dense_conv.in_channels:
                continue  # reads no cut stream
            # the dense conv on the dense input; the slim conv's kept outputs
            target = seen["dense", i, path][1][:, adapter.kept_reader_outputs(adapter.layers_of(model)[i], path)]
            # the slim conv's output with its bias: the running mean shift the refit folded in
            norm = slim_conv.normalization
            dense_norm = get_submodule(adapter.layers_of(dense)[i], path).normalization
            kept = adapter.kept_reader_outputs(adapter.layers_of(model)[i], path)
            shift = (dense_norm.running_mean[kept] - norm.running_mean)[None, :, None, None]
            errors[f"{i}.{path}"] = errors.get(f"{i}.{path}", 0.0) + float((out + shift - target).pow(2).sum())
        errors["classifier"] = errors.get("classifier", 0.0) + float((model(**batch).logits - dense(**batch).logits).pow(2).sum())
    return errors


def test_the_refit_lowers_each_consumers_calibration_error():
    dense = TINY.build().eval()
    masks = channel_masks(dense)
    plain = slim_model(copy.deepcopy(dense), masks).eval()
    model = slim_model(copy.deepcopy(dense), masks).eval()
    data = batches()
    repair = reconstruct(model, dense, data, "weights")
    # every block's reduce conv reads a cut stream (the stem's, then each stage's), the two shortcuts too, and the
    # classifier reads the cut last stage
    refit = {(i, path) for i, path, _, _ in repair.errors}
    assert {(0, "layer.0"), (1, "layer.0"), (2, "layer.0"), (0, "shortcut"), (2, "shortcut"), (2, "classifier")} <= refit
    assert {"classifier.weight", "classifier.bias", "layers.1.layer.0.convolution.weight",
            "layers.2.shortcut.normalization.running_mean"} <= set(repair.tensors)
    assert all(after < before for _, path, before, after in repair.errors if path in ("layer.0", "shortcut", "classifier"))
    # measured on the models themselves: the slim model's inputs differ before and after, so the sum is compared
    before, after = consumer_errors(plain, dense, data), consumer_errors(model, dense, data)
    assert before.keys() == after.keys() and len(before) == 6
    for key in before:
        assert after[key] < before[key], key


def test_nothing_cut_changes_nothing_the_consumer_refit_adds():
    dense = TINY.build().eval()
    data = batches()
    every = slim_model(copy.deepcopy(dense), channel_masks(dense, keep_all=True)).eval()
    plain = slim_model(copy.deepcopy(dense), PruningMasks.full(dense.config)).eval()
    with_mask, without = reconstruct(every, dense, data, "weights"), reconstruct(plain, dense, data, "weights")
    assert with_mask.tensors.keys() == without.tensors.keys()
    assert not any(path in ("shortcut", "classifier") or path == "layer.0" for _, path, _, _ in with_mask.errors)
    for key, value in with_mask.tensors.items():
        assert torch.equal(value, without.tensors[key]), key
    torch.testing.assert_close(logits(every), logits(dense), atol=1e-5, rtol=1e-5)


def test_the_artifact_rebuilds_the_refit_model_and_scales_are_refused():
    dense = TINY.build().eval()
    masks = channel_masks(dense)
    model = slim_model(copy.deepcopy(dense), masks).eval()
    repair = reconstruct(model, dense, batches(), "weights")
    fresh = slim_model(copy.deepcopy(dense), masks).eval()
    assert not torch.equal(logits(fresh), logits(model))
    apply_reconstruction(fresh, repair.tensors)
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(ValueError, match="reconstruct='scales' fits one factor per kept unit"):
        reconstruct(slim_model(copy.deepcopy(dense), masks), dense, batches(), "scales")


def test_the_share_is_judged_on_the_refit_model():
    """The channel search's judge repairs each candidate as the pruner will: with the refit, its loss is the KL of
    the slim model refit on the same batches."""
    dense = TINY.build().eval()
    masks, data = channel_masks(dense), batches()
    adapter = check_model(dense)
    refit = channel_judge(dense, adapter, data, "weights", 1e-3, 4.0)(masks)
    means = channel_judge(dense, adapter, data, "batchnorm", 1e-3, 4.0)(masks)
    assert refit < means  # on its own calibration data the refit model is the closer one


def test_prune_with_channels_and_the_refit_saves_and_reloads(hub_server: FakeHub, tmp_path: Path):
    dense = TINY.build()
    dense.save_pretrained(tmp_path / "base")
    base_id = create_repo("tiny-resnet").repo_id
    upload_folder(repo_id=base_id, folder_path=tmp_path / "base")
    model = type(dense).from_pretrained(base_id).eval()
    pruner = OptinPruner(OptinConfig(**{**TINY.settings, "mac_constraint": 0.6, "prune_channels": True,
                                        "importance": "optin", "reconstruct": "weights"}))
    pruner.prune_model(model, TINY.examples(16, 1))
    assert not pruner.masks.channel_mask.all()
    assert "classifier.weight" in pruner.reconstruction.tensors
    expected = logits(model)
    pruner.save(model, tmp_path / "slim")
    masks_repo = pruner.push_to_hub(model, "tiny-resnet-optin").repo_url.repo_id
    full_repo = pruner.push_to_hub(model, "tiny-resnet-optin-full", masks_only=False).repo_url.repo_id
    for source in (tmp_path / "slim", masks_repo, full_repo):
        loaded = AutoOptinModel.from_pretrained(source)
        assert loaded.config.optin == model.config.optin, source
        assert torch.equal(logits(loaded), expected), source


def test_the_default_cuts_residual_channels_with_the_refit_where_data_can_judge_them():
    """`prune_channels=None` (the default) with a criterion that scores channels cuts them and refits; compute_masks
    without data has nothing to judge a share on, so it keeps the widths and the family's first repair; False never
    cuts them; a criterion without channel scores leaves them too."""
    settings = {**TINY.settings, "mac_constraint": 0.6, "importance": "optin", "reconstruct": "auto"}
    pruner = OptinPruner(OptinConfig(**settings))
    pruner.prune_model(TINY.build(), TINY.examples(16, 1))
    assert (pruner.config.prune_channels, pruner.config.reconstruct) == (True, "weights")
    assert not pruner.masks.channel_mask.all()
    blind = OptinPruner(OptinConfig(**settings))
    masks = blind.compute_masks(TINY.build(), scores=pruner.scores)
    assert masks.channel_mask is None and (blind.config.prune_channels, blind.config.reconstruct) == (False, "batchnorm")
    for named in ({"prune_channels": False}, {"importance": "magnitude"}):
        other = OptinPruner(OptinConfig(**{**settings, **named}))
        other.prune_model(TINY.build(), TINY.examples(16, 1))
        assert other.masks.channel_mask is None and (other.config.prune_channels, other.config.reconstruct) == (False, "batchnorm")


def test_the_default_leaves_the_widths_of_a_resnet_with_too_many_channels_to_score():
    """ResNet-50's widths (3,904 residual channels, one masked run each) are over MAX_DEFAULT_CHANNELS: kept whole."""
    config = OptinConfig(importance="optin")
    wide = ResNetConfig(layer_type="bottleneck", depths=[1, 1, 1, 1], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64)
    assert sum(RESNET.channel_widths(wide)) > MAX_DEFAULT_CHANNELS
    assert channels_by_default(config, RESNET, wide, offloaded=False) is False
    assert channels_by_default(config, RESNET, TINY.build().config, offloaded=False) is True
    assert channels_by_default(config, RESNET, TINY.build().config, offloaded=True) is False
    assert channels_by_default(OptinConfig(), RESNET, TINY.build().config, offloaded=False) is None  # auto: per candidate
