"""Development runs for the digit-scenes SegFormer's pruning settings, on scenes the test split never uses.

The default's calibration digits (disjoint from the training and the test digits) are cut in two
halves: development calibration scenes are made of one half, development evaluation scenes of the
other, so settings are chosen on handwriting that neither the model's training nor the test split
holds, and the development calibration never shares a digit with what it is judged on. Each
variant (OptinConfig settings over the recipe's) scores once per calibration draw (a seeded
shuffle, as the CLI draws) and is allocated, slimmed and refit at every budget; with
`allocation: refit` the refit cuts are measured once per draw and every budget allocated from them
(as `OptinPruner` does for one budget).

`--split test` runs the same on the default's own calibration and test splits (the figures RESULTS
reports, once the settings are chosen here on the development split).

`--rounds N` runs the refit allocation in N rounds down a ladder of budgets (`allocation_rounds=N`).
`--levels N` measures each (layer, kind) at N depths instead of the library's 4; `--held-out N` refits each
measured cut on all but every N-th calibration batch and judges it on those (the library does both on all).
A variant with `selection: refit` re-chooses the units at the refit allocation's counts, as `prune_model` does.
`--fold 1` swaps the two halves (calibration scenes from the second, evaluation scenes from the first): on it the
recipe loses about what it loses on the test split, where fold 0 loses less. `--evaluation-scenes N` judges on N
scenes (300 by default; 1000 make the figures steadier). `--price-links` prices each cut of the refit allocation with the
link refit too (`optin_hf.link_refit`), as the final repair runs it; the library prices the cuts with the layers' refit.
A variant with `reconstruct_inputs: true` refits the input projections too, in the refit allocation's cuts as in the
final repair (as the library does). `--repair label=JSON` (repeatable) repairs the variant's masks once more per label
with those settings over the variant's final repair, the allocation run once: `inputs={"reconstruct_inputs": true}` gives
the input refit in the final repair alone, on the very same units (the masks were chosen without it).

    python benchmarks/segformer_dev.py [--budgets 0.6 0.5] [--draws 0 1 2] [--variant label=JSON ...] [--split test]
        [--levels 4] [--held-out 0] [--calibration-scenes 128] [--fold 0] [--evaluation-scenes 300] [--price-links]
        [--repair label=JSON ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.macs import CostModel
from optin_hf import refit_allocation
from optin_hf.refit_allocation import allocate_by_refit, allocate_cuts, measure_cuts, unit_orders
from optin_hf.refit_selection import select_by_refit
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.scenes import scene_dataset
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.report import kept_per_layer, mean_iou_on

NAME = "digit-scenes-segformer"
DEV_SEEDS = (7001, 7002)  # scene draws of their own: no split of the default uses these seeds


def development_splits(calibration_scenes: int = 128, evaluation_scenes: int = 300, fold: int = 0):
    """(calibration, evaluation) scenes of the two halves of the default's calibration digits; fold 1 swaps the halves."""
    recipe = RECIPES[NAME]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    pool = corpus.pools(recipe.split)["calibration"]
    half = len(pool) // 2
    halves = (pool[:half], pool[half:]) if fold == 0 else (pool[half:], pool[:half])
    return (scene_dataset(corpus.images, corpus.digits, halves[0], calibration_scenes, DEV_SEEDS[0]),
            scene_dataset(corpus.images, corpus.digits, halves[1], evaluation_scenes, DEV_SEEDS[1]))


def refit_counts(pruner: OptinPruner, model, scores, data, held_out: int = 0, links: bool = False):
    """`allocation="refit"` for every budget from one measurement: a function budget -> masks. `held_out` > 0: each
    cut is refit on all but every `held_out`-th calibration batch and its loss measured on those (the library refits
    and measures on the same batches). `links`: each cut is refit with the link refit too (`optin_hf.link_refit`: the
    later patch embedding and the decode head's projections), as the final repair is; the library prices the cuts
    with the layers' refit alone."""
    adapter, c = check_model(model), pruner.config
    costs = CostModel.of(model, adapter, pruner.image_size)
    orders = unit_orders(scores.head_scores, scores.neuron_scores, costs.units)
    batches = pruner._reconstruction_batches(model, adapter, data, None)
    reconstruct = c.reconstruct if c.reconstruct != "auto" else adapter.capabilities.auto_repair()
    library = refit_allocation.reconstruct
    if links:
        refit_allocation.reconstruct = lambda *args, **kwargs: library(*args, **{**kwargs, "refit_convs": True})
    if held_out:
        fit = [b for i, b in enumerate(batches) if i % held_out]
        batches = [b for i, b in enumerate(batches) if not i % held_out]
        refit_allocation.reconstruct = lambda trial, dense, _, *args, **kwargs: library(trial, dense, fit, *args, **kwargs)
    try:
        cuts = measure_cuts(model, adapter, orders, costs.units, batches, reconstruct, c.reconstruct_ridge,
                            prune_heads=c.prune_heads, prune_neurons=c.prune_neurons, neurons_multiple_of=c.neurons_multiple_of,
                            inputs=c.reconstruct_inputs)
    finally:
        refit_allocation.reconstruct = library
    at = costs.at(costs.uniform(pruner.seq_len))
    return lambda budget: allocate_cuts(copy.deepcopy(cuts), orders, at, costs.units, budget * costs.dense(pruner.seq_len))


def ladder(pruner: OptinPruner, model, scores, data, steps: int):
    """budget -> masks of the refit allocation in `steps` rounds (`allocation_rounds`), each measured from the
    previous round's counts."""
    adapter, c = check_model(model), pruner.config
    costs = CostModel.of(model, adapter, pruner.image_size)
    batches = pruner._reconstruction_batches(model, adapter, data, None)
    at, dense = costs.at(costs.uniform(pruner.seq_len)), costs.dense(pruner.seq_len)
    return lambda budget: allocate_by_refit(model, adapter, scores.head_scores, scores.neuron_scores, at, costs.units, budget * dense,
                                            batches, c.reconstruct, c.reconstruct_ridge, prune_heads=c.prune_heads,
                                            prune_neurons=c.prune_neurons, neurons_multiple_of=c.neurons_multiple_of, rounds=steps,
                                            inputs=c.reconstruct_inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.5])
    parser.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2], help="calibration shuffle seeds")
    parser.add_argument("--variant", action="append", default=[], help='label=JSON settings, e.g. \'kl={"num_samples": 64}\'')
    parser.add_argument("--calibration-scenes", type=int, default=128)
    parser.add_argument("--evaluation-scenes", type=int, default=300, help="development evaluation scenes")
    parser.add_argument("--fold", type=int, choices=[0, 1], default=0, help="development fold: 1 swaps the two halves of the digits")
    parser.add_argument("--split", choices=["development", "test"], default="development")
    parser.add_argument("--rounds", type=int, default=1, help="allocation: refit in this many rounds (1: the library's)")
    parser.add_argument("--held-out", type=int, default=0, help="allocation: refit judged on every N-th calibration batch, refit on the rest")
    parser.add_argument("--price-links", action="store_true", help="allocation: refit prices each cut with the link refit too")
    parser.add_argument("--repair", action="append", default=[],
                        help='label=JSON final-repair settings tried on the same masks, e.g. \'inputs={"reconstruct_inputs": true}\'')
    parser.add_argument("--levels", type=int, default=refit_allocation.LEVELS, help="measured depths per (layer, kind) of allocation: refit")
    args = parser.parse_args()
    refit_allocation.LEVELS = args.levels  # read by measure_cuts (a library constant: this compares finer depths)
    task = load_default(NAME)
    if args.split == "test":
        calibration, evaluation = task.calibration, task.test
    else:
        calibration, evaluation = development_splits(args.calibration_scenes, args.evaluation_scenes, args.fold)
    dense = mean_iou_on(task.model, evaluation)
    print(f"{args.split}: {len(calibration)} calibration scenes, {len(evaluation)} evaluation scenes; dense mIoU {dense:.3f}", flush=True)
    recipe = default_recipe(NAME).optin.to_dict()
    for text in args.variant or ["recipe={}"]:
        label, settings = text.split("=", 1)
        for draw in args.draws:
            data = calibration.shuffle(seed=draw)
            base = {**recipe, **json.loads(settings)}
            scorer = OptinPruner(OptinConfig.from_dict(base))
            # one step: every budget is allocated from the same scores (as benchmarks/quality.py does)
            scores = scorer.compute_scores(task.model, data) if base.get("prune_steps", 1) == 1 else None
            counts = None
            if base.get("allocation") == "refit":  # in rounds: down a ladder of budgets (allocation_rounds)
                counts = (ladder(scorer, task.model, scores, data, args.rounds) if args.rounds > 1
                          else refit_counts(scorer, task.model, scores, data, args.held_out, args.price_links))
            repairs = [("", {})] + [(f"+{name}", json.loads(extra)) for name, extra in (r.split("=", 1) for r in args.repair)]
            cells = {name: [] for name, _ in repairs}
            for budget in args.budgets:
                pruner = OptinPruner(OptinConfig.from_dict({**base, "mac_constraint": budget, "seq_len": scorer.seq_len}))
                start = time.perf_counter()
                if counts is not None:
                    masks = counts(budget)
                    if base.get("selection") == "refit":  # prune_model re-chooses only the masks it allocates itself
                        batches = pruner._reconstruction_batches(task.model, check_model(task.model), data, None)
                        masks = select_by_refit(task.model, masks, batches, pruner.config.reconstruct_ridge)
                else:
                    masks = pruner.compute_masks(task.model, scores=scores) if scores is not None else None
                masks_s = time.perf_counter() - start
                for name, extra in repairs:  # the same masks, each final repair
                    model = copy.deepcopy(task.model)
                    repairer = OptinPruner(OptinConfig.from_dict({**base, **extra, "mac_constraint": budget, "seq_len": scorer.seq_len}))
                    start = time.perf_counter()
                    repairer.prune_model(model, data, masks=copy.deepcopy(masks))
                    seconds = time.perf_counter() - start
                    miou = mean_iou_on(model, evaluation)
                    heads, neurons = kept_per_layer(model)
                    cells[name].append(f"@{budget}: {miou:.4f} ({100 * (miou - dense):+.2f}) heads {heads} neurons {neurons} "
                                       f"masks {masks_s:.0f}s, repair {seconds:.1f}s")
            for name, _ in repairs:
                print(f"{label + name:24} draw {draw}  " + "  ".join(cells[name]), flush=True)


if __name__ == "__main__":
    main()
