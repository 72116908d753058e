"""Repairs of the language-model default's uniform 0.8 model, tried on the development plays before any is built.

At 0.8 of the MACs every criterion's uniform split keeps all 3 KV groups and 1,000 of 1,536 MLP channels in every layer,
and the refit selection then re-chooses every unit, so the recipe's model needs no scoring: this script builds its masks
at those counts (`select_by_refit` on the refit windows), slims, and runs the layer-by-layer refit written out for a
Llama, so that variants of it can be compared on the 4 development plays that neither the calibration nor the test
reads (benchmarks/RESULTS.md, "Intercept, readers' refit and more windows"):

- `plain`: the library's refit (`o_proj` then `down_proj` per layer, no bias); gives `reconstruct`'s figure exactly.
- `bias`: `o_proj` and `down_proj` fitted with an intercept (FLAP's bias compensation done as least squares).
- `readers`: before each sublayer's output projection, its readers (`q/k/v_proj`; `gate/up_proj` at the kept channels)
  are fit from the slim model's normed input to the dense model's outputs of the same rows: the slim stream drifts
  from the dense one layer by layer, and the readers are linear in the normed stream. `attnreaders` / `mlpreaders`:
  one side only. Variants combine with "+" (`readers+bias`). Built since as `OptinConfig(reconstruct_inputs=True)`:
  the library's refit of the same masks gives the same development perplexity (78.295 at 768 windows).
- `sequential`: the MLP channels are chosen inside the loop rather than before it: each layer's `down_proj` normal
  equations are taken on the slim stream at every channel (after the readers, if any, are fit on every row), and the
  refit selection's OBS greedy keeps the mask's count of channels from the full-width least-squares fit
  (`keep_channels`); the dense-stream selection chooses from the dense model's own Gram. Not built (s38, RESULTS).
- `relative`: the output projections' fits weigh each token's row by 1 / RMS² of the dense residual stream they
  rebuild: every reader downstream (the next RMSNorm, the final norm) sees a token's error relative to its stream,
  and the first token of every window carries a stream 50-160x the median token's in layers 15-25 (8-13x in layers 5
  and 29: SmolLM2's attention sink), so the plain fit spends most of its squared error there. With `sequential` the selection reads the same
  weighted equations.

- `colridge`: every fit's ridge per column, λ_i = r · G_ii (`--column-ridge r`), instead of the library's
  ridge · mean(diag G): where SmolLM2 has massive channels the mean is theirs (layer 11's `down_proj` input: mean /
  median diagonal 4,829, 97% of its channels below 1e-3 of the mean), so the library's ridge all but freezes that
  layer's other channels at their weights. Not built (s39, RESULTS: r = 1e-3 and 3e-3 both worse).

Every fit is the refit's ridge least squares toward the module's own weights (`least_squares.solve_weights`).
The windows are drawn from the default's calibration plays: 30 since s35 (the rows of RESULTS before it read the 4
calibration plays of then; "Calibration windows from 30 plays" there).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/llm_repair_dev.py --windows 768 --variants plain readers
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.least_squares import NormalEquations, solve_weights
from optin_hf.masks import PruningMasks
from optin_hf.reconstruct import _streams
from optin_hf.refit_selection import greedy_removal, select_by_refit
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.windows import calibration_windows, evaluation_windows, negative_log_likelihood

NAME = "shakespeare-smollm2"
PARTS = {"plain", "bias", "readers", "attnreaders", "mlpreaders", "sequential", "relative", "colridge"}


def fit(eq: NormalEquations, linear: nn.Linear, ridge: float, column_ridge: float | None = None) -> None:
    """Refit `linear` (in place) from its normal equations, with a bias where `eq` has the constant column (a zero
    one added where the module has none). `column_ridge` r: each column's ridge r · G_ii (`colridge`) instead of the
    library's ridge · mean(diag G)."""
    theta0 = linear.weight.detach().T.double()
    if eq.bias:
        bias = linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        theta0 = torch.cat([theta0, bias.double()[None]])
    if column_ridge is None:
        solved = solve_weights(eq, theta0, ridge)
    else:
        lam = column_ridge * eq.gram.diagonal()
        solved = torch.linalg.solve(eq.gram + torch.diag(lam), eq.cross + lam[:, None] * theta0)
    linear.weight.data = solved[: linear.in_features].T.float().contiguous()
    if eq.bias:
        linear.bias = nn.Parameter(solved[-1].float())


def fit_readers(readers: dict[str, nn.Linear], dense: dict[str, nn.Linear], pairs: list, rows: torch.Tensor | None,
                ridge: float, column_ridge: float | None) -> None:
    """Fit each slim reader from the slim normed input to its dense twin's output (at `rows`, None: all) over
    `pairs` of (slim input, dense input, real-token mask)."""
    width = next(iter(readers.values())).in_features
    eqs = {name: NormalEquations(width, lin.out_features, lin.weight.device, False) for name, lin in readers.items()}
    for slim_in, dense_in, real in pairs:
        for name, eq in eqs.items():
            target = dense[name](dense_in)
            eq.add(slim_in, target if rows is None else target[:, rows], real)
    for name, eq in eqs.items():
        fit(eq, readers[name], ridge, column_ridge)


def keep_channels(mlp: nn.Module, eq: NormalEquations, keep: int, ridge: float) -> torch.Tensor:
    """The `keep` channels of a full-width `mlp` whose `down_proj` refit leaves the least error, chosen by the OBS
    greedy on the slim stream's normal equations `eq` (no bias): from the full-width fit θ* the error of dropping rows
    R and refitting the rest rises by θ*_Rᵀ ((G⁻¹)_RR)⁻¹ θ*_R, as for the dense selection (whose θ* is θ₀); `mlp` is
    cut to them in place (gate/up rows, down_proj columns)."""
    down = mlp.down_proj
    theta = solve_weights(eq, down.weight.detach().T.double(), ridge)
    columns = torch.arange(down.in_features)[:, None]
    removed, _ = greedy_removal(eq.gram, theta, columns, down.in_features - keep, ridge)
    kept = torch.ones(down.in_features, dtype=torch.bool)
    kept[removed] = False
    kept = kept.nonzero().flatten()
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        setattr(mlp, name, cut(lin, rows=kept))
    mlp.down_proj = cut(down, columns=kept)
    return kept


def cut(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    """A copy of a bias-free `linear` with only `rows` (outputs) or `columns` (inputs)."""
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    new.weight.data = weight.clone()
    return new


def sub_equations(eq: NormalEquations, kept: torch.Tensor) -> NormalEquations:
    """`eq` (no bias) restricted to the input columns `kept`."""
    sub = NormalEquations(len(kept), eq.residual_cross.shape[1], eq.gram.device, False, eq.start[kept])
    sub.gram, sub.residual_cross, sub.residual_sq = eq.gram[kept][:, kept], eq.residual_cross[kept], eq.residual_sq
    return sub


@torch.no_grad()
def refit(slim: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list, ridge: float, bias: bool,
          readers: set[str], sequential: bool = False, relative: bool = False, column_ridge: float | None = None) -> None:
    """The layer-by-layer refit of a slim Llama (module docstring), in place; `readers`: "attn" and/or "mlp".
    `sequential`: `slim` still has every MLP channel, and each layer keeps `masks`' count of them, chosen in the loop
    on the slim stream (`keep_channels`) after its readers are fit on every row. `relative`: each token's row of the
    output projections' fits weighted by 1 / RMS² of the dense stream it rebuilds (module docstring). `column_ridge`:
    every fit's ridge per column (`fit`)."""
    streams = _streams(dense, check_model(dense), batches)

    def weight(stream: torch.Tensor) -> torch.Tensor:  # [rows, 1]: the square root of each row's weight
        rows = stream.flatten(0, 1)
        return rows.pow(2).mean(-1, keepdim=True).rsqrt() if relative else rows.new_ones(rows.shape[0], 1)

    for i, (student, teacher) in enumerate(zip(slim.model.layers, dense.model.layers)):
        attn, dense_attn = student.self_attn, teacher.self_attn
        if "attn" in readers:  # every KV group is kept at 0.8: all q/k/v rows
            names = ("q_proj", "k_proj", "v_proj")
            fit_readers({n: getattr(attn, n) for n in names}, {n: getattr(dense_attn, n) for n in names},
                        [(student.input_layernorm(s.student).flatten(0, 1), teacher.input_layernorm(s.teacher).flatten(0, 1),
                          s.real) for s in streams], None, ridge, column_ridge)
        eq = NormalEquations(attn.o_proj.in_features, attn.o_proj.out_features, attn.o_proj.weight.device, bias)
        for s in streams:
            seen = {}
            hook = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
            attn(hidden_states=student.input_layernorm(s.student), **s.calls[i].kwargs)
            hook.remove()
            dense_out = dense_attn(hidden_states=teacher.input_layernorm(s.teacher), **s.calls[i].kwargs)[0]
            s.x, s.target = seen["x"], s.teacher + dense_out  # the dense residual after attention
            w = weight(s.target)
            eq.add(s.x.flatten(0, 1) * w, (s.target - s.student).flatten(0, 1) * w, s.real)
        fit(eq, attn.o_proj, ridge, column_ridge)
        for s in streams:
            s.residual = s.student + attn.o_proj(s.x)
        mlp, dense_mlp = student.mlp, teacher.mlp
        if "mlp" in readers:
            kept = None if sequential else masks.neuron_mask[i].nonzero().flatten()
            names = ("gate_proj", "up_proj")
            fit_readers({n: getattr(mlp, n) for n in names}, {n: getattr(dense_mlp, n) for n in names},
                        [(student.post_attention_layernorm(s.residual).flatten(0, 1),
                          teacher.post_attention_layernorm(s.target).flatten(0, 1), s.real) for s in streams], kept, ridge,
                        column_ridge)
        eq = NormalEquations(mlp.down_proj.in_features, mlp.down_proj.out_features, mlp.down_proj.weight.device, bias)
        for s in streams:
            normed = student.post_attention_layernorm(s.residual)
            s.x = nn.functional.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed)
            s.teacher = s.target + dense_mlp(teacher.post_attention_layernorm(s.target))
            w = weight(s.teacher)
            eq.add(s.x.flatten(0, 1) * w, (s.teacher - s.residual).flatten(0, 1) * w, s.real)
        if sequential:
            kept = keep_channels(mlp, eq, int(masks.neuron_mask[i].sum()), ridge)
            eq = sub_equations(eq, kept)
            for s in streams:
                s.x = s.x[..., kept]
        fit(eq, mlp.down_proj, ridge, column_ridge)
        for s in streams:
            s.student = s.residual + mlp.down_proj(s.x)
            s.x = s.residual = s.target = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=512, help="refit windows (the selection reads the same)")
    parser.add_argument("--selection-windows", type=int, metavar="N",
                        help="the refit selection's Grams on the first N refit windows only (default: all)")
    parser.add_argument("--length", type=int, default=64, help="tokens per refit window")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--dev", type=int, default=32, help="development windows of 128 tokens")
    parser.add_argument("--groups", type=int, default=3, help="KV groups every layer keeps")
    parser.add_argument("--channels", type=int, default=1000, help="MLP channels every layer keeps")
    parser.add_argument("--variants", nargs="+", default=["plain"])
    parser.add_argument("--column-ridge", type=float, default=1e-3, help="r of `colridge`: each column's ridge r · G_ii")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the rows of RESULTS before s38)")
    args = parser.parse_args()
    for variant in args.variants:
        if not set(variant.split("+")) <= PARTS:
            parser.error(f"variant {variant!r}: combine {sorted(PARTS)} with '+'")
    torch.set_num_threads(args.threads)
    task = load_default(NAME)
    dense = task.model.eval()
    registry = RECIPES[NAME]
    development = CORPORA[registry.corpus]().development(registry.split)
    windows = evaluation_windows(development, "text", task.processor, task.eval_window, args.dev)

    def perplexity(model: nn.Module) -> float:
        nll, tokens = negative_log_likelihood(model, windows)
        return math.exp(nll / tokens)

    print(f"dense dev perplexity {perplexity(dense):.3f} on {len(windows)} windows", flush=True)
    calibration = calibration_windows(task.calibration, "text", task.processor, args.length, args.windows, 0)
    batches = prepare_calibration(calibration, None, num_samples=args.windows, batch_size=32, max_length=args.length,
                                  config=dense.config)
    full = PruningMasks.full(dense.config)
    heads, neurons = full.head_mask.clone(), full.neuron_mask.clone()
    heads[:, args.groups:] = False
    neurons[:, args.channels:] = False  # the counts only: the selection re-chooses every unit
    start = time.perf_counter()
    chosen_on = batches if args.selection_windows is None else batches[: -(-args.selection_windows // 32)]
    masks = select_by_refit(dense, full.with_masks(heads, neurons), chosen_on, args.ridge)
    print(f"refit selection at {args.groups} KV groups, {args.channels} channels on {len(chosen_on)} batches: "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for variant in args.variants:
        parts = set(variant.split("+"))
        readers = {"attn", "mlp"} if "readers" in parts else set()
        readers |= {"attn"} if "attnreaders" in parts else set()
        readers |= {"mlp"} if "mlpreaders" in parts else set()
        start = time.perf_counter()
        if "sequential" in parts:  # every channel kept until the loop chooses (3 KV groups: the attention is whole)
            slim = slim_model(copy.deepcopy(dense), masks.with_masks(masks.head_mask, torch.ones_like(masks.neuron_mask)))
        else:
            slim = slim_model(copy.deepcopy(dense), masks)
        refit(slim, dense, masks, batches, args.ridge, "bias" in parts, readers, "sequential" in parts, "relative" in parts,
              args.column_ridge if "colridge" in parts else None)
        print(f"{variant} ({args.windows} windows, ridge {args.ridge:g}): dev perplexity {perplexity(slim):.3f}, "
              f"slim + refit {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
