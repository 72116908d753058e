"""optin_hf/refit_selection.py: which units each layer drops, chosen by the error the refit leaves.

The greedy choice is checked against brute force over every subset on tiny layers, its predicted error against an
independent least-squares refit, and the pipeline on tiny BERT, a grouped-query Llama and ResNet (whose heads the
refit does not fit)."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
from tiny import FAMILIES, calibration, tiny_model

from optin_hf import OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model, get_submodule
from optin_hf.commands.args import build_parser
from optin_hf.commands.jobs import optin_config
from optin_hf.data import prepare_calibration
import optin_hf.refit_selection as refit_selection_module
from optin_hf.refit_selection import greedy_removal, select_by_refit, unit_columns

pytestmark = pytest.mark.usefixtures("one_thread")

RIDGE = 1e-3
# Greedy OBS is not exact in general (a unit removed early may have been what later ones needed). On the layers
# below (7 units whose columns share 4 factors; 30 seeds tried while writing this) it found the best subset in
# 83-85% of cases, was 1.1x the best's error on average and 2.2x at worst (removing 4 of 7 one-column units):
# the factors asserted, on the seeds run here.
GREEDY_FACTOR = 2.5


def layer(seed: int, units: int, width: int, out: int = 5, rows: int = 60) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs X [rows, units*width] whose columns share 4 latent factors (so units can stand in for each other),
    with an offset (the bias column matters), and θ₀ [units*width + 1, out] (the last row: the bias)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 4, generator=g, dtype=torch.float64)
    x = latent @ torch.randn(4, units * width, generator=g, dtype=torch.float64)
    x = x + 0.3 * torch.randn(rows, units * width, generator=g, dtype=torch.float64) + 0.5
    return x, torch.randn(units * width + 1, out, generator=g, dtype=torch.float64), torch.arange(units * width).view(units, width)


def refit_error(x: torch.Tensor, theta: torch.Tensor, columns: torch.Tensor, removed) -> float:
    """min over the kept rows θ_S of |Aθ - Aθ₀|² + λ|θ - θ₀|² with the removed units' rows zero (A = [x, 1]), by
    a least-squares solve of the stacked system: independent of the Schur-complement formula."""
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    lam = RIDGE * (a.T @ a).diagonal().mean()
    keep = torch.ones(a.shape[1], dtype=torch.bool)
    keep[columns[list(removed)].flatten()] = False
    stacked = torch.cat([a[:, keep], lam.sqrt() * torch.eye(int(keep.sum()), dtype=x.dtype)])
    target = torch.cat([a @ theta, lam.sqrt() * theta[keep]])
    solution = torch.linalg.lstsq(stacked, target).solution
    return float((stacked @ solution - target).pow(2).sum() + lam * theta[~keep].pow(2).sum())


def gram(x: torch.Tensor) -> torch.Tensor:
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return a.T @ a


@pytest.mark.parametrize("width", [1, 3])  # a neuron owns one column, a head several
def test_greedy_choice_is_within_the_stated_factor_of_the_best_subset(width: int) -> None:
    units, ratios = 7, []
    for seed in range(6):
        x, theta, columns = layer(seed, units, width)
        for remove in (1, 2, 3, 4):
            removed, increase = greedy_removal(gram(x), theta, columns, remove, RIDGE)
            assert len(set(removed)) == remove
            error = refit_error(x, theta, columns, removed)
            assert increase == pytest.approx(error, rel=1e-6)  # the OBS bookkeeping predicts the refit's error
            best = min(refit_error(x, theta, columns, subset) for subset in itertools.combinations(range(units), remove))
            ratios.append(error / best)
            if remove == 1:  # one removal: the exact Schur complement, so greedy is optimal
                assert error == pytest.approx(best, rel=1e-9)
    assert max(ratios) <= GREEDY_FACTOR
    assert sum(ratios) / len(ratios) <= 1.15
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 0.75 * len(ratios)


def test_greedy_beats_dropping_the_smallest_weights() -> None:
    """Dropping the units of least weight norm ignores what the refit can rebuild: on correlated columns the
    greedy choice leaves less error in total."""
    greedy = smallest = 0.0
    for seed in range(6):
        x, theta, columns = layer(seed, 8, 2)
        removed, _ = greedy_removal(gram(x), theta, columns, 4, RIDGE)
        greedy += refit_error(x, theta, columns, removed)
        norms = theta[columns].pow(2).sum((1, 2))
        smallest += refit_error(x, theta, columns, norms.argsort()[:4].tolist())
    assert greedy < 0.9 * smallest  # 18% less on these seeds


def test_inputs_that_are_all_zero_drop_the_smallest_weights() -> None:
    """A projection without a bias whose inputs are zero on every calibration token has a Gram of zeros: no choice
    changes the refit's error, the greedy does not fail on the singular matrix, and the ridge alone drops the units of
    least weight."""
    _, theta, columns = layer(0, 6, 2)
    theta = theta[:-1]  # no bias row
    removed, increase = greedy_removal(torch.zeros(12, 12, dtype=torch.float64), theta, columns, 3, RIDGE)
    norms = theta[columns].pow(2).sum((1, 2))
    assert sorted(removed) == sorted(norms.argsort()[:3].tolist()) and increase >= 0


def test_several_removals_per_round_keep_the_exact_joint_update() -> None:
    """More removals than rounds: each round drops a block together, and the predicted error is still the refit's."""
    x, theta, columns = layer(0, 12, 1)
    one_each, exact = greedy_removal(gram(x), theta, columns, 9, RIDGE)
    blocks, joint = greedy_removal(gram(x), theta, columns, 9, RIDGE, rounds=3)
    assert len(set(blocks)) == 9
    assert joint == pytest.approx(refit_error(x, theta, columns, blocks), rel=1e-6)
    assert exact == pytest.approx(refit_error(x, theta, columns, one_each), rel=1e-6)


@pytest.mark.parametrize("rounds", [9, 3])
def test_the_trace_is_the_post_refit_error_after_every_round(rounds: int) -> None:
    """`trace` records the error curve a per-layer allocation reads: after each round, the units removed so far and
    the error an independent refit leaves without them; the last entry is the returned increase."""
    x, theta, columns = layer(1, 12, 2)
    trace: list[tuple[int, float]] = []
    removed, increase = greedy_removal(gram(x), theta, columns, 9, RIDGE, rounds=rounds, trace=trace)
    assert [count for count, _ in trace] == ([3, 6, 9] if rounds == 3 else list(range(1, 10)))
    for count, error in trace:
        assert error == pytest.approx(refit_error(x, theta, columns, removed[:count]), rel=1e-6)
    assert trace[-1] == (9, increase)


def shrinking_greedy(gram: torch.Tensor, theta: torch.Tensor, columns: torch.Tensor, remove: int, ridge: float,
                     rounds: int) -> tuple[list[int], float]:
    """The greedy OBS removal written the direct way (the implementation before the in-place factor): each round
    solves every remaining unit's block, then shrinks θ and G⁻¹ to the kept rows by the Schur complement."""
    g = gram.double()
    inverse = torch.linalg.inv(g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype))
    theta, alive, where = theta.double().clone(), torch.arange(columns.shape[0]), columns.clone()
    removed, increase = [], 0.0
    rounds = max(1, min(rounds, remove))
    for step in range(rounds):
        count = -(-(remove - len(removed)) // (rounds - step))
        block, rows = inverse[where[:, :, None], where[:, None, :]], theta[where]
        picked = (rows * torch.linalg.solve(block, rows)).sum((1, 2)).topk(count, largest=False).indices
        gone = where[picked].flatten()
        keep = torch.ones(theta.shape[0], dtype=torch.bool)
        keep[gone] = False
        solved = torch.linalg.solve(inverse[gone][:, gone], torch.cat([theta[gone], inverse[gone][:, keep]], dim=1))
        increase += float((theta[gone] * solved[:, : theta.shape[1]]).sum())
        link = inverse[keep][:, gone]
        theta = theta[keep] - link @ solved[:, : theta.shape[1]]
        inverse = inverse[keep][:, keep] - link @ solved[:, theta.shape[1]:]
        removed += alive[picked].tolist()
        stay = torch.ones(len(alive), dtype=torch.bool)
        stay[picked] = False
        alive, where = alive[stay], (keep.cumsum(0) - 1)[where[stay]]
    return removed, increase


@pytest.mark.parametrize(
    "units, width, segments, remove, rounds",
    [(64, 1, 1, 40, 256), (64, 1, 1, 50, 7), (12, 4, 1, 7, 256), (6, 3, 2, 4, 2), (3, 8, 2, 1, 256), (4, 8, 2, 3, 256)],
)
def test_the_in_place_factor_makes_the_direct_greedys_choices(units, width, segments, remove, rounds) -> None:
    """greedy_removal keeps G⁻¹ as a fixed inverse minus a growing factor instead of shrinking it each round: the
    same units, in the same order, and the same predicted error as the direct computation, for one-column neurons,
    heads, and KV groups whose rows lie in separate segments (q heads of a group: segments of one unit's columns),
    one or several units a round."""
    x, theta, _ = layer(seed=units, units=units, width=width * segments, out=7, rows=4 * units * width * segments)
    columns = torch.arange(units * width * segments).view(segments, units, width).transpose(0, 1).reshape(units, -1)
    removed, increase = greedy_removal(gram(x), theta, columns, remove, RIDGE, rounds)
    expected, expected_increase = shrinking_greedy(gram(x), theta, columns, remove, RIDGE, rounds)
    assert removed == expected
    assert increase == pytest.approx(expected_increase, rel=1e-9)
    assert increase == pytest.approx(refit_error(x, theta, columns, removed), rel=1e-6)


def batches(name: str, n: int = 16) -> list[dict[str, torch.Tensor]]:
    return prepare_calibration(FAMILIES[name].examples(n, 1), num_samples=n, batch_size=8, max_length=64)


def half_masks(model, seed: int = 0) -> PruningMasks:
    """Random masks keeping about half of each layer's units, layer 0 keeping every head and layer 1 none."""
    full = PruningMasks.full(model.config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(full.head_mask.shape, generator=g) > 0.5
    neurons = torch.rand(full.neuron_mask.shape, generator=g) > 0.5
    heads[0], heads[1] = True, False
    return full.with_masks(heads, neurons)


def test_wide_units_are_chosen_on_two_threads_as_on_one() -> None:
    """Units of 192 columns (SmolLM2's KV groups): torch 2.13's batched LU inverse hung on 2 threads there (MKL's
    DLASWP error), which a pruning to 0.5 of the MACs met; run apart, so a hang fails instead of stalling the suite."""
    script = """
import torch
from optin_hf.refit_selection import greedy_removal
torch.manual_seed(0)
x, theta = torch.randn(1024, 576, dtype=torch.float64), torch.randn(576, 64, dtype=torch.float64)
columns = torch.arange(576).view(3, 192)
chosen = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    chosen.append(greedy_removal(x.T @ x, theta, columns, 2, 1e-3)[0])
print(chosen[0] == chosen[1], len(chosen[1]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "2"]


def test_counts_stay_and_layers_keeping_all_or_none_are_left_alone() -> None:
    model = tiny_model("bert")
    masks = half_masks(model)
    selected = select_by_refit(model, masks, batches("bert"))
    assert selected.heads_per_layer() == masks.heads_per_layer()
    assert selected.neurons_per_layer() == masks.neurons_per_layer()
    assert torch.equal(selected.head_mask[:2], masks.head_mask[:2])
    assert not torch.equal(selected.neuron_mask, masks.neuron_mask)  # random masks are not the refit's choice


def test_grams_too_large_together_are_accumulated_a_group_at_a_time_with_the_same_choice(monkeypatch, count_calls) -> None:
    """Where the sublayers' Grams would not fit in memory together (Llama-3.1-8B's: 57 GB), each group of them gets
    its own dense run; the choice is the one-run choice, and the last run is kept for the refit."""
    model = FAMILIES["llama"].build()
    masks = half_masks(model)
    whole = select_by_refit(model, masks, batches("llama"))
    runs = count_calls(refit_selection_module, "dense_calls")
    config = model.config
    one = 8 * config.intermediate_size ** 2  # room for one FFN Gram (or a few attention Grams) at a time
    monkeypatch.setattr(refit_selection_module, "GRAM_MEMORY", one)
    apart = select_by_refit(model, masks, batches("llama"))
    assert torch.equal(apart.head_mask, whole.head_mask) and torch.equal(apart.neuron_mask, whole.neuron_mask)

    def cut(mask):  # sublayers whose layer keeps some but not all of its units: the ones the selection fits
        kept = mask.sum(1)
        return int(((kept > 0) & (kept < mask.shape[1])).sum())

    attention, ffn = cut(masks.head_mask), cut(masks.neuron_mask)
    per_group = one // (8 * config.hidden_size ** 2)  # attention Grams that fit together
    assert attention > 0 and per_group == 2
    assert len(runs) == -(-attention // per_group) + ffn > 1  # the attention sublayers come first, then the FFNs


def test_refit_selection_lowers_the_refit_error_at_the_same_counts() -> None:
    """selection='refit' keeps the allocation's counts and leaves the refit less to repair than the scores' choice."""
    errors, masks = {}, {}
    for selection in ("scores", "refit"):
        model = tiny_model("bert")
        config = OptinConfig(mac_constraint=0.5, importance="magnitude", reconstruct="weights", selection=selection,
                             num_samples=16, batch_size=8, neurons_multiple_of=4)
        pruner = OptinPruner(config)
        pruner.prune_model(model, calibration("bert", 16))
        errors[selection] = sum(after for _, _, _, after in pruner.reconstruction.errors)
        masks[selection] = pruner.masks
    assert masks["refit"].heads_per_layer() == masks["scores"].heads_per_layer()
    assert masks["refit"].neurons_per_layer() == masks["scores"].neurons_per_layer()
    assert all(n % 4 == 0 for n in masks["refit"].neurons_per_layer())
    assert not torch.equal(masks["refit"].neuron_mask, masks["scores"].neuron_mask)
    assert errors["refit"] < errors["scores"]


def test_masks_given_to_prune_model_are_kept() -> None:
    model = tiny_model("bert")
    masks = half_masks(model)
    pruner = OptinPruner(OptinConfig(reconstruct="weights", selection="refit"))
    pruner.prune_model(model, calibration("bert", 8), masks=masks)
    assert pruner.masks is masks


def test_compute_masks_applies_the_selection_so_the_space_prunes_as_the_cli() -> None:
    """The Space allocates with compute_masks (from cached scores) and hands the masks to prune_model: the refit's
    unit choice must be in them, the same masks prune_model chooses itself; without data it is one clear error."""
    config = OptinConfig(mac_constraint=0.5, importance="magnitude", reconstruct="weights", selection="refit")
    data = calibration("bert", 8)
    chosen = OptinPruner(config)
    chosen.prune_model(tiny_model("bert"), data)
    model = tiny_model("bert")
    masks = OptinPruner(config).compute_masks(model, data)
    assert torch.equal(masks.head_mask, chosen.masks.head_mask) and torch.equal(masks.neuron_mask, chosen.masks.neuron_mask)
    unselected = OptinPruner(dataclasses.replace(config, selection="scores")).compute_masks(model, data)
    assert not torch.equal(unselected.neuron_mask, masks.neuron_mask)
    scores = OptinPruner(config).compute_scores(model, data)
    with pytest.raises(ValueError, match="selection='refit' chooses units by the refit's error on calibration data: pass data"):
        OptinPruner(dataclasses.replace(config, seq_len=8)).compute_masks(model, scores=scores)


def test_a_kv_group_owns_its_query_heads_columns_and_the_cheapest_group_goes() -> None:
    """Grouped-query Llama: a unit is a KV group, g query heads' o_proj columns. With one group removed per layer
    the greedy choice is exact, so it must be the group whose removal an independent refit finds cheapest."""
    model = FAMILIES["llama"].build()
    adapter = check_model(model)
    config = model.config
    groups, g = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert g > 1
    columns = unit_columns(adapter, config, "attn_out", groups, g * head_dim, config.hidden_size)
    assert torch.equal(columns[1], torch.arange(g * head_dim, 2 * g * head_dim))
    full = PruningMasks.full(config, adapter)
    heads = full.head_mask.clone()
    heads[:, 0] = False  # one group removed per layer
    masks = full.with_masks(heads, full.neuron_mask)
    data = batches("llama")
    selected = select_by_refit(model, masks, data, RIDGE, adapter)
    assert selected.heads_per_layer() == masks.heads_per_layer()
    real = torch.cat([b["attention_mask"].reshape(-1).bool() for b in data])
    for i, layer in enumerate(adapter.layers_of(model)):  # 2 groups, 3 layers: a wrong choice passes with odds 1/8
        o_proj = get_submodule(layer, adapter.attn_out)
        seen = []
        handle = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            for batch in data:
                model(**batch)
        handle.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()[real]
        theta = o_proj.weight.detach().double().T  # no bias in Llama's o_proj
        lam = RIDGE * (x.T @ x).diagonal().mean()

        def error(group: int) -> float:
            keep = torch.ones(x.shape[1], dtype=torch.bool)
            keep[columns[group]] = False
            stacked = torch.cat([x[:, keep], lam.sqrt() * torch.eye(int(keep.sum()), dtype=x.dtype)])
            target = torch.cat([x @ theta, lam.sqrt() * theta[keep]])
            solution = torch.linalg.lstsq(stacked, target).solution
            return float((stacked @ solution - target).pow(2).sum() + lam * theta[~keep].pow(2).sum())

        cheapest = min(range(groups), key=error)
        assert selected.head_mask[i].tolist() == [group != cheapest for group in range(groups)]


def test_resnet_heads_the_refit_does_not_fit_keep_the_allocations_choice() -> None:
    """ResNet's "heads" feed its 3x3 conv, which the refit leaves: they stay as allocated; its neurons are
    re-chosen. reconstruct='auto' resolves to a refit (not the BatchNorm repair) when the selection needs one."""
    model = FAMILIES["resnet"].build()
    full = PruningMasks.full(model.config)
    present_heads, present_neurons = full.present()
    g = torch.Generator().manual_seed(0)
    masks = full.with_masks(present_heads & (torch.rand(present_heads.shape, generator=g) > 0.5),
                            present_neurons & (torch.rand(present_neurons.shape, generator=g) > 0.5))
    selected = select_by_refit(model, masks, batches("resnet", 8))
    assert torch.equal(selected.head_mask, masks.head_mask)
    assert selected.neurons_per_layer() == masks.neurons_per_layer()
    assert not torch.equal(selected.neuron_mask, masks.neuron_mask)
    pruner = OptinPruner(OptinConfig(importance="magnitude", selection="refit", num_samples=4, batch_size=2))
    pruner.prune_model(model, FAMILIES["resnet"].examples(4, 1))
    assert pruner.config.reconstruct == pruner.reconstruction.mode == "weights"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"selection": "obs"}, "selection='obs' is unknown; choose one of ['scores', 'refit']"),
        ({"selection": "refit", "reconstruct": "none"}, "selection='refit' chooses units by the loss left after the refit"),
        ({"selection": "refit", "reconstruct": "batchnorm"}, "set reconstruct='weights'"),
    ],
)
def test_a_bad_selection_is_one_clear_error(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        OptinConfig(**settings)


def test_the_cli_flag_and_the_saved_config_carry_the_selection(tmp_path, capsys) -> None:
    args = build_parser("optin-hf").parse_args(["prune", "--model", "some/model", "--selection", "refit"])
    config = optin_config(args)
    assert config.selection == "refit"
    config.save_pretrained(tmp_path)
    assert OptinConfig.from_pretrained(tmp_path).selection == "refit"
    with pytest.raises(SystemExit):
        build_parser("optin-hf").parse_args(["prune", "--selection", "obs"])
    assert "invalid choice: 'obs'" in capsys.readouterr().err
