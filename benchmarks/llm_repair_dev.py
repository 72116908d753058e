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
from optin_hf.refit_selection import select_by_refit
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.windows import calibration_windows, evaluation_windows, negative_log_likelihood

NAME = "shakespeare-smollm2"
PARTS = {"plain", "bias", "readers", "attnreaders", "mlpreaders"}


def fit(eq: NormalEquations, linear: nn.Linear, ridge: float) -> None:
    """Refit `linear` (in place) from its normal equations, with a bias where `eq` has the constant column (a zero
    one added where the module has none)."""
    theta0 = linear.weight.detach().T.double()
    if eq.bias:
        bias = linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        theta0 = torch.cat([theta0, bias.double()[None]])
    solved = solve_weights(eq, theta0, ridge)
    linear.weight.data = solved[: linear.in_features].T.float().contiguous()
    if eq.bias:
        linear.bias = nn.Parameter(solved[-1].float())


def fit_readers(readers: dict[str, nn.Linear], dense: dict[str, nn.Linear], pairs: list, rows: torch.Tensor | None,
                ridge: float) -> None:
    """Fit each slim reader from the slim normed input to its dense twin's output (at `rows`, None: all) over
    `pairs` of (slim input, dense input, real-token mask)."""
    width = next(iter(readers.values())).in_features
    eqs = {name: NormalEquations(width, lin.out_features, lin.weight.device, False) for name, lin in readers.items()}
    for slim_in, dense_in, real in pairs:
        for name, eq in eqs.items():
            target = dense[name](dense_in)
            eq.add(slim_in, target if rows is None else target[:, rows], real)
    for name, eq in eqs.items():
        fit(eq, readers[name], ridge)


@torch.no_grad()
def refit(slim: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list, ridge: float, bias: bool,
          readers: set[str]) -> None:
    """The layer-by-layer refit of a slim Llama (module docstring), in place; `readers`: "attn" and/or "mlp"."""
    streams = _streams(dense, check_model(dense), batches)
    for i, (student, teacher) in enumerate(zip(slim.model.layers, dense.model.layers)):
        attn, dense_attn = student.self_attn, teacher.self_attn
        if "attn" in readers:  # every KV group is kept at 0.8: all q/k/v rows
            names = ("q_proj", "k_proj", "v_proj")
            fit_readers({n: getattr(attn, n) for n in names}, {n: getattr(dense_attn, n) for n in names},
                        [(student.input_layernorm(s.student).flatten(0, 1), teacher.input_layernorm(s.teacher).flatten(0, 1),
                          s.real) for s in streams], None, ridge)
        eq = NormalEquations(attn.o_proj.in_features, attn.o_proj.out_features, attn.o_proj.weight.device, bias)
        for s in streams:
            seen = {}
            hook = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
            attn(hidden_states=student.input_layernorm(s.student), **s.calls[i].kwargs)
            hook.remove()
            dense_out = dense_attn(hidden_states=teacher.input_layernorm(s.teacher), **s.calls[i].kwargs)[0]
            s.x, s.target = seen["x"], s.teacher + dense_out  # the dense residual after attention
            eq.add(s.x.flatten(0, 1), (s.target - s.student).flatten(0, 1), s.real)
        fit(eq, attn.o_proj, ridge)
        for s in streams:
            s.residual = s.student + attn.o_proj(s.x)
        mlp, dense_mlp = student.mlp, teacher.mlp
        if "mlp" in readers:
            kept = masks.neuron_mask[i].nonzero().flatten()
            names = ("gate_proj", "up_proj")
            fit_readers({n: getattr(mlp, n) for n in names}, {n: getattr(dense_mlp, n) for n in names},
                        [(student.post_attention_layernorm(s.residual).flatten(0, 1),
                          teacher.post_attention_layernorm(s.target).flatten(0, 1), s.real) for s in streams], kept, ridge)
        eq = NormalEquations(mlp.down_proj.in_features, mlp.down_proj.out_features, mlp.down_proj.weight.device, bias)
        for s in streams:
            normed = student.post_attention_layernorm(s.residual)
            s.x = nn.functional.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed)
            s.teacher = s.target + dense_mlp(teacher.post_attention_layernorm(s.target))
            eq.add(s.x.flatten(0, 1), (s.teacher - s.residual).flatten(0, 1), s.real)
        fit(eq, mlp.down_proj, ridge)
        for s in streams:
            s.student = s.residual + mlp.down_proj(s.x)
            s.x = s.residual = s.target = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=512, help="refit windows (the selection reads the same)")
    parser.add_argument("--length", type=int, default=64, help="tokens per refit window")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--dev", type=int, default=32, help="development windows of 128 tokens")
    parser.add_argument("--groups", type=int, default=3, help="KV groups every layer keeps")
    parser.add_argument("--channels", type=int, default=1000, help="MLP channels every layer keeps")
    parser.add_argument("--variants", nargs="+", default=["plain"])
    args = parser.parse_args()
    for variant in args.variants:
        if not set(variant.split("+")) <= PARTS:
            parser.error(f"variant {variant!r}: combine {sorted(PARTS)} with '+'")
    torch.set_num_threads(1)
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
    masks = select_by_refit(dense, full.with_masks(heads, neurons), batches, args.ridge)
    print(f"refit selection at {args.groups} KV groups, {args.channels} channels: {time.perf_counter() - start:.0f} s",
          flush=True)
    for variant in args.variants:
        parts = set(variant.split("+"))
        readers = {"attn", "mlp"} if "readers" in parts else set()
        readers |= {"attn"} if "attnreaders" in parts else set()
        readers |= {"mlp"} if "mlpreaders" in parts else set()
        start = time.perf_counter()
        slim = slim_model(copy.deepcopy(dense), masks)
        refit(slim, dense, masks, batches, args.ridge, "bias" in parts, readers)
        print(f"{variant} ({args.windows} windows, ridge {args.ridge:g}): dev perplexity {perplexity(slim):.3f}, "
              f"slim + refit {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
