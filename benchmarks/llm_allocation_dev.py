"""Per-layer counts for the language-model default chosen by the post-refit errors, tried on the development plays.

The recipe keeps the same counts in every layer (3 KV groups and 1,000 of 1,536 MLP channels at 0.8 of the MACs) and
chooses the units by the refit selection (`optin_hf.refit_selection`: the OBS greedy on each output projection's Gram).
That greedy predicts, for every (layer, kind), the error the refit leaves after each removal (`greedy_removal(...,
trace=)`); run deeper than the uniform count (about two units a round, down to `--least-*` units) it gives each layer's
error curve err_l(k). Here the counts are chosen from those curves under the MAC budget: the segments of every curve's
lower convex hull (error against MACs saved), least error per MAC first, until the budget is met, then units given back
where they relieve most (`refit_allocation._give_back`), with the errors made comparable across layers by one of
(`--norms`):

- `output`: divided by the dense sublayer output's energy on the same tokens, tr(θ₀ᵀ XᵀX θ₀);
- `residual`: divided by the dense residual stream's energy at the layer's input, Σ|h_l|² over the same tokens;
- `token`: each token's rows divided by the RMS of its residual stream at the layer's input before the Gram, so the
  curve sums every token's relative perturbation (SmolLM2's residual energy is dominated by a few tokens' massive
  activations from layer 12 on: x457 there);
- `optin`: the plain Gram's curves times each layer's transfer factor from the recipe's OPTIN scores (the median over
  the layer's scored units of their balanced score per unit of the error their removal leaves unrefit at the
  projection's output, `transfer_factors`; `--optin-scores` keeps the scores);
- `kl`: the `token` curves times each layer's factor from OPTIN's raw KL term alone (its MD sums every later layer's
  distortion, so it favours early layers by construction): the median over the layer's scored units of their KL per
  unit of unrefit error on the relative Gram (`kl_factors`; `--optin-scores` then keeps the raw KL and neuron order);
- `flap`: no curve, FLAP's own per-layer counts (its scores' budget search, `--scores-dir`; a diagnostic);
- `uniform`: the recipe's counts at 0.8 (3 KV groups, 1,000 channels), to compare selections.

Units: where the curves were computed in this run, the plain-Gram refit selection at the chosen counts
(`select_by_refit`'s greedy on the kept plain Grams); otherwise (curves read from `--curves`) each curve's greedy
prefix (the plain Gram's for `output`/`residual`, the relative one's for `token`). `--kinds neuron` keeps every KV
group. The model is then slimmed and repaired as the recipe does (`OptinPruner.prune_model`: 768 refit windows, the
input refit) and measured on the 4 development plays that neither the calibration nor the test reads
(benchmarks/RESULTS.md, "Per-layer counts from the post-refit error curves").

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/llm_allocation_dev.py --norms token --budgets 0.8 0.6 --curves C.json
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/llm_allocation_dev.py --norms optin --budgets 0.8 --optin-scores S.safetensors
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from optin_hf import ImportanceScores, OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.least_squares import NormalEquations, stacked_theta
from optin_hf.macs import CostModel
from optin_hf.masks import PruningMasks
from optin_hf.reconstruct import _call, _streams, output_projection
from optin_hf.refit_allocation import _Cut, _give_back, _masks
from optin_hf.refit_selection import KINDS, greedy_removal, unit_columns
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.windows import calibration_windows, evaluation_windows, negative_log_likelihood

NAME = "shakespeare-smollm2"


@dataclasses.dataclass
class Curve:
    """One (layer, kind)'s greedy: its units, the removal order and the error after each round, and the two
    normalisers (both from the Gram the curve was run on: the relative one's under `token`)."""

    width: int
    order: list[int]
    trace: list[tuple[int, float]]
    output_energy: float
    residual_energy: float
    transfer: float = 1.0  # `optin`: the layer's OPTIN score per unit of unrefit output error (`transfer_factors`)


@torch.no_grad()
def curves(dense, batches, ridge: float, least: dict[str, int], weighted: bool = False, keep: dict | None = None
           ) -> dict[tuple[int, str], Curve]:
    """Every (layer, sublayer)'s post-refit error curve, down to `least[kind]` units kept. `weighted`: each token's
    rows divided by the RMS of its residual stream at the layer's input, so the curve is the summed relative
    perturbation of every token's stream (no token's massive activation dominates it); `keep` then gets each
    (layer, kind)'s plain Gram, θ₀ and columns, for the refit selection at the chosen counts."""
    adapter = check_model(dense)
    config = dense.config
    geometry = adapter.layer_geometry(config)
    streams = _streams(dense, adapter, batches)
    out = {}
    greedy_s = 0.0
    for i, layer in enumerate(adapter.layers_of(dense)):
        subs = [sub for sub, _ in KINDS]
        projections = {sub: output_projection(adapter, layer, sub) for sub in subs}
        grams = {sub: NormalEquations(p.in_features, 0, p.device, p.has_bias) for sub, p in projections.items()}
        relative = {sub: NormalEquations(p.in_features, 0, p.device, p.has_bias) for sub, p in projections.items()}
        taps = {sub: (p.module, "in") for sub, p in projections.items()}
        residual = 0.0
        for s in streams:
            call = s.calls[i]
            h = call.hidden.flatten(0, 1).double()
            residual += float((h[s.real] if s.real is not None else h).pow(2).sum())
            seen = _call(layer, call.hidden, call.args, call.kwargs, taps, stop=subs[-1])
            for sub, proj in projections.items():
                rows = proj.rows(seen[sub])
                grams[sub].add(rows, rows.new_zeros(rows.shape[0], 0), s.real)
                if weighted:
                    scale = call.hidden.flatten(0, 1).pow(2).mean(-1).add(1e-12).rsqrt()[:, None]
                    relative[sub].add(rows * scale, rows.new_zeros(rows.shape[0], 0), s.real)
        start = time.process_time()
        for sub, kind in KINDS:
            g = geometry[i]
            units, width = (g.heads, g.head_dim) if sub == "attn_out" else (g.neurons, 1)
            proj = projections[sub]
            columns = unit_columns(adapter, config, sub, units, width, proj.in_features)
            theta = stacked_theta(proj.weight(), proj.bias(), adapter.branch_scale(layer, sub)).double()
            gram = relative[sub].gram if weighted else grams[sub].gram
            if keep is not None:
                keep[(i, kind)] = (grams[sub].gram, theta, columns, relative[sub].gram if weighted else None)
            trace: list[tuple[int, float]] = []
            depth = units - least[kind]
            # about two units a round, as the recipe's selection removes 536 channels in 256 rounds
            order, _ = greedy_removal(gram, theta, columns, depth, ridge, rounds=max(1, depth // 2), trace=trace)
            energy = float((theta * (gram @ theta)).sum())
            out[(i, kind)] = Curve(units, order, trace, energy, residual)
        greedy_s += time.process_time() - start
    print(f"greedy to the curves' depth: {greedy_s:.1f} CPU s", flush=True)
    del streams
    return out


def set_medians(found: dict[tuple[int, str], Curve], ratios: dict[int, list[float]], label: str) -> None:
    """Each layer's median ratio as its curves' `transfer`, printed under `label`."""
    medians = {i: float(torch.tensor(r).median()) for i, r in ratios.items()}
    for (i, _), c in found.items():
        c.transfer = medians[i]
    print(f"{label}: " + " ".join(f"{i}:{m:.3g}" for i, m in sorted(medians.items())), flush=True)


def transfer_factors(found: dict[tuple[int, str], Curve], plain: dict, scores: ImportanceScores) -> None:
    """Each layer's OPTIN score per unit of unrefit output error, set on its curves (`Curve.transfer`): for every scored
    unit of the layer (a KV group; a group of neurons, which share one score value), its balanced score over
    tr(θ_Rᵀ X_Rᵀ X_R θ_R), the error its removal alone leaves at the projection's output before any refit; the median
    over the layer's units of both kinds. A curve times it estimates what the post-refit error costs downstream."""
    ratios: dict[int, list[float]] = {}
    for (i, kind), (gram, theta, columns, _) in plain.items():
        row = (scores.head_scores if kind == "head" else scores.neuron_scores)[i].double()
        groups = [torch.nonzero(row == v).flatten() for v in torch.unique(row)] if kind == "neuron" else \
            [torch.tensor([u]) for u in range(len(row))]
        for units in groups:
            r = columns[units].flatten()
            error = float((theta[r] * (gram[r][:, r] @ theta[r])).sum())
            if error > 0:
                ratios.setdefault(i, []).append(float(row[units].sum()) / error)
    set_medians(found, ratios, "transfer factors")


def kl_factors(found: dict[tuple[int, str], Curve], plain: dict, raw: dict[str, torch.Tensor]) -> None:
    """`transfer_factors` with OPTIN's raw KL term alone over the relative Gram's unrefit error (`kl`): `raw` holds the
    scoring's KL per head (KV group) and per neuron group [layers, groups], and the neurons' order by output energy
    (group j of a layer: places 256 j ... 256 (j + 1) - 1 of its order)."""
    ratios: dict[int, list[float]] = {}
    for (i, kind), (_, theta, columns, relative) in plain.items():
        kl = raw[f"{kind}_kl"][i].double()
        size = -(-columns.shape[0] // kl.numel())
        members = [torch.tensor([u]) for u in range(kl.numel())] if kind == "head" else \
            [raw["neuron_order"][i, j * size:(j + 1) * size] for j in range(kl.numel())]
        for j, units in enumerate(members):
            r = columns[units].flatten()
            error = float((theta[r] * (relative[r][:, r] @ theta[r])).sum())
            if error > 0 and kl[j] > 0:
                ratios.setdefault(i, []).append(float(kl[j]) / error)
    set_medians(found, ratios, "KL factors")


def raw_kl(base: dict, budget: float, dense, calibration) -> dict[str, torch.Tensor]:
    """The recipe's OPTIN scoring, keeping its raw KL terms (before `balance` mixes them with MD) and its neuron order."""
    import optin_hf.importance.optin as optin_module

    seen: dict[str, torch.Tensor] = {}
    balance, order = optin_module.balance, optin_module.neuron_energy_order

    def keep_kl(md, kl, lam):
        seen["head_kl" if "head_kl" not in seen else "neuron_kl"] = kl.clone()
        return balance(md, kl, lam)

    def keep_order(*args):
        seen["neuron_order"] = order(*args)
        return seen["neuron_order"]

    optin_module.balance, optin_module.neuron_energy_order = keep_kl, keep_order
    try:
        OptinPruner(OptinConfig.from_dict({**base, "mac_constraint": budget})).compute_scores(dense, calibration)
    finally:
        optin_module.balance, optin_module.neuron_energy_order = balance, order
    return seen


def allocation(found: dict[tuple[int, str], Curve], norm: str, dense, budget: float, seq_len: int,
               kinds: tuple[str, ...] = ("head", "neuron"), least_groups: int = 1) -> PruningMasks:
    """Per-layer counts from the normalised curves within `budget` MACs: the segments of every curve's lower convex
    hull (error against MACs saved) taken in order of least error per MAC until the budget is met, then units given
    back where they relieve most while they fit (`refit_allocation._give_back`). Units: each greedy's order, the
    last removed first back (its prefix is the refit selection at that count)."""
    costs = CostModel.of(dense)
    units = costs.units
    at = costs.at(costs.uniform(seq_len))
    unit_cost = {"head": at.head.tolist(), "neuron": at.neuron.tolist()}
    cuts, segments = [], []
    for (i, kind), c in found.items():
        if kind not in kinds:  # that kind stays whole in every layer
            continue
        scale = {"output": c.output_energy, "residual": c.residual_energy, "token": 1.0, "optin": 1 / c.transfer,
                 "kl": 1 / c.transfer}[norm]
        least = least_groups if kind == "head" else 0  # a curve read from a file may reach deeper than asked now
        kept = [c.width] + [c.width - r for r, _ in c.trace if c.width - r >= least]
        loss = [0.0] + [e / scale for r, e in c.trace if c.width - r >= least]
        cut = _Cut(kind, i, c.width, 1, kept, loss)
        cuts.append(cut)
        hull = [0]
        for j in range(1, len(kept)):  # lower convex hull over (units removed, loss), monotone chain
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                cross = (kept[a] - kept[b]) * (loss[j] - loss[a]) - (kept[a] - kept[j]) * (loss[b] - loss[a])
                if cross > 0:
                    break
                hull.pop()
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            saved = (kept[a] - kept[b]) * unit_cost[kind][i]
            segments.append(((loss[b] - loss[a]) / saved, saved, cut, kept[b]))
    counts = {"head": units.head_mask.sum(1).tolist(), "neuron": units.neuron_mask.sum(1).tolist()}
    now = at.macs(counts["head"], counts["neuron"])
    for _, saved, cut, count in sorted(segments, key=lambda s: s[0]):
        if now <= budget:
            break
        counts[cut.kind][cut.layer] = count
        now -= saved
    _give_back(cuts, counts, at, budget)
    return _masks(orders_of(found, units), units, counts)


def orders_of(found: dict[tuple[int, str], Curve], units: PruningMasks) -> dict[str, torch.Tensor]:
    """Each layer's units, the never-removed first, then the greedy's removals last-removed first."""
    orders = {}
    for kind, mask in (("head", units.head_mask), ("neuron", units.neuron_mask)):
        rows = []
        for i in range(mask.shape[0]):
            removed = found[(i, kind)].order
            gone = set(removed)
            rows.append(torch.tensor([u for u in range(mask.shape[1]) if u not in gone] + removed[::-1]))
        orders[kind] = torch.stack(rows)
    return orders


def select(found: dict[tuple[int, str], Curve], counts: PruningMasks) -> PruningMasks:
    """The refit selection at `counts`' per-layer counts: each greedy's prefix."""
    for (i, kind), c in found.items():
        kept = int((counts.head_mask if kind == "head" else counts.neuron_mask)[i].sum())
        if kept < c.width - len(c.order):
            raise ValueError(f"layer {i} keeps {kept} {kind}s, below the curve's depth: lower --least-*")
    numbers = {"head": counts.head_mask.sum(1).tolist(), "neuron": counts.neuron_mask.sum(1).tolist()}
    return _masks(orders_of(found, counts), counts.with_masks(torch.ones_like(counts.head_mask),
                                                              torch.ones_like(counts.neuron_mask)), numbers)


def reselect(plain: dict, counts: PruningMasks, ridge: float) -> PruningMasks:
    """`select_by_refit` at `counts`' per-layer counts, from the kept plain Grams."""
    heads, neurons = counts.head_mask.clone(), counts.neuron_mask.clone()
    for (i, kind), (gram, theta, columns, _) in plain.items():
        mask = heads if kind == "head" else neurons
        kept = int(mask[i].sum())
        mask[i] = True
        if 0 < kept < len(columns):
            removed, _ = greedy_removal(gram, theta, columns, len(columns) - kept, ridge)
            mask[i, removed] = False
    return counts.with_masks(heads, neurons, counts.token_schedule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--norms", nargs="+", default=["token"], choices=["residual", "output", "token", "optin", "kl", "flap", "uniform"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8])
    parser.add_argument("--least-groups", type=int, default=1, help="KV groups every layer keeps at least")
    parser.add_argument("--least-channels", type=int, default=64, help="MLP channels every layer keeps at least")
    parser.add_argument("--kinds", nargs="+", default=["head", "neuron"], help="the kinds the allocation cuts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: two runs side by side)")
    parser.add_argument("--windows", type=int, help="refit windows (the curves and the refit read them; default: the recipe's)")
    parser.add_argument("--curves", help="a JSON file of the curves: read if it exists, else written")
    parser.add_argument("--optin-scores", help="the recipe's OPTIN scores (norm optin): read if the file exists, else written")
    parser.add_argument("--scores-dir", default="/tmp/s30/llm/scores", help="FLAP's scores (norm flap)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = load_default(NAME)
    dense = task.model.eval()
    recipe = default_recipe(NAME).optin
    if args.windows:
        recipe = dataclasses.replace(recipe, reconstruct_samples=args.windows)
    base = {**recipe.to_dict(), "max_scoring_time": None}
    registry = RECIPES[NAME]
    development = CORPORA[registry.corpus]().development(registry.split)
    windows = evaluation_windows(development, "text", task.processor, task.eval_window, 32)

    def perplexity(model) -> float:
        nll, tokens = negative_log_likelihood(model, windows)
        return math.exp(nll / tokens)

    print(f"dense dev perplexity {perplexity(dense):.3f} on {len(windows)} windows", flush=True)
    wanted = max(recipe.num_samples, recipe.reconstruct_samples)
    calibration = calibration_windows(task.calibration, "text", task.processor, recipe.max_length, wanted, recipe.seed)
    batches = prepare_calibration(calibration, None, num_samples=recipe.reconstruct_samples, batch_size=32,
                                  max_length=recipe.max_length, config=dense.config)
    start = time.perf_counter()
    plain: dict = {}
    if args.curves and Path(args.curves).exists():
        found = {(int(k.split()[0]), k.split()[1]): Curve(**v) for k, v in json.loads(Path(args.curves).read_text()).items()}
    else:
        weighted = "token" in args.norms or "kl" in args.norms
        found = curves(dense, batches, recipe.reconstruct_ridge, {"head": args.least_groups, "neuron": args.least_channels},
                       weighted, plain)
        if args.curves:
            Path(args.curves).write_text(json.dumps({f"{i} {k}": dataclasses.asdict(c) for (i, k), c in found.items()}))
    print(f"curves: {time.perf_counter() - start:.0f} s wall", flush=True)
    if "optin" in args.norms:
        if not plain:
            raise SystemExit("--norms optin needs the plain Grams of this run: no --curves file to read")
        if args.optin_scores and Path(args.optin_scores).exists():
            scores = ImportanceScores.load(args.optin_scores)
        else:
            scorer = OptinPruner(OptinConfig.from_dict({**base, "mac_constraint": args.budgets[0]}))
            start = time.perf_counter()
            scores = scorer.compute_scores(dense, calibration)
            print(f"OPTIN scores: {time.perf_counter() - start:.0f} s wall", flush=True)
            if args.optin_scores:
                scores.save(args.optin_scores)
        transfer_factors(found, plain, scores)
    if "kl" in args.norms:
        if not plain:
            raise SystemExit("--norms kl needs the Grams of this run: no --curves file to read")
        if args.optin_scores and Path(args.optin_scores).exists():
            from safetensors.torch import load_file
            raw = load_file(args.optin_scores)
        else:
            start = time.perf_counter()
            raw = raw_kl(base, args.budgets[0], dense, calibration)
            print(f"OPTIN scores (raw KL kept): {time.perf_counter() - start:.0f} s wall", flush=True)
            if args.optin_scores:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in raw.items()}, args.optin_scores)
        kl_factors(found, plain, raw)
    del batches
    dense_macs = count_macs(dense, recipe.seq_len)
    dense_parameters = sum(p.numel() for p in dense.parameters())
    for budget in args.budgets:
        for norm in args.norms:
            start = time.process_time()
            if norm == "flap":
                pruner = OptinPruner(OptinConfig.from_dict({**base, "importance": "flap", "mac_constraint": budget,
                                                            "uniform_layers": False, "selection": "scores"}))
                scores = ImportanceScores.load(f"{args.scores_dir}/flap.safetensors")
                counts = pruner.compute_masks(dense, calibration, scores=scores)
            elif norm == "uniform":  # the recipe's counts at 0.8
                full = PruningMasks.full(dense.config)
                heads, neurons = full.head_mask.clone(), full.neuron_mask.clone()
                neurons[:, 1000:] = False
                counts = full.with_masks(heads, neurons)
            else:
                counts = allocation(found, norm, dense, budget * dense_macs, recipe.seq_len, tuple(args.kinds),
                                    args.least_groups)
            if plain:  # the recipe's refit selection (plain Grams) at the counts
                masks = reselect(plain, counts, recipe.reconstruct_ridge)
            else:
                masks = select(found, counts)
            chosen_s = time.process_time() - start
            heads, neurons = masks.head_mask.sum(1).tolist(), masks.neuron_mask.sum(1).tolist()
            print(f"[{norm} @{budget}] allocation + selection {chosen_s:.1f} CPU s; KV groups {heads}; channels {neurons}",
                  flush=True)
            for (i, kind), c in sorted(found.items()):
                kept = (heads if kind == "head" else neurons)[i]
                err = dict([(c.width, 0.0)] + [(c.width - r, e) for r, e in c.trace])
                at = err.get(kept)
                print(f"  layer {i:2d} {kind:6} kept {kept:5d}  err/out {'' if at is None else f'{at / c.output_energy:.4f}'}"
                      f"  err/resid {'' if at is None else f'{at / c.residual_energy:.2e}'}  out/resid "
                      f"{c.output_energy / c.residual_energy:.3e}")
            settings = {**base, "mac_constraint": budget, "uniform_layers": False}
            pruner = OptinPruner(OptinConfig.from_dict(settings))
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            pruner.prune_model(model, calibration, masks=masks)
            seconds = time.perf_counter() - start
            macs = count_macs(model, recipe.seq_len) / dense_macs
            removed = 1 - sum(p.numel() for p in model.parameters()) / dense_parameters
            print(f"[{norm} @{budget}] dev perplexity {perplexity(model):.3f}, MACs x{macs:.4f}, {100 * removed:.1f}% of the "
                  f"parameters removed, slim + refit {seconds:.0f} s", flush=True)
            del model


if __name__ == "__main__":
    main()
