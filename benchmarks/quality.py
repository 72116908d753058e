"""Test accuracy (mIoU for the segmentation default) of the embedded defaults pruned at several MAC budgets, per criterion and reconstruction.

Each criterion scores once per default (its recipe's settings: calibration size, neuron groups);
every budget is allocated from those scores, slimmed, then reconstructed (or not) on the
default's calibration split (`--reconstruct-samples`, disjoint from the test split), and
evaluated on the held-out test split. A row with steps re-scores between them (`prune_steps`).
A refit row in one step runs its recipe's refit settings (allocation and its rounds, selection, and for "weights" the
input and reader refits), whatever the criterion; every other row a plain scores allocation and selection.
Prints one table with the wall time of the slowest budget (scoring + slimming + refit).

    python benchmarks/quality.py [--defaults bbc-news tweet-sentiment digits-vit digits-resnet digit-scenes-segformer]
        [--budgets 0.8 0.6 0.5]
        [--criteria optin fisher magnitude random] [--repairs none weights scales batchnorm] [--selections recipe scores refit]
        [--steps 1 2]
"""

from __future__ import annotations

import argparse
import copy
import time

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.tasks.defaults import DefaultTask, load_default
from optin_hf.tasks.recipes import DEFAULT_RECIPES, default_recipe
from optin_hf.tasks.report import mean_iou_on, split_accuracy


def repairs(model, mode: str) -> bool:
    """Whether reconstruction `mode` applies to the model's family (its adapter's declared repairs: every
    family refits, and only BatchNorm CNNs take "batchnorm"); rows of other modes are skipped."""
    return check_model(model).supports(mode)


def held_out_metric(task: DefaultTask, model) -> float:
    """The default's own metric on its held-out test split: mIoU for segmentation, else accuracy."""
    if task.task == "semantic-segmentation":
        return mean_iou_on(model, task.test)
    return split_accuracy(model, task.test, task.processor)


def row_settings(base: dict, mode: str, steps: int, selection: str) -> dict:
    """The recipe's settings for one row: a refit row keeps its recipe's selection (`selection="recipe"`) and, in one
    step, its allocation and rounds (a refit allocation counts in one step); a "weights" row also its input and reader
    refits. The other rows allocate and select by the scores, which the config requires of them. Every row prunes the
    units the recipe's refit rows do: residual channels only where the recipe names them (`prune_channels=None` would
    cut them in a scores-allocated row only, from channel scores that the shared scoring under a refit allocation
    does not take)."""
    refit_row = mode in ("weights", "scales")
    allocation = base["allocation"] if refit_row and steps == 1 else "scores"
    return {**base, "reconstruct": mode, "prune_steps": steps, "allocation": allocation,
            "prune_channels": bool(base["prune_channels"]),
            "allocation_rounds": base["allocation_rounds"] if allocation == "refit" else 1,
            "selection": (base["selection"] if selection == "recipe" else selection) if refit_row else "scores",
            "reconstruct_inputs": base["reconstruct_inputs"] and mode == "weights",
            "reconstruct_readers": base["reconstruct_readers"] and mode == "weights"}


# (criterion, reconstruction, prune_steps): the rows of the table, in order.
ROWS = [
    ("optin", "none", 1), ("optin", "weights", 1), ("optin", "scales", 1), ("optin", "weights", 2), ("optin", "batchnorm", 1),
    ("fisher", "none", 1), ("fisher", "scales", 1), ("fisher", "weights", 1),
    ("magnitude", "none", 1), ("magnitude", "weights", 1), ("magnitude", "batchnorm", 1),
    ("random", "none", 1), ("random", "weights", 1), ("random", "batchnorm", 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--criteria", nargs="+", default=["optin", "fisher", "magnitude", "random"])
    parser.add_argument("--repairs", nargs="+", default=["none", "weights", "scales", "batchnorm"],
                        help="the reconstruction modes whose rows run (a family's undeclared ones are skipped anyway)")
    parser.add_argument("--selections", nargs="+", default=["recipe"], choices=["recipe", "scores", "refit"],
                        help="OptinConfig.selection of each refit row (recipe: the recipe's); rows without a refit select "
                             "by the scores and run when recipe or scores is given")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2], help="the prune_steps whose rows run")
    parser.add_argument("--reconstruct-samples", type=int, default=256)
    args = parser.parse_args()
    rows = []
    for name in args.defaults:
        task = load_default(name)
        recipe = default_recipe(name).optin
        base = {**recipe.to_dict(), "reconstruct_samples": args.reconstruct_samples}
        dense = held_out_metric(task, task.model)
        scores, scoring_s, seq_len = {}, {}, None
        runs = [r for r in ROWS if r[0] in args.criteria and r[1] in args.repairs and r[2] in args.steps
                and (r[1] == "none" or repairs(task.model, r[1]))]
        settings_of = {}  # one row per distinct setting: "recipe" may name what "scores" or "refit" already runs
        for criterion, mode, steps in runs:
            for sel in args.selections:
                if mode in ("weights", "scales") or sel in ("recipe", "scores"):
                    settings = row_settings(base, mode, steps, sel)
                    settings_of.setdefault((criterion, mode, steps, settings["selection"]), settings)
        for (criterion, mode, steps, selection), row in settings_of.items():
            if criterion not in scores:
                pruner = OptinPruner(OptinConfig.from_dict({**base, "importance": criterion}))
                start = time.perf_counter()
                scores[criterion] = pruner.compute_scores(task.model, task.calibration, tokenizer=task.processor)
                scoring_s[criterion], seq_len = time.perf_counter() - start, pruner.seq_len
            accs, seconds = [], []
            allocation = row["allocation"]
            for budget in args.budgets:
                settings = {**row, "importance": criterion, "mac_constraint": budget, "seq_len": seq_len}
                pruner = OptinPruner(OptinConfig.from_dict(settings))
                model = copy.deepcopy(task.model)
                start = time.perf_counter()
                # One step re-allocates the shared scores (and applies the selection: compute_masks re-chooses the units
                # under selection="refit"); more steps re-score the repaired model between them.
                masks = pruner.compute_masks(model, task.calibration, scores=scores[criterion], tokenizer=task.processor) if steps == 1 else None
                pruner.prune_model(model, task.calibration, masks=masks, tokenizer=task.processor)
                seconds.append(time.perf_counter() - start + (scoring_s[criterion] if steps == 1 else 0.0))
                accs.append(held_out_metric(task, model))
            label = criterion + ("" if mode == "none" else f" + {mode}") + ("" if steps == 1 else f", {steps} steps")
            label += ", refit-selected" if selection == "refit" else ""
            label += ", refit-allocated" if allocation == "refit" else ""
            label += ", input refit" if row["reconstruct_inputs"] else ""
            label += ", reader refit" if row["reconstruct_readers"] else ""
            rows.append((name, label, dense, accs, max(seconds)))
            print(f"{name:16} {label:28} dense {dense:.4f} " + " ".join(f"@{b}: {a:.4f}" for b, a in zip(args.budgets, accs))
                  + f"  prune <= {max(seconds):.0f} s", flush=True)
    print(f"\nReconstruction on {args.reconstruct_samples} calibration examples per default; scoring as in each recipe.")
    print("\n| default | criterion + reconstruction | dense | " + " | ".join(f"@{b}" for b in args.budgets) + " | prune time |")
    print("|---|---|---|" + "---|" * len(args.budgets) + "---|")
    for name, label, dense, accs, seconds in rows:
        cells = " | ".join(f"{a:.4f} ({100 * (a - dense):+.2f})" for a in accs)
        print(f"| {name} | {label} | {dense:.4f} | {cells} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
