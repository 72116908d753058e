"""optin_hf/reconstruct.py: the least-squares refit after slimming, on tiny models of every family. That each refit
lowers its sublayers' error, on every family that takes it, is tests/test_conformance.py's."""

from __future__ import annotations

import copy

import pytest
import torch
from huggingface_hub import create_repo, upload_folder
from tiny import ARCHS, batch, calibration, family, output, tiny_model

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.hooks import apply_masks
from optin_hf.reconstruct import apply_reconstruction, reconstruct, unslim
from optin_hf.slim import slim_model


def batches(arch: str, n: int = 24) -> list[dict[str, torch.Tensor]]:
    return prepare_calibration(calibration(arch, n), num_samples=n, batch_size=8, max_length=64)


def random_masks(model, seed: int = 0) -> PruningMasks:
    """About half of the units, with layer 1 keeping no head and layer 2 no neuron."""
    full = PruningMasks.full(model.config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(full.head_mask.shape, generator=g) > 0.4
    neurons = torch.rand(full.neuron_mask.shape, generator=g) > 0.5
    heads[0, 0] = neurons[0, 0] = True
    heads[1], neurons[2] = False, False
    return PruningMasks(heads, neurons)


@pytest.mark.parametrize("mode", ["weights", "scales"])
@pytest.mark.parametrize("arch", ARCHS)
def test_nothing_pruned_reproduces_the_dense_model(arch: str, mode: str) -> None:
    # The ridge pulls toward the weights the kept units had, and with nothing pruned those fit the
    # dense sums exactly, so the solution is the original weights; what is left is the float64
    # solve's rounding, cast back to float32 (~1e-6 on logits of size ~1).
    model, dense = tiny_model(arch), tiny_model(arch)
    slim_model(model, PruningMasks.full(model.config))
    reconstruct(model, dense, batches(arch), mode)
    inputs = batch(arch)
    torch.testing.assert_close(output(model, inputs), output(dense, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["weights", "scales"])
def test_ridge_zero_with_a_dead_unit_moves_it_least(mode: str) -> None:
    # reconstruct_ridge=0 with a kept neuron that never fires: its column of the Gram is zero, so the normal equations
    # are singular. The refit takes the least-squares solution nearest the old weights (the ridge's limit), neither an
    # error nor a blow-up: the dead neuron's down-projection column (or scale) stays, no error rises, outputs are finite.
    dense = tiny_model("bert")
    with torch.no_grad():
        up = dense.bert.encoder.layer[0].intermediate.dense
        up.weight[3], up.bias[3] = 0.0, -100.0  # GELU(-100) is 0 on every token
    masks = random_masks(dense)
    masks.neuron_mask[0, 3] = True
    model = slim_model(copy.deepcopy(dense), masks)
    dead = masks.neuron_mask[0].nonzero().flatten().tolist().index(3)
    column = model.bert.encoder.layer[0].output.dense.weight[:, dead].clone()
    result = reconstruct(model, dense, batches("bert"), mode, ridge=0.0)
    torch.testing.assert_close(model.bert.encoder.layer[0].output.dense.weight[:, dead], column)
    assert all(after <= before * (1 + 1e-6) + 1e-9 for *_, before, after in result.errors)
    assert torch.isfinite(output(model, batch("bert"))).all()


def test_activations_that_overflow_are_one_clear_error() -> None:
    # An overflow in the forward (inf, then NaN) would solve to NaN weights: refused, naming the cause and the fix.
    dense = tiny_model("bert")
    with torch.no_grad():
        dense.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("inf")
    model = slim_model(copy.deepcopy(dense), random_masks(dense))
    with pytest.raises(ValueError, match="activations are not finite .* float32 or bfloat16"):
        reconstruct(model, dense, batches("bert"), "weights")


def test_scales_refit_only_rescales_kept_units() -> None:
    dense = tiny_model("bert")
    model = slim_model(copy.deepcopy(dense), random_masks(dense))
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = reconstruct(model, dense, batches("bert"), "scales")
    head_dim = check_model(model).head_dim(model.config)
    for key, scale in result.tensors.items():
        _, i, sub, kind = key.split(".")
        assert kind == "scale"
        name = f"bert.encoder.layer.{i}." + {"attn_out": "attention.output.dense", "ffn_down": "output.dense"}[sub]
        unit = head_dim if sub == "attn_out" else 1
        expected = before[f"{name}.weight"] * scale.repeat_interleave(unit)[None, :]
        torch.testing.assert_close(dict(model.named_parameters())[f"{name}.weight"], expected)
        assert torch.equal(dict(model.named_parameters())[f"{name}.bias"], before[f"{name}.bias"])


def test_token_merged_vit_is_refit_on_the_same_tokens() -> None:
    # With every head and neuron kept, the dense stream merged by the pruned model's matches is the
    # pruned stream itself: the refit must change nothing. A dense stream merged differently would.
    dense = tiny_model("vit")
    full = PruningMasks.full(dense.config)
    masks = PruningMasks(full.head_mask, full.neuron_mask, torch.tensor([17, 13, 9]))
    merged = slim_model(copy.deepcopy(dense), masks)
    model = slim_model(copy.deepcopy(dense), masks)
    reconstruct(model, dense, batches("vit"), "weights")
    inputs = batch("vit")
    torch.testing.assert_close(output(model, inputs), output(merged, inputs), atol=1e-5, rtol=1e-5)

    pruned = random_masks(dense)
    pruned = PruningMasks(pruned.head_mask, pruned.neuron_mask, masks.token_schedule)
    model = slim_model(copy.deepcopy(dense), pruned)
    result = reconstruct(model, dense, batches("vit"), "weights")
    assert all(after <= before for _, _, before, after in result.errors)
    with pytest.raises(ValueError, match="inputs=True .* token merging .* inputs=False"):
        reconstruct(model, dense, batches("vit"), "weights", inputs=True, masks=pruned)


@pytest.mark.parametrize("mode", ["weights", "scales"])
def test_reconstructed_model_survives_save_and_load(tmp_path, mode: str) -> None:
    model = tiny_model("bert", attn="sdpa")  # what from_pretrained picks
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct=mode))
    pruner.prune_model(model, calibration("bert"))
    assert pruner.reconstruction is not None and model.config.optin["reconstruct"] == mode
    pruner.save(model, tmp_path / "slim")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "slim")
    inputs = batch("bert")
    assert torch.equal(output(loaded, inputs), output(model, inputs))


def test_scales_reapplied_to_a_fresh_slim_model_give_the_same_outputs() -> None:
    # What AutoOptinModel does with a masks-only repo: slim the base, then apply the saved tensors.
    dense, masks = tiny_model("bert"), random_masks(tiny_model("bert"))
    model = slim_model(copy.deepcopy(dense), masks)
    plain = slim_model(copy.deepcopy(dense), masks)
    tensors = reconstruct(model, dense, batches("bert"), "scales").tensors
    inputs = batch("bert")
    assert not torch.allclose(output(plain, inputs), output(model, inputs))
    apply_reconstruction(plain, tensors)
    assert torch.equal(output(plain, inputs), output(model, inputs))


def test_reconstruction_needs_data_and_matching_tensors() -> None:
    model = tiny_model("bert")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12))
    with pytest.raises(ValueError, match="reconstruct='weights'.*pass data.*reconstruct='none'"):
        pruner.prune_model(model, masks=random_masks(model))
    slim = slim_model(tiny_model("bert"), random_masks(model))
    other = slim_model(tiny_model("bert"), PruningMasks.full(model.config))
    tensors = reconstruct(other, tiny_model("bert"), batches("bert"), "weights").tensors
    with pytest.raises(ValueError, match="layers.0.attn_out.weight has shape .* other masks"):
        apply_reconstruction(slim, tensors)
    with pytest.raises(ValueError, match="'layers.9.ffn_down.bias', which is not a reconstruction tensor"):
        apply_reconstruction(slim, {"layers.9.ffn_down.bias": torch.zeros(32)})


def test_unslim_computes_what_the_slim_model_computes() -> None:
    dense, masks = tiny_model("bert"), random_masks(tiny_model("bert"))
    model = slim_model(copy.deepcopy(dense), masks)
    reconstruct(model, dense, batches("bert"), "weights")
    wide = unslim(model, dense, masks)
    inputs = batch("bert")
    torch.testing.assert_close(output(wide, inputs), output(model, inputs), atol=1e-5, rtol=1e-5)


def test_pruning_in_steps_keeps_a_subset_of_each_step_and_meets_the_budget() -> None:
    model, data = tiny_model("bert"), calibration("bert")
    config = OptinConfig(mac_constraint=0.5, importance="optin", md_tokens=40, prune_steps=2, neurons_multiple_of=4)
    pruner = OptinPruner(config)
    first = OptinPruner(OptinConfig(**{**config.to_dict(), "prune_steps": 1, "mac_constraint": 0.75}))
    step_one = first.compute_masks(model, data)
    masks = pruner.compute_masks(model, data)
    assert not (masks.head_mask & ~step_one.head_mask).any() and not (masks.neuron_mask & ~step_one.neuron_mask).any()
    base = count_macs(model, pruner.seq_len)
    pruner.prune_model(model, data, masks=masks)
    assert 0.98 * 0.5 * base <= count_macs(model, pruner.seq_len) <= 0.5 * base


def test_unslim_carries_the_refit_input_projections() -> None:
    """After the input refit, the wide copy the scoring engine runs computes what the slim model computes: the refit
    query/key/value and intermediate rows sit at the features they keep."""
    dense, masks = tiny_model("bert"), random_masks(tiny_model("bert"))
    model = slim_model(copy.deepcopy(dense), masks)
    result = reconstruct(model, dense, batches("bert"), "weights", inputs=True, masks=masks)
    assert any(".inputs." in key for key in result.tensors)
    inputs = batch("bert")
    with apply_masks(wide := unslim(model, dense, masks), check_model(dense), masks.head_mask.float(), masks.neuron_mask.float()):
        torch.testing.assert_close(output(wide, inputs), output(model, inputs), atol=1e-5, rtol=1e-5)


def test_the_input_refit_needs_the_weights_refit_and_no_token_merging() -> None:
    with pytest.raises(ValueError, match=r"reconstruct_inputs=True .* reconstruct='scales' does not run: set reconstruct='weights'"):
        OptinConfig(reconstruct="scales", reconstruct_inputs=True)
    with pytest.raises(ValueError, match="reconstruct_inputs=True .* token mode's merges .* prune_tokens=False"):
        OptinConfig(reconstruct_inputs=True, prune_tokens=True)
    dense, masks = tiny_model("bert"), random_masks(tiny_model("bert"))
    with pytest.raises(ValueError, match="inputs=True .* pass mode='weights' and masks"):
        reconstruct(slim_model(copy.deepcopy(dense), masks), dense, batches("bert"), "weights", inputs=True)


def test_the_search_refits_the_input_projections_of_the_weights_candidates() -> None:
    """Under importance="auto" each candidate whose repair is the weights refit runs the input refit the config asks
    for: the kept run's artifact holds the input projections and its config says so."""
    model = tiny_model("bert")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, seq_len=12, reconstruct="weights", reconstruct_inputs=True))
    pruner.prune_model(model, calibration("bert", 24))
    assert pruner.config.reconstruct == "weights" and pruner.config.reconstruct_inputs
    assert any(".inputs." in key for key in pruner.reconstruction.tensors)


def test_the_input_refit_reloads_masks_only_from_the_hub_and_generates_the_same_tokens(hub_server, tmp_path) -> None:
    """A Llama (grouped KV heads, a gated MLP) pruned with the input refit, pushed masks-only naming its base on the
    (local) Hub: the reload applies the refit input projections, so logits and greedy tokens equal the pruned model's."""
    tiny = family("llama")
    dense = tiny.build()
    dense.save_pretrained(tmp_path / "base")
    base_id = create_repo("tiny-llama").repo_id
    upload_folder(repo_id=base_id, folder_path=tmp_path / "base")
    model = type(dense).from_pretrained(base_id).eval()
    tiny.eager(model)
    pruner = OptinPruner(OptinConfig(**{**tiny.settings, "importance": "magnitude", "reconstruct": "weights",
                                        "reconstruct_inputs": True}))
    pruner.prune_model(model, tiny.examples(4, 1))
    keys = [key for key in pruner.reconstruction.tensors if ".inputs." in key]
    assert any("q_proj" in key for key in keys) and any("gate_proj" in key for key in keys)
    repo = pruner.push_to_hub(model, "tiny-llama-optin").repo_url.repo_id
    loaded = AutoOptinModel.from_pretrained(repo)
    tiny.eager(loaded)
    prompts = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(prompts).logits, model(prompts).logits)
        greedy = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompts))
        assert torch.equal(loaded.generate(prompts, **greedy), model.generate(prompts, **greedy))


def test_float32_sums_resolve_a_small_residual_next_to_a_large_target():
    """The refit's sums are float32 per batch, taken against the residual Y - Aθ₀: where θ₀ (float32 weights, as a
    model's) explains Y up to a residual 2e-4 of it, the error of θ₀ and the refit's change are still those of a
    float64 least squares (float32 sums of Y itself put θ₀'s error 3.4% off here: Y's rounding swamps the residual's
    square)."""
    from optin_hf.least_squares import NormalEquations, solve_weights

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=gen) * 10
    theta0 = torch.randn(33, 8, generator=gen).double()  # 32 weights and a bias row
    a = torch.cat([x.double(), torch.ones(4096, 1, dtype=torch.float64)], dim=1)
    y = a @ theta0 + 1e-2 * torch.randn(4096, 8, generator=gen, dtype=torch.float64)  # |Y| about 60
    eq = NormalEquations(32, 8, x.device, bias=True, start=theta0)
    for rows in torch.arange(4096).split(1024):
        eq.add(x[rows], y[rows].float(), None)
    residual = y.float().double() - a @ theta0  # the target as the model hands it over, in float32
    assert eq.error(theta0) == pytest.approx(float(residual.pow(2).sum()), rel=1e-3)
    exact = torch.linalg.solve(a.T @ a + 1e-3 * (a.T @ a).diagonal().mean() * torch.eye(33, dtype=torch.float64),
                               a.T @ residual)
    change = solve_weights(eq, theta0, 1e-3) - theta0
    assert float((change - exact).norm() / exact.norm()) < 0.01


def test_drift_sums_give_the_normal_equations_of_the_dense_twins_output():
    """The input refit's sums (`DriftEquations`: AᵀA, AᵀΔ, ΔᵀΔ of the slim input and its drift from the dense one) give
    the normal equations of a fit to the dense twin's output x_d θ_d, from a start θ₀ that differs from θ_d (a model
    refit before): the same AᵀY, the same error for any θ and the same solution as float64 sums of that output; and
    where nothing drifted (x_d = x, θ_d = θ₀) the fit returns θ₀ exactly."""
    from optin_hf.least_squares import DriftEquations, NormalEquations, solve_weights

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=gen)
    x_dense = x + 0.1 * torch.randn(512, 12, generator=gen)
    real = torch.rand(512, generator=gen) > 0.2
    theta_dense = torch.randn(13, 5, generator=gen).double()  # 12 weights and a bias row
    theta0 = theta_dense + 0.05 * torch.randn(13, 5, generator=gen, dtype=torch.float64)
    drift = DriftEquations(12, x.device, bias=True)
    for rows in torch.arange(512).split(128):
        drift.add(x[rows], x_dense[rows], real[rows])
    eq = drift.equations(theta_dense, theta0)
    a = torch.cat([x.double(), torch.ones(512, 1, dtype=torch.float64)], dim=1)[real]
    y = torch.cat([x_dense.double(), torch.ones(512, 1, dtype=torch.float64)], dim=1)[real] @ theta_dense
    reference = NormalEquations(12, 5, x.device, bias=True)
    reference.gram, reference.residual_cross, reference.residual_sq = a.T @ a, a.T @ y, y.pow(2).sum()
    torch.testing.assert_close(eq.cross, reference.cross, rtol=1e-5, atol=1e-4)
    for theta in (theta0, theta_dense, torch.zeros_like(theta0)):
        assert eq.error(theta) == pytest.approx(reference.error(theta), rel=1e-5)
    torch.testing.assert_close(solve_weights(eq, theta0, 1e-3), solve_weights(reference, theta0, 1e-3), rtol=1e-5, atol=1e-6)
    still = DriftEquations(12, x.device, bias=True)
    still.add(x, x, None)
    assert torch.equal(solve_weights(still.equations(theta0, theta0), theta0, 1e-3), theta0)


@pytest.mark.parametrize("width", [100, 577, 1537])
def test_the_gram_from_its_upper_blocks_is_the_full_product(width: int) -> None:
    """`least_squares.gram` (the refits' AᵀA, from the upper block triangle above 256 columns, in unequal blocks at
    577 and 1,537) is exactly symmetric and equals the float64 product up to float32 rounding."""
    from optin_hf.least_squares import gram

    a = torch.randn(300, width, generator=torch.Generator().manual_seed(width))
    g = gram(a)
    assert torch.equal(g, g.T)
    torch.testing.assert_close(g.double(), a.double().T @ a.double(), rtol=1e-5, atol=1e-3)
