"""One conformance suite: the same checks on every registered adapter (`optin_hf.arch.ADAPTERS`), on the tiny
model `tiny.family` builds of its model type.

A family's own test module keeps only what is its own (its unit geometry's numbers, its refusals, its CLI
run); what every adapter must do is checked here once:
- geometry: `layer_geometry` agrees with the model's modules (heads, head size, hidden size, FFN width);
- `count_macs` equals torch's FLOP counter, dense and slim;
- the slim model computes what the masked dense model computes, and runs the kept units;
- save and reload: a folder, a full Hub repo and a masks-only one;
- the fast engine's scores equal the reference engine's (exactly, where the family falls back to it);
- each repair the family takes lowers its sublayers' error, and changes nothing where nothing is pruned; so does the
  input projections' refit (`reconstruct_inputs`), whose artifact reloads masks-only;
- the weights refit's shortcuts (the FFN target read off the recorded dense run where a family declares
  `output_is_ffn_sum`, which must then be true; input projections' products skipped where only their inputs are
  watched) give the same artifact bit for bit;
- refusals match the declared capabilities (`ArchAdapter.capabilities`): what a family declares is accepted,
  what it does not is refused before any scoring, with the one message `optin_hf.arch.refusal` words.
A family registered with `register_adapter` joins by that registration alone
(`test_a_registered_family_joins_the_suite`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from contextlib import ExitStack, nullcontext
from pathlib import Path

import pytest
import torch
from huggingface_hub import create_repo, list_repo_files, upload_folder
from hub_server import FakeHub
from tiny import Family, family
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs, register_adapter
from optin_hf import reconstruct as reconstruct_module
from optin_hf.arch import ADAPTERS, FEATURES, REPAIRS, check_model, get_submodule, refusal
from optin_hf.arch.base import num_features
from optin_hf.arch.projection import Projection, slice_features
from optin_hf.arch.bert import BERT
from optin_hf.capture import scoring_forward
from optin_hf.checkpoint import save_pruned
from optin_hf.data import prepare_calibration
from optin_hf.engine.run import engine_for
from optin_hf.hooks import apply_masks
from optin_hf.importance.residual_channels import zero_channel
from optin_hf.losses import kl_loss
from optin_hf.reconstruct import apply_reconstruction, batch_norms, output_projection, reconstruct
from optin_hf.recipe_search import SEARCHED_CRITERIA
from optin_hf.search_record import search_record
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run far faster on one thread

MODEL_TYPES = sorted(ADAPTERS)
# feature -> the OptinConfig settings that ask for it ("fast_engine" falls back with a warning: `check_fast_scores`)
ASKS = {
    **{mode: {"reconstruct": mode} for mode in REPAIRS},
    "tokens": {"prune_tokens": True},
    "heads": {"prune_neurons": False},
    "neurons": {"prune_heads": False},
    "channels": {"prune_channels": True},
    "inputs": {"reconstruct_inputs": True, "reconstruct": "auto"},
    "readers": {"reconstruct_readers": True, "reconstruct": "auto"},
}
assert set(ASKS) | {"fast_engine"} == set(FEATURES)  # a new capability gets its request here


def refit_modes(model_type: str) -> list[str]:
    """The repairs (`OptinConfig.reconstruct` other than "none") the family declares."""
    return [mode for mode in REPAIRS if ADAPTERS[model_type].supports(mode)]


def outputs(model: nn.Module, tiny: Family) -> list[torch.Tensor]:
    """Every tensor of the model's output on the family's inputs (Mask2Former's class and mask logits, and the rest)."""
    with torch.no_grad():
        out = model(**tiny.inputs)
    return [value for value in out.values() if isinstance(value, torch.Tensor)]


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_masks(model: nn.Module, seed: int = 0) -> PruningMasks:
    """About half of the present units; layer 0 keeps no head and the last layer no neuron, every other layer
    keeps its first head and neuron."""
    full = PruningMasks.full(model.config)
    present_heads, present_neurons = full.present()
    g = torch.Generator().manual_seed(seed)
    heads = (torch.rand(full.head_mask.shape, generator=g) > 0.4) & present_heads
    neurons = (torch.rand(full.neuron_mask.shape, generator=g) > 0.5) & present_neurons
    heads[1:, :1] = present_heads[1:, :1]
    neurons[:-1, :1] = present_neurons[:-1, :1]
    heads[0], neurons[-1] = False, False
    return dataclasses.replace(full, head_mask=heads, neuron_mask=neurons)


def features(module: nn.Module, side: str) -> int:
    """Output or input features of a projection: a Linear's or Conv1D's, or a conv's channels."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return num_features(module, side)
    return module.out_channels if side == "out" else module.in_channels


def check_geometry(model_type: str) -> None:
    tiny = family(model_type)
    model = tiny.build()
    adapter = check_model(model)
    geometry, layers = adapter.layer_geometry(model.config), adapter.layers_of(model)
    assert len(layers) == len(geometry)
    for layer, g in zip(layers, geometry, strict=True):
        down = get_submodule(layer, adapter.ffn_down)
        assert (features(down, "in"), features(down, "out")) == (g.neurons, g.hidden)
        assert adapter.kept_neurons(layer) == g.neurons and adapter.kept_heads(layer, model.config) == g.heads
        if g.heads:
            assert adapter.layer_head_dim(layer, model.config) == g.head_dim
            assert features(get_submodule(layer, adapter.attn_out), "in") == g.heads * g.head_dim
    full = PruningMasks.full(model.config)
    assert full.heads_per_layer() == [g.heads for g in geometry]
    assert full.neurons_per_layer() == [g.neurons for g in geometry]
    # the declared kinds of unit are the ones its layers have
    assert adapter.supports("heads") == any(g.heads for g in geometry)
    assert adapter.supports("neurons") == any(g.neurons for g in geometry)


def check_macs(model_type: str) -> None:
    tiny = family(model_type)
    model = tiny.build()
    assert count_macs(model, tiny.seq_len) == tiny.torch_macs(model)
    slim_model(model, random_masks(model))
    assert count_macs(model, tiny.seq_len) == tiny.torch_macs(model)


def check_slim_equals_masked(model_type: str) -> None:
    tiny = family(model_type)
    model = tiny.build()
    adapter, masks = check_model(model), random_masks(model)
    dense = outputs(model, tiny)
    with apply_masks(model, adapter, masks.head_mask.float(), masks.neuron_mask.float()):
        masked = outputs(model, tiny)
    assert max(float((a - b).abs().max()) for a, b in zip(masked, dense, strict=True)) > 1e-3  # the masks matter
    slim_model(model, masks)
    for slim, expected in zip(outputs(model, tiny), masked, strict=True):
        assert (slim - expected).abs().max() < 1e-4
    layers = adapter.layers_of(model)
    assert [adapter.kept_heads(layer, model.config) for layer in layers] == masks.heads_per_layer()
    assert [adapter.kept_neurons(layer) for layer in layers] == masks.neurons_per_layer()
    assert model.config.optin["heads_per_layer"] == masks.heads_per_layer()
    assert parameters(model) < parameters(tiny.build())


def check_channels(model_type: str) -> None:
    """A family with coupled residual channels: slimming about half of each group's channels computes what zeroing
    them wherever the group is carried computes, and `count_macs` still equals torch's FLOP counter."""
    tiny = family(model_type)
    model = tiny.build()
    adapter = check_model(model)
    widths = adapter.channel_widths(model.config)
    keep = torch.rand(sum(widths), generator=torch.Generator().manual_seed(0)) > 0.5
    keep[torch.tensor(widths).cumsum(0) - 1] = True  # every group keeps one
    masks = dataclasses.replace(random_masks(model), channel_mask=keep)
    with ExitStack() as stack:
        stack.enter_context(apply_masks(model, adapter, masks.head_mask.float(), masks.neuron_mask.float()))
        for (carriers, _), kept, width in zip(adapter.channel_carriers(model), masks.channel_keeps(widths), widths):
            for channel in sorted(set(range(width)) - set(kept.tolist())):
                stack.enter_context(zero_channel(carriers, channel))
        masked = outputs(model, tiny)
    slim_model(model, masks)
    for slim, expected in zip(outputs(model, tiny), masked, strict=True):
        assert (slim - expected).abs().max() < 1e-4
    assert adapter.kept_channels(model) == masks.channels_per_group(widths)
    assert count_macs(model, tiny.seq_len) == tiny.torch_macs(model)


def check_save_and_reload(model_type: str, tmp_path: Path) -> None:
    """A folder, and on the (fake) Hub a full repo and a masks-only one naming its base: each loads the slim model,
    repaired by the family's first repair (so the masks-only artifact must carry the refit or the new means); the
    loaded folder saved again masks-only loads it too."""
    tiny = family(model_type)
    dense = tiny.build()
    dense.save_pretrained(tmp_path / "base")
    base_id = create_repo(f"tiny-{model_type}").repo_id
    upload_folder(repo_id=base_id, folder_path=tmp_path / "base")
    model = type(dense).from_pretrained(base_id).eval()  # name_or_path is the repo id: masks-only can name its base
    tiny.eager(model)
    repair = ADAPTERS[model_type].capabilities.auto_repair()
    pruner = OptinPruner(OptinConfig(**{**tiny.settings, "importance": "magnitude", "reconstruct": repair}))
    pruner.prune_model(model, tiny.examples(4, 1))
    assert (pruner.reconstruction is not None and bool(pruner.reconstruction.tensors)) == (repair != "none")
    expected, slim_size = outputs(model, tiny), parameters(model)
    assert slim_size < parameters(dense)

    pruner.save(model, tmp_path / "slim")
    masks_repo = pruner.push_to_hub(model, f"tiny-{model_type}-optin").repo_url.repo_id
    full_repo = pruner.push_to_hub(model, f"tiny-{model_type}-optin-full", masks_only=False).repo_url.repo_id
    assert not [file for file in list_repo_files(masks_repo) if file.startswith("model")]
    assert "model.safetensors" in list_repo_files(full_repo)
    for source in (tmp_path / "slim", masks_repo, full_repo):
        loaded = AutoOptinModel.from_pretrained(source)
        tiny.eager(loaded)
        assert type(loaded) is type(model) and loaded.config.optin == model.config.optin, source
        assert parameters(loaded) == slim_size
        for got, want in zip(outputs(loaded, tiny), expected, strict=True):
            assert torch.equal(got, want), source
    # a loaded full checkpoint saves again masks-only: its weights give back the repair's artifact
    save_pruned(AutoOptinModel.from_pretrained(tmp_path / "slim"), tmp_path / "again", masks_only=True)
    again = AutoOptinModel.from_pretrained(tmp_path / "again")
    tiny.eager(again)
    for got, want in zip(outputs(again, tiny), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert PruningMasks.load(tmp_path / "slim" / "optin_masks.safetensors").heads_per_layer() == pruner.masks.heads_per_layer()


def check_default_config(model_type: str, tmp_path: Path) -> None:
    """`OptinConfig(mac_constraint=0.6)` and nothing else prunes the family: importance="auto" tries each searched
    criterion with a declared repair (the one naming it resolves, never "none") and without one, every candidate is
    measured, the result and the saved config name the recipe chosen (and the allocation the family declares), and the
    reload gives the slim model's outputs."""
    tiny = family(model_type)
    model = tiny.build()
    tiny.eager(model)
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6))
    pruner.prune_model(model, tiny.examples(16, 1))
    record = search_record(pruner.config.to_dict())
    chosen = record.candidates[record.chosen]
    searched, repairs = len(SEARCHED_CRITERIA), [c.reconstruct for c in record.candidates]
    assert repairs[searched:] == ["none"] * searched and "none" not in repairs[:searched]
    assert all(ADAPTERS[model_type].supports(mode) for mode in repairs[:searched])
    assert all(c.distance is not None for c in record.candidates), record.lines()
    assert (pruner.config.importance, pruner.config.reconstruct) == (chosen.importance, chosen.reconstruct)
    # allocation="auto" counts by the family's declared allocation (the refit's needs the chosen recipe to refit)
    declared = ADAPTERS[model_type].capabilities.allocation
    assert pruner.config.allocation == ("scores" if declared == "refit" and chosen.reconstruct == "none" else declared)
    assert model.config.optin.get("reconstruct", "none") == chosen.reconstruct  # config.json names a repair that ran
    assert (pruner.reconstruction.mode if pruner.reconstruction else "none") == chosen.reconstruct
    assert count_macs(model, pruner.seq_len) <= 0.6 * count_macs(tiny.build(), pruner.seq_len) * (1 + 1e-9)
    pruner.save(model, tmp_path / "slim")
    saved = OptinConfig.from_pretrained(tmp_path / "slim")
    assert (saved.importance, saved.reconstruct) == (chosen.importance, chosen.reconstruct)
    loaded = AutoOptinModel.from_pretrained(tmp_path / "slim")
    tiny.eager(loaded)
    for got, want in zip(outputs(loaded, tiny), outputs(model, tiny), strict=True):
        assert torch.equal(got, want)


def check_fast_scores(model_type: str) -> None:
    """The fast engine's scores are the reference engine's: to float rounding where the adapter gives its pieces,
    exactly where it falls back to the reference engine."""
    tiny = family(model_type)
    model, data = tiny.build(), tiny.examples(4, 1)
    adapter = check_model(model)
    fast = adapter.supports("fast_engine")
    assert engine_for(model, adapter, OptinConfig(engine="fast")) == ("fast" if fast else "reference")
    score = lambda engine: OptinPruner(  # noqa: E731
        OptinConfig(**{**tiny.settings, "importance": "optin", "engine": engine})
    ).compute_scores(model, data)
    scores = {"reference": score("reference")}
    refused = re.escape(refusal(adapter, "fast_engine", model_type))
    with nullcontext() if fast else pytest.warns(UserWarning, match=f"^{refused}$"):
        scores["fast"] = score("fast")
    if fast:
        for name in ("head_scores", "neuron_scores"):
            want = getattr(scores["reference"], name)
            # a unit whose removal changes nothing (a channel a ReLU keeps at zero) scores float rounding, ~1e-12
            atol = 1e-9 * float(want.abs().max()) if want.numel() else 0.0
            torch.testing.assert_close(getattr(scores["fast"], name), want, rtol=1e-4, atol=atol)
    else:
        assert torch.equal(scores["fast"].head_scores, scores["reference"].head_scores)
        assert torch.equal(scores["fast"].neuron_scores, scores["reference"].neuron_scores)


def check_kl_outputs(model_type: str) -> None:
    """What the KL compares (`ArchAdapter.kl_outputs`): logits [examples, positions, classes] with a valid mask
    [examples, positions], at least one valid position per example, and no KL between the model and itself."""
    tiny = family(model_type)
    model = tiny.build()
    with torch.no_grad():
        kl = check_model(model).kl_outputs(scoring_forward(model, tiny.inputs), tiny.inputs)
    examples = next(iter(tiny.inputs.values())).shape[0]
    assert kl.logits.dim() == 3 and kl.logits.shape[0] == examples and kl.logits.shape[2] >= 2
    assert kl.valid.dtype == torch.bool and kl.valid.shape == kl.logits.shape[:2]
    assert kl.valid.any(1).all()
    assert float(kl_loss([kl], [kl], 4.0)) == pytest.approx(0.0, abs=1e-12)


def sublayer_errors(model: nn.Module, dense: nn.Module, data: list[dict], original: dict) -> dict:
    """(layer, sublayer) -> (error with the refit projection, error with `original`'s) on the real tokens,
    measured from plain forwards: each sublayer's input and residual come from `model` (refit below it),
    its target is the dense sum. Everything is compared as rows of the projection's output
    (`Projection.rows`, `ArchAdapter.stream_rows`; the attention's in the residual's token order,
    `ArchAdapter.token_order`); the residual is the layer input for the attention and
    `ArchAdapter.ffn_residual` for the FFN, the projection's output its `output_module`'s (a copy: ResNet
    adds its shortcut to it in place)."""
    adapter = check_model(model)
    sublayers = adapter.refit_sublayers
    path, side = adapter.ffn_residual()
    seen: dict = {}
    handles = []

    def tap(key):
        def hook(module, args, output=None):
            seen[key] = args[0] if output is None else (output[0] if isinstance(output, tuple) else output).clone()

        return hook

    def hook_on(module, key, where):
        return module.register_forward_pre_hook(tap(key)) if where == "in" else module.register_forward_hook(tap(key))

    def keep_call(key):
        def hook(module, args, kwargs):
            seen[key] = (args[1:], kwargs)

        return hook

    for tag, net in (("p", model), ("d", dense)):
        for i, layer in enumerate(adapter.layers_of(net)):
            handles.append(hook_on(layer, (tag, i, "attn_out", "r"), "in"))
            handles.append(layer.register_forward_pre_hook(keep_call((tag, i, "call")), with_kwargs=True))
            handles.append(hook_on(get_submodule(layer, path), (tag, i, "ffn_down", "r"), side))
            for sub in sublayers:
                proj = output_projection(adapter, layer, sub)
                handles.append(hook_on(proj.module, (tag, i, sub, "x"), "in"))
                handles.append(hook_on(proj.output_module, (tag, i, sub, "y"), "out"))
    errors = {}
    try:
        with torch.no_grad():
            for b in data:
                model(**b), dense(**b)
                real = b["attention_mask"].bool().flatten() if "attention_mask" in b else None
                for i, layer in enumerate(adapter.layers_of(model)):
                    args, kwargs = seen[("p", i, "call")]
                    for sub in sublayers:
                        proj = output_projection(adapter, layer, sub)
                        order = (lambda y: y) if sub == "ffn_down" else (
                            lambda y, args=args, kwargs=kwargs: adapter.token_order(layer, y, *args, **kwargs))
                        # the branch as the residual adds it: times its layer scale where it has one
                        scale = adapter.branch_scale(layer, sub)
                        branch = (lambda y: proj.rows(order(y))) if scale is None else (
                            lambda y, scale=scale: proj.rows(order(y)) * scale)
                        target = (branch(seen[("d", i, sub, "y")]) + adapter.stream_rows(layer, sub, seen[("d", i, sub, "r")])
                                  - adapter.stream_rows(layer, sub, seen[("p", i, sub, "r")]))
                        x = seen[("p", i, sub, "x")]  # its rows as the layer runs them
                        for k, y in enumerate((seen[("p", i, sub, "y")], original[(i, sub)](x))):
                            err = (branch(y) - target).pow(2).sum(-1).double()
                            errors.setdefault((i, sub), [0.0, 0.0])[k] += float((err if real is None else err[real]).sum())
    finally:
        for h in handles:
            h.remove()
    return errors


def batchnorm_errors(model: nn.Module, data: list[dict]) -> list[float]:
    """Per layer: how far its BatchNorms' running means are from the mean of what they receive on `data`."""
    adapter = check_model(model)
    seen: dict = {}
    handles = [
        norm.register_forward_pre_hook(lambda m, a, key=(i, name): seen.setdefault(key, []).append(a[0]))
        for i, layer in enumerate(adapter.layers_of(model)) for name, norm in batch_norms(layer)
    ]
    try:
        with torch.no_grad():
            for b in data:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    errors = [0.0] * len(adapter.layers_of(model))
    for i, layer in enumerate(adapter.layers_of(model)):
        for name, norm in batch_norms(layer):
            mean = torch.cat(seen[i, name]).double().mean(dim=(0, 2, 3))
            errors[i] += float((norm.running_mean.double() - mean).pow(2).sum())
    return errors


def check_refit(model_type: str, mode: str) -> None:
    """Each sublayer the repair touches ends closer to the dense model than the plain slim model is."""
    tiny = family(model_type)
    dense = tiny.build()
    masks = random_masks(dense)
    data = prepare_calibration(tiny.examples(16, 1), num_samples=16, batch_size=8, max_length=64)
    model, plain = slim_model(copy.deepcopy(dense), masks), slim_model(copy.deepcopy(dense), masks)
    adapter = check_model(model)
    if mode == "batchnorm":
        before = batchnorm_errors(plain, data)
        reconstruct(model, dense, data, mode)
        after = batchnorm_errors(model, data)
        lost = [h < g.heads or n < g.neurons for h, n, g in
                zip(masks.heads_per_layer(), masks.neurons_per_layer(), adapter.layer_geometry(model.config), strict=True)]
        assert any(lost)
        for i, (a, b) in enumerate(zip(after, before, strict=True)):
            assert (a < b) if lost[i] else (a == b), (i, a, b)
        return
    original = {  # copies of the projections before the refit
        (i, sub): copy.deepcopy(output_projection(adapter, layer, sub))
        for i, layer in enumerate(adapter.layers_of(model)) for sub in adapter.refit_sublayers
    }
    result = reconstruct(model, dense, data, mode)
    errors = sublayer_errors(model, dense, data, original)
    kept = {"attn_out": masks.heads_per_layer(), "ffn_down": masks.neurons_per_layer()}
    for (i, sub), (after, before) in errors.items():
        if kept[sub][i] or (mode == "weights" and original[(i, sub)].has_bias):
            assert after < before, (i, sub, after, before)
        else:  # scales of no column: only a refit bias could move it
            assert after == pytest.approx(before, rel=1e-9), (i, sub, after, before)
    # The refit's own bookkeeping (from the normal equations) agrees with the plain forwards (a refit conv's, ResNet's
    # 3x3: tests/test_cnn_repair.py).
    for i, sub, before, after in (e for e in result.errors if e[1] in adapter.refit_sublayers):
        assert after == pytest.approx(errors[(i, sub)][0], rel=1e-3)
        assert before == pytest.approx(errors[(i, sub)][1], rel=1e-3)


def input_errors(model: nn.Module, dense: nn.Module, data: list[dict], masks: PruningMasks, original: nn.Module) -> dict:
    """(layer, input projection path) -> (error with the refit projection, error with `original`'s, the plain slim
    model's) on the real tokens, from plain forwards: the projection's input is `model`'s own, the target the dense
    twin's output at the features the slim one keeps."""
    adapter = check_model(dense)
    seen: dict = {}
    handles, parts = [], {}

    def keep_first(key: tuple, value: torch.Tensor) -> None:  # a hook returning a value would replace it
        seen.setdefault(key, value)

    for i, (slim_layer, dense_layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(dense), strict=True)):
        for sub, keep in (("attn_out", masks.head_mask[i]), ("ffn_down", masks.neuron_mask[i])):
            keep = keep.nonzero().flatten()
            width = adapter.layer_head_dim(dense_layer, dense.config) if sub == "attn_out" else 1
            for part in adapter.input_slices(dense_layer, dense.config, sub) if len(keep) else ():
                target = get_submodule(dense_layer, part.path)
                parts[(i, part.path)] = slice_features(target, part, keep, width)
                handles.append(get_submodule(slim_layer, part.path).register_forward_pre_hook(
                    lambda m, args, key=(i, part.path): keep_first(("x", key), args[0])))
                handles.append(target.register_forward_hook(lambda m, args, out, key=(i, part.path): keep_first(("y", key), out)))
    originals = {key: Projection(get_submodule(adapter.layers_of(original)[key[0]], key[1])) for key in parts}
    errors = {key: [0.0, 0.0] for key in parts}
    try:
        with torch.no_grad():
            for batch in data:
                seen.clear()
                scoring_forward(model, batch)
                scoring_forward(dense, batch)
                real = batch["attention_mask"].reshape(-1).bool() if "attention_mask" in batch else None
                for key, kept in parts.items():
                    proj = Projection(get_submodule(adapter.layers_of(model)[key[0]], key[1]))
                    x, y = proj.rows(seen[("x", key)]), Projection(proj.module).rows(seen[("y", key)])[:, kept]
                    rows = real if real is not None and real.numel() == x.shape[0] else slice(None)
                    for j, p in enumerate((proj, originals[key])):
                        errors[key][j] += float((p.module(x[rows]) - y[rows]).double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return errors


def check_input_refit(model_type: str) -> None:
    """`reconstruct_inputs`: each input projection ends closer to its dense twin's output (on the refit model's own
    inputs) than the plain slim one is, its bookkeeping agrees with plain forwards, the output projections are still
    refit, and the artifact alone rebuilds the refit model from the plain slim one."""
    tiny = family(model_type)
    dense = tiny.build()
    tiny.eager(dense)
    masks = random_masks(dense)
    data = prepare_calibration(tiny.examples(16, 1), num_samples=16, batch_size=8, max_length=64)
    model, plain = slim_model(copy.deepcopy(dense), masks), slim_model(copy.deepcopy(dense), masks)
    result = reconstruct(model, dense, data, "weights", inputs=True, masks=masks)
    errors = input_errors(model, dense, data, masks, plain)
    logged = [e for e in result.errors if e[1].startswith("inputs.")]
    assert {(i, path) for i, name, *_ in logged for path in name.removeprefix("inputs.").split("+")} == set(errors)
    for i, name, before, after in logged:
        group = [errors[(i, path)] for path in name.removeprefix("inputs.").split("+")]
        assert after == pytest.approx(sum(e[0] for e in group), rel=1e-3, abs=1e-6), (i, name)
        assert before == pytest.approx(sum(e[1] for e in group), rel=1e-3, abs=1e-6), (i, name)
    assert all(after <= before * (1 + 1e-9) for *_, before, after in logged) and any(a < b for *_, b, a in logged)
    assert {sub for _, sub, *_ in result.errors} >= set(ADAPTERS[model_type].refit_sublayers)
    apply_reconstruction(plain, result.tensors)
    for got, want in zip(outputs(plain, tiny), outputs(model, tiny), strict=True):
        assert torch.equal(got, want)


def check_input_refit_saved_again(model_type: str, tmp_path: Path) -> None:
    """A full checkpoint pruned with `reconstruct_inputs`, loaded and saved again masks-only, still carries the refit
    input projections: the masks-only reload over the base gives the pruned model's outputs."""
    tiny = family(model_type)
    dense = tiny.build()
    dense.save_pretrained(tmp_path / "base")
    model = type(dense).from_pretrained(tmp_path / "base").eval()  # name_or_path is the base folder
    tiny.eager(model)
    pruner = OptinPruner(OptinConfig(**{**tiny.settings, "importance": "magnitude", "reconstruct": "weights",
                                        "reconstruct_inputs": True}))
    pruner.prune_model(model, tiny.examples(4, 1))
    pruner.save(model, tmp_path / "full")  # the full slim checkpoint
    loaded = AutoOptinModel.from_pretrained(tmp_path / "full")
    save_pruned(loaded, tmp_path / "again", masks_only=True)
    again = AutoOptinModel.from_pretrained(tmp_path / "again")
    tiny.eager(again)
    for got, want in zip(outputs(again, tiny), outputs(model, tiny), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def check_output_is_ffn_sum(model_type: str) -> None:
    """`output_is_ffn_sum`, where a family declares it, is true: each dense layer's output is its FFN residual plus
    the down projection's output (as `ArchAdapter.stream_rows` rows), bit for bit, as the refit reads that target
    off the recorded dense run."""
    tiny = family(model_type)
    dense = tiny.build().eval()
    adapter = check_model(dense)
    path, side = adapter.ffn_residual()
    seen: dict = {}
    handles = []
    for i, layer in enumerate(adapter.layers_of(dense)):
        residual, down = get_submodule(layer, path), output_projection(adapter, layer, "ffn_down")
        handles.append(residual.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(("r", i), args[0]))
                       if side == "in" else residual.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(("r", i), out)))
        handles.append(down.output_module.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(("y", i), out)))
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(("out", i), out)))
    try:
        outputs(dense, tiny)
    finally:
        for handle in handles:
            handle.remove()
    for i, layer in enumerate(adapter.layers_of(dense)):
        out = seen[("out", i)]
        out = out[0] if isinstance(out, tuple) else out
        rows = output_projection(adapter, layer, "ffn_down").rows(seen[("y", i)])
        assert torch.equal(adapter.stream_rows(layer, "ffn_down", out), rows + adapter.stream_rows(layer, "ffn_down", seen[("r", i)])), i


def check_refit_shortcuts(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights refit's two shortcuts change no result: its FFN target read off the recorded dense run
    (`output_is_ffn_sum`) and its watches of input projections' inputs without their products (`_skipped`) give the
    same artifact and errors as rerunning the dense FFN and computing every product."""
    tiny = family(model_type)
    dense = tiny.build()
    tiny.eager(dense)
    masks = random_masks(dense)
    data = prepare_calibration(tiny.examples(16, 1), num_samples=16, batch_size=8, max_length=64)
    inputs = ADAPTERS[model_type].supports("inputs")
    fast = reconstruct(slim_model(copy.deepcopy(dense), masks), dense, data, "weights", inputs=inputs, masks=masks)
    monkeypatch.setattr(reconstruct_module, "_skipped", lambda modules: nullcontext())
    adapter = dataclasses.replace(check_model(dense), output_is_ffn_sum=False)
    plain = reconstruct(slim_model(copy.deepcopy(dense), masks), dense, data, "weights", adapter=adapter, inputs=inputs, masks=masks)
    assert fast.tensors.keys() == plain.tensors.keys()
    for key, value in fast.tensors.items():
        assert torch.equal(value, plain.tensors[key]), key
    assert fast.errors == plain.errors


def check_nothing_pruned(model_type: str, mode: str) -> None:
    """With every unit kept, the repair changes nothing: the ridge pulls the refit toward the weights the kept
    units had, which fit the dense sums exactly (what is left is the float64 solve's rounding), and no BatchNorm
    lost an input channel."""
    tiny = family(model_type)
    dense = tiny.build()
    data = prepare_calibration(tiny.examples(8, 1), num_samples=8, batch_size=4, max_length=64)
    full = PruningMasks.full(dense.config)
    model = slim_model(copy.deepcopy(dense), full)
    inputs = mode == "weights" and ADAPTERS[model_type].supports("inputs")  # the input projections' refit too
    reconstruct(model, dense, data, mode, inputs=inputs, masks=full)
    for got, want in zip(outputs(model, tiny), outputs(dense, tiny), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def check_refusals(model_type: str) -> None:
    """Each feature the family declares is accepted: `prune_model` runs with the settings that ask for it. Each
    one it does not is refused before any scoring, by the one message naming the model type, the setting and
    what the family supports."""
    tiny = family(model_type)
    adapter = ADAPTERS[model_type]
    for feature, settings in ASKS.items():
        # a budget every kind alone can reach; "random" scores tokens too
        config = OptinConfig(**{**tiny.settings, "importance": "random", "mac_constraint": 0.95, **settings})
        pruner, model = OptinPruner(config), tiny.build()
        if adapter.supports(feature):
            pruner.prune_model(model, tiny.examples(4, 1))
            assert pruner.masks is not None, feature
            continue
        with pytest.raises(ValueError) as refused:
            pruner.prune_model(model, tiny.examples(4, 1))
        message = str(refused.value)
        assert message == refusal(adapter, feature, model_type), feature
        asked = next(iter(settings.items()))
        assert f"{asked[0]}={asked[1]!r}" in message and f"the {model_type} adapter does not give" in message
        assert f"The {model_type} adapter supports: " in message
        assert pruner.scores is None and pruner.masks is None, feature  # refused up front


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_geometry_agrees_with_the_modules(model_type):
    check_geometry(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_count_macs_equals_the_flop_counter_dense_and_slim(model_type):
    check_macs(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_slim_equals_masked(model_type):
    check_slim_equals_masked(model_type)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if ADAPTERS[t].supports("channels")])
def test_pruned_residual_channels_compute_as_masked_and_count_as_the_flop_counter(model_type):
    check_channels(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_and_reload_from_a_folder_and_the_hub(model_type, hub_server: FakeHub, tmp_path: Path):
    check_save_and_reload(model_type, tmp_path)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_default_config_prunes_and_repairs_every_family(model_type, tmp_path: Path):
    check_default_config(model_type, tmp_path)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_kl_outputs_give_logits_per_position_and_the_valid_ones(model_type):
    check_kl_outputs(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fast_scores_equal_reference_scores(model_type):
    check_fast_scores(model_type)


@pytest.mark.parametrize(("model_type", "mode"), [(t, m) for t in MODEL_TYPES for m in refit_modes(t)])
def test_each_refit_lowers_its_sublayers_error(model_type, mode):
    check_refit(model_type, mode)


@pytest.mark.parametrize(("model_type", "mode"), [(t, m) for t in MODEL_TYPES for m in refit_modes(t)])
def test_a_repair_with_nothing_pruned_changes_nothing(model_type, mode):
    check_nothing_pruned(model_type, mode)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if ADAPTERS[t].supports("inputs")])
def test_the_input_refit_lowers_each_input_projections_error_and_reapplies(model_type):
    check_input_refit(model_type)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if ADAPTERS[t].supports("inputs")])
def test_the_input_refit_survives_a_masks_only_save_of_a_loaded_checkpoint(model_type, tmp_path: Path):
    check_input_refit_saved_again(model_type, tmp_path)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if ADAPTERS[t].output_is_ffn_sum])
def test_a_declared_output_is_the_ffn_sum(model_type):
    check_output_is_ffn_sum(model_type)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if ADAPTERS[t].supports("weights")])
def test_the_refit_shortcuts_change_nothing(model_type, monkeypatch):
    check_refit_shortcuts(model_type, monkeypatch)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_refusals_match_the_declared_capabilities(model_type):
    check_refusals(model_type)


def test_the_suite_covers_every_supported_family():
    """The families optin-hf ships are registered, so the parametrized checks above run on each of them."""
    expected = {"bert", "roberta", "distilbert", "vit", "deit", "swin", "resnet", "convnext", "segformer", "mask2former",
                "dinov2", "llama", "mistral", "qwen2", "qwen3", "gpt2"}
    assert expected <= set(MODEL_TYPES)


def test_scoring_runs_with_use_cache_off():
    """A model whose forward keeps a key/value cache (GPT-2, use_cache on in its config) keeps none while scored."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)).eval()
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    with torch.no_grad():
        assert model(**batch).past_key_values is not None  # what a plain forward keeps
        assert scoring_forward(model, batch).past_key_values is None


def test_a_registered_family_joins_the_suite(hub_server: FakeHub, tmp_path: Path):
    """ELECTRA, laid out as BERT, registered in this test and nowhere else: every check runs on it."""
    classifiers = {"ElectraForSequenceClassification": lambda model, hidden: model.classifier(hidden)}
    register_adapter(dataclasses.replace(BERT, model_types=("electra",), classifiers=classifiers))
    try:
        check_geometry("electra")
        check_macs("electra")
        check_slim_equals_masked("electra")
        check_save_and_reload("electra", tmp_path)
        check_kl_outputs("electra")
        check_fast_scores("electra")
        modes = refit_modes("electra")
        assert modes == ["weights", "scales"]
        for mode in modes:
            check_refit("electra", mode)
            check_nothing_pruned("electra", mode)
        check_refusals("electra")
    finally:  # the registry is one dict every module reads: the next test sees the shipped families only
        del ADAPTERS["electra"]
