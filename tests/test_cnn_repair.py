"""The CNN repairs (optin_hf/reconstruct.py, arch/resnet.py, arch/convnext.py): `reconstruct="batchnorm"`, a
ResNet's BatchNorm running means re-estimated on the slim model, saved and reloaded full and masks-only; and
what is the CNNs' own in the least-squares refit (a ResNet's 3x3 conv fit to the dense conv's output, its last 1x1
conv and its BatchNorm as one affine map, its other BatchNorms re-centred; a ConvNeXt's channels-first rows read as
pwconv2's). That each refit lowers its sublayers' error and reloads masks-only is tests/test_conformance.py's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model, get_submodule
from optin_hf.arch.resnet import ConvBatchNorm
from optin_hf.checkpoint import save_pruned
from optin_hf.data import prepare_calibration
from optin_hf.reconstruct import apply_reconstruction, batch_norms, reconstruct, unslim
from optin_hf.search_record import search_record
from optin_hf.slim import slim_model
from tiny import random_images as images, tiny_cnn, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run far faster on one thread

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
    """Pruned by `masks_of` and repaired by `repair` ("readers": the weights refit with `reconstruct_readers`)."""
    model = copy.deepcopy(base) if base is not None else trained_resnet()
    settings = {"reconstruct": "weights", "reconstruct_readers": True} if repair == "readers" else {"reconstruct": repair}
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, **settings}))
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


@pytest.mark.parametrize("repair", ["batchnorm", "weights", "readers"])
@pytest.mark.parametrize("masks_only", [False, True])
def test_save_and_load_reproduce_the_repaired_model(masks_only, repair, tmp_path):
    """The BatchNorm repair's running means, and the refit's 3x3 and last convs with their BatchNorms (with
    `reconstruct_readers`, its reduce convs, shortcuts and classifier too), reload."""
    base = trained_resnet()
    base.save_pretrained(tmp_path / "base")  # the base a masks-only checkpoint names
    base = type(base).from_pretrained(tmp_path / "base").eval()
    repaired, pruner = pruned(repair, base)
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


@pytest.mark.parametrize("model", [lambda: tiny_cnn("convnext"), lambda: tiny_model("vit")])
def test_families_without_batchnorms_are_refused_with_the_fix(model):
    fix = r"reconstruct='weights'\) \(or 'scales' or 'none'\)"
    with pytest.raises(ValueError, match=rf"reconstruct='batchnorm' re-estimates the running means of the BatchNorms.*adapter does not give: prune it with OptinConfig\({fix}"):
        OptinPruner(OptinConfig(reconstruct="batchnorm")).prune_model(model(), images(2, 1))


@torch.no_grad()
def test_a_resnet_down_projection_is_its_last_conv_and_batchnorm_as_one_affine_map():
    """weight γ/σ·W and bias β − γμ/σ give the eval-mode conv + BatchNorm; `set` writes a new map into the two
    modules, which then compute it (the BatchNorm left a plain bias)."""
    model = trained_resnet()
    layer = check_model(model).layers_of(model)[1]
    proj = check_model(model).projection(layer, "ffn_down")
    assert isinstance(proj, ConvBatchNorm) and proj.output_module is layer.layer[2].normalization
    x = torch.randn(2, proj.in_features, 3, 5)
    affine = lambda w, b: proj.unrows(proj.rows(x) @ w.T + b, (2, proj.out_features, 3, 5))  # noqa: E731
    torch.testing.assert_close(proj(x), layer.layer[2](x))
    torch.testing.assert_close(proj(x), affine(proj.weight(), proj.bias()), atol=1e-5, rtol=1e-5)
    weight, bias = torch.randn(proj.out_features, proj.in_features), torch.randn(proj.out_features)
    proj.set(weight, bias)
    torch.testing.assert_close(layer.layer[2](x), affine(weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.weight(), weight)
    assert torch.equal(layer.layer[2].normalization.running_mean, torch.zeros(proj.out_features))


@pytest.mark.parametrize("mode", ["weights", "scales"])
@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_a_cnn_refit_with_nothing_pruned_changes_nothing(family, mode):
    """The ridge keeps the weights that fit exactly (a ResNet's conv and BatchNorm re-parameterized to the same map)."""
    dense = trained_resnet() if family == "resnet" else tiny_cnn(family)
    model = slim_model(copy.deepcopy(dense), PruningMasks.full(dense.config))
    result = reconstruct(model, dense, prepare_calibration(CALIBRATION, num_samples=16, batch_size=8, max_length=64), mode)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=PIXELS).logits, dense(pixel_values=PIXELS).logits, atol=1e-5, rtol=1e-5)
    if family == "resnet" and mode == "weights":  # the 3x3 convs refit too, to their own weights
        assert sum(sub == "layer.1" for _, sub, _, _ in result.errors) == 3
        for layer, before in zip(check_model(model).layers_of(model), check_model(dense).layers_of(dense)):
            torch.testing.assert_close(layer.layer[1].convolution.weight, before.layer[1].convolution.weight, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(layer.layer[1].normalization.running_mean, before.layer[1].normalization.running_mean,
                                       atol=1e-6, rtol=1e-5)


def test_the_readers_refit_with_nothing_pruned_changes_nothing_and_other_families_are_refused():
    dense = trained_resnet()
    model = slim_model(copy.deepcopy(dense), PruningMasks.full(dense.config))
    data = prepare_calibration(CALIBRATION, num_samples=16, batch_size=8, max_length=64)
    result = reconstruct(model, dense, data, "weights", readers=True)
    assert {sub for _, sub, _, _ in result.errors} >= {"layer.0", "shortcut", "classifier"}
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=PIXELS).logits, dense(pixel_values=PIXELS).logits, atol=1e-5, rtol=1e-5)
    for name, value in dense.state_dict().items():  # the readers and the classifier fit to the weights they had
        if name.endswith(("layer.0.convolution.weight", "shortcut.convolution.weight", "classifier.1.weight")):
            torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    convnext = tiny_cnn("convnext")
    with pytest.raises(ValueError, match="reconstruct_readers=True.*the convnext adapter does not give"):
        reconstruct(slim_model(copy.deepcopy(convnext), PruningMasks.full(convnext.config)), convnext, data, "weights", readers=True)
    with pytest.raises(ValueError, match="set reconstruct='weights', or reconstruct_readers=False"):
        OptinConfig(reconstruct="batchnorm", reconstruct_readers=True)


def test_the_search_refits_the_readers_of_its_weights_candidates_only():
    """Under importance="auto", `reconstruct_readers` makes every repaired candidate the weights refit (as it makes
    `reconstruct="auto"`), which runs the readers' refit (the kept one's artifact holds the classifier refit with the
    widths kept); the scoring and the candidates without a repair run without it (a config asking for it is refused)."""
    model = trained_resnet()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.7, reconstruct_readers=True, prune_channels=False, reconstruct_samples=16,
                                     batch_size=4, neurons_multiple_of=1))
    pruner.prune_model(model, images(32, 2))
    record = search_record(pruner.config.to_dict())
    tried = {(c.importance, c.reconstruct) for c in record.candidates}
    assert {repair for _, repair in tried} == {"weights", "none"} and all(c.distance is not None for c in record.candidates)
    assert pruner.config.reconstruct == "weights" and pruner.config.reconstruct_readers
    assert "classifier.weight" in pruner.reconstruction.tensors and not check_model(model).channels_cut(model)


@torch.no_grad()
def conv_errors(model: nn.Module, dense: nn.Module, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, float]:
    """Block -> Σ over the calibration images of |W x + (μ₀ - μ) - y|² for its 3x3 conv: x its input in `model`, y the
    dense conv's output at the kept channels, (W, μ) = `weights[block]` (a conv weight and its BatchNorm's running
    mean), μ₀ the dense mean at those channels: what the refit fits, measured from plain forwards."""
    adapter = check_model(model)
    seen: dict = {}
    handles = [layer.layer[1].convolution.register_forward_pre_hook(lambda m, a, key=(tag, i): seen.setdefault(key, a[0]))
               for tag, net in (("p", model), ("d", dense)) for i, layer in enumerate(adapter.layers_of(net))]
    pixels = torch.stack([ex["pixel_values"] for ex in CALIBRATION])
    model(pixel_values=pixels), dense(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    errors = {}
    for i, (layer, dense_layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(dense))):
        conv, kept = layer.layer[1].convolution, adapter.kept_conv_outputs(layer)
        weight, mean = weights[i]
        fit = nn.functional.conv2d(seen["p", i], weight, None, conv.stride, conv.padding) - mean[:, None, None]
        target = dense_layer.layer[1].convolution(seen["d", i])[:, kept] - dense_layer.layer[1].normalization.running_mean[kept, None, None]
        errors[i] = float((fit - target).double().pow(2).sum())
    return errors


def test_a_resnet_refit_fits_each_3x3_conv_then_the_last_conv_and_their_batchnorms():
    """Forward order per block: the 3x3 conv (a BatchNorm and a ReLU follow it, so it is fit to the dense conv's output
    at the channels it keeps, its bias folded into its BatchNorm's mean), then the last conv and its BatchNorm (left a
    plain bias). The 3x3 refit lowers that conv's calibration error, measured from plain forwards as the refit counts
    it; the reduce conv's BatchNorm and the 3x3's scale and variance keep their values."""
    dense = trained_resnet()
    model, plain = (slim_model(copy.deepcopy(dense), masks_of(dense)) for _ in range(2))
    result = reconstruct(model, dense, prepare_calibration(CALIBRATION, num_samples=16, batch_size=8, max_length=64), "weights")
    assert {key.split(".", 2)[2] for key in result.tensors} == {
        "ffn_down.weight", "ffn_down.bias", "layer.1.convolution.weight", "layer.1.normalization.running_mean"}
    assert [(i, sub) for i, sub, _, _ in result.errors] == [(i, sub) for i in range(3) for sub in ("layer.1", "ffn_down")]
    layers, plain_layers = check_model(model).layers_of(model), check_model(plain).layers_of(plain)
    for layer, before in zip(layers, plain_layers):
        for (name, norm), (_, old) in zip(batch_norms(layer), batch_norms(before)):
            if name == "layer.2.normalization":
                assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
            else:
                assert torch.equal(norm.weight, old.weight) and torch.equal(norm.running_var, old.running_var)
                assert name == "layer.1.normalization" or torch.equal(norm.running_mean, old.running_mean), name
    def conv_weights(net):
        return {i: (l.layer[1].convolution.weight, l.layer[1].normalization.running_mean) for i, l in enumerate(check_model(net).layers_of(net))}
    after, before = conv_errors(model, dense, conv_weights(model)), conv_errors(model, dense, conv_weights(plain))
    recorded = {i: (b, a) for i, sub, b, a in result.errors if sub == "layer.1"}
    for i in (1, 2):  # the blocks that lost channels (block 0's 3x3 conv fits exactly before and after)
        assert after[i] < 0.8 * before[i], (i, after[i], before[i])
        assert not torch.equal(layers[i].layer[1].normalization.running_mean, plain_layers[i].layer[1].normalization.running_mean)
        assert recorded[i] == (pytest.approx(before[i], rel=1e-3), pytest.approx(after[i], rel=1e-3))
    assert feature_error(model, dense) < feature_error(plain, dense) / 2


def readers_of(model: nn.Module) -> list[tuple[str, ...]]:
    """Per block, the convs reading its input: the reduce conv, and the shortcut where it is a conv."""
    return [tuple(p for p in ("layer.0", "shortcut") if hasattr(get_submodule(layer, p), "convolution"))
            for layer in check_model(model).layers_of(model)]


@torch.no_grad()
def reader_errors(model: nn.Module, dense: nn.Module, weights: dict) -> dict:
    """(block, path) -> Σ over the calibration images of |W x + (μ₀ - μ) - y|² for a conv reading the block's input, x
    its input in `model`, y the dense conv's output at the channels it keeps, (W, μ) = `weights[block, path]`, μ₀ the
    dense mean there; "classifier" -> Σ |A p + b - logits_dense|², p `model`'s pooled features, (A, b) =
    `weights["classifier"]`: what the refit fits, measured from plain forwards."""
    adapter = check_model(model)
    seen: dict = {}
    handles = [get_submodule(layer, path).convolution.register_forward_pre_hook(
        lambda m, a, key=(tag, i, path): seen.setdefault(key, a[0]))
        for tag, net in (("p", model), ("d", dense)) for i, layer in enumerate(adapter.layers_of(net)) for path in readers_of(net)[i]]
    pixels = torch.stack([ex["pixel_values"] for ex in CALIBRATION])
    pooled, dense_logits = model.base_model(pixel_values=pixels).pooler_output.flatten(1), dense(pixel_values=pixels).logits
    for handle in handles:
        handle.remove()
    errors = {}
    for i, (layer, dense_layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(dense))):
        for path in readers_of(model)[i]:
            conv, dense_conv_layer = get_submodule(layer, path).convolution, get_submodule(dense_layer, path)
            kept = adapter.kept_reader_outputs(layer, path)
            weight, mean = weights[i, path]
            fit = nn.functional.conv2d(seen["p", i, path], weight, None, conv.stride, conv.padding) - mean[:, None, None]
            target = dense_conv_layer.convolution(seen["d", i, path])[:, kept] - dense_conv_layer.normalization.running_mean[kept, None, None]
            errors[i, path] = float((fit - target).double().pow(2).sum())
    weight, bias = weights["classifier"]
    errors["classifier"] = float((pooled @ weight.T + bias - dense_logits).double().pow(2).sum())
    return errors


def test_the_readers_refit_lowers_the_errors_of_the_convs_reading_each_block_and_of_the_classifier():
    """`readers=True` (`reconstruct_readers`), the widths kept: per block, first each reduce conv and projection shortcut,
    fit from the slim block's own input to the dense conv's output at the channels it keeps; the classifier last, from
    the pooled features to the dense logits. Each one's calibration error, measured from plain forwards of the refit
    model with its refit weights against the weights it had, falls, and is what the refit recorded; the artifact
    carries them."""
    dense = trained_resnet()
    model, plain = (slim_model(copy.deepcopy(dense), masks_of(dense)) for _ in range(2))
    result = reconstruct(model, dense, prepare_calibration(CALIBRATION, num_samples=16, batch_size=8, max_length=64), "weights",
                         readers=True)
    readers = readers_of(model)
    assert any("shortcut" in r for r in readers)  # a projection shortcut is among them
    assert [(i, sub) for i, sub, _, _ in result.errors] == [
        (i, sub) for i in range(3) for sub in (*readers[i], "layer.1", "ffn_down")] + [(2, "classifier")]
    assert {key.split(".", 2)[2] if key.startswith("layers.") else key for key in result.tensors} == {
        "ffn_down.weight", "ffn_down.bias", "layer.1.convolution.weight", "layer.1.normalization.running_mean",
        "layer.0.convolution.weight", "layer.0.normalization.running_mean", "shortcut.convolution.weight",
        "shortcut.normalization.running_mean", "classifier.weight", "classifier.bias"}
    fresh = slim_model(copy.deepcopy(dense), masks_of(dense))
    apply_reconstruction(fresh, result.tensors)
    with torch.no_grad():
        assert torch.equal(fresh(pixel_values=PIXELS).logits, model(pixel_values=PIXELS).logits)

    def weights(net: nn.Module) -> dict:
        layers = check_model(net).layers_of(net)
        convs = {(i, p): (get_submodule(layers[i], p).convolution.weight, get_submodule(layers[i], p).normalization.running_mean)
                 for i, paths in enumerate(readers_of(net)) for p in paths}
        return {**convs, "classifier": (net.classifier[-1].weight, net.classifier[-1].bias)}

    with torch.no_grad():
        after, before = reader_errors(model, dense, weights(model)), reader_errors(model, dense, weights(plain))
    recorded = {(i, sub) if sub != "classifier" else sub: (b, a) for i, sub, b, a in result.errors if sub in ("layer.0", "shortcut", "classifier")}
    assert recorded.keys() == after.keys()
    # block 0 keeps every channel, so blocks 0 and 1 read the dense stream: their readers fit exactly before and after
    assert all(before[i, p] < 1e-6 and after[i, p] < 1e-6 for i in (0, 1) for p in readers_of(model)[i])
    for key in [(2, "layer.0"), (2, "shortcut"), "classifier"]:  # those reading what block 1's cut moved
        assert after[key] < 0.9 * before[key], (key, after[key], before[key])
        # the refit's sums are float32 per batch: its errors resolve to about 1e-7 of the error it started from (the
        # classifier's 1.1e-7 on an AMD EPYC's BLAS, so within 3e-7)
        assert recorded[key] == (pytest.approx(before[key], rel=1e-3),
                                 pytest.approx(after[key], rel=1e-3, abs=3e-7 * before[key])), key


@torch.no_grad()
def test_convnext_rows_of_the_channels_first_stream_line_up_with_pwconv2s():
    """The block adds λ ⊙ pwconv2's output (channels last) to its channels-first input: row r of the stream as
    `stream_rows` reads it is row r of pwconv2's output, so the refit's target and residual pair up."""
    model = tiny_cnn("convnext")
    adapter = check_model(model)
    layer = adapter.layers_of(model)[0]
    hidden = torch.randn(2, 8, 4, 6)
    seen = []
    handle = layer.pwconv2.register_forward_hook(lambda m, a, out: seen.append(out))
    output = layer(hidden)
    handle.remove()
    branch = adapter.projection(layer, "ffn_down").rows(seen[0]) * adapter.branch_scale(layer, "ffn_down")
    torch.testing.assert_close(adapter.stream_rows(layer, "ffn_down", output) - adapter.stream_rows(layer, "ffn_down", hidden), branch)
    torch.testing.assert_close(adapter.finish_feed_forward(layer, seen[0], hidden), output)


def test_batchnorm_repair_in_steps_is_refused():
    with pytest.raises(ValueError, match="reconstruct='batchnorm' does not give: set prune_steps=1"):
        OptinConfig(reconstruct="batchnorm", prune_steps=2)


@pytest.mark.parametrize("readers", [False, True])
def test_a_resnet_refit_unslimmed_computes_what_the_slim_model_computes(readers):
    """Pruning in steps re-scores the refit model in dense shapes (`unslim`): the 3x3 conv carries its refit filters
    at its kept (reduce, 3x3) channels and its BatchNorm its refit means, and the removed reduce channels' inputs are cut;
    with `readers`, the reduce convs at their kept channels, the shortcuts and the classifier carry theirs."""
    dense = trained_resnet()
    masks = masks_of(dense)
    model = slim_model(copy.deepcopy(dense), masks)
    reconstruct(model, dense, prepare_calibration(CALIBRATION, num_samples=16, batch_size=8, max_length=64), "weights",
                readers=readers)
    with torch.no_grad():
        torch.testing.assert_close(unslim(model, dense, masks)(pixel_values=PIXELS).logits, model(pixel_values=PIXELS).logits,
                                   atol=1e-5, rtol=1e-5)
