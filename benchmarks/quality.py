"""Test accuracy of the embedded defaults pruned at several MAC budgets, per criterion and reconstruction.

Each criterion scores once per default (its recipe's settings: calibration size, neuron groups);
every budget is allocated from those scores, slimmed, then reconstructed (or not) on the
default's calibration split (`--reconstruct-samples`, disjoint from the test split), and
evaluated on the held-out test split. Prints one table with the wall times.

    python benchmarks/quality.py [--defaults bbc-news tweet-sentiment digits-vit] [--budgets 0.8 0.6 0.5]
        [--criteria optin fisher magnitude random] [--modes none weights scales]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from optin_hf import OptinPruner
from optin_hf.defaults import evaluate_accuracy, load_default
from optin_hf.importance import CRITERIA
from optin_hf.recipes import load_recipe

RECIPES = {"bbc-news": "minilm-bbc-news.yaml", "tweet-sentiment": "minilm-tweet-sentiment.yaml", "digits-vit": "vit-digits.yaml"}
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=list(RECIPES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--criteria", nargs="+", default=[c for c in ("optin", "fisher", "magnitude", "random") if c in CRITERIA])
    parser.add_argument("--modes", nargs="+", default=["none", "weights", "scales"])
    parser.add_argument("--reconstruct-samples", type=int, default=256)
    args = parser.parse_args()
    rows = []
    for name in args.defaults:
        task = load_default(name)
        base = load_recipe(ROOT / "recipes" / RECIPES[name]).optin.to_dict()
        dense = evaluate_accuracy(task.model, task.test, task.processor)
        for criterion in args.criteria:
            pruner = OptinPruner(type(load_recipe(ROOT / "recipes" / RECIPES[name]).optin).from_dict({**base, "importance": criterion}))
            start = time.perf_counter()
            scores = pruner.compute_scores(task.model, task.calibration, tokenizer=task.processor)
            scoring_s, seq_len = time.perf_counter() - start, pruner.seq_len
            for mode in args.modes:
                accs, recon_s = [], []
                for budget in args.budgets:
                    settings = {**base, "importance": criterion, "mac_constraint": budget, "seq_len": seq_len,
                                "reconstruct": mode, "reconstruct_samples": args.reconstruct_samples}
                    pruner = OptinPruner(type(pruner.config).from_dict(settings))
                    model = copy.deepcopy(task.model)
                    masks = pruner.compute_masks(model, scores=scores)
                    start = time.perf_counter()
                    pruner.prune_model(model, task.calibration, masks=masks, tokenizer=task.processor)
                    recon_s.append(time.perf_counter() - start)
                    accs.append(evaluate_accuracy(model, task.test, task.processor))
                label = criterion if mode == "none" else f"{criterion} + {mode}"
                rows.append((name, label, dense, accs, scoring_s, max(recon_s) if mode != "none" else 0.0))
                print(f"{name:16} {label:20} dense {dense:.3f} " + " ".join(f"@{b}: {a:.3f}" for b, a in zip(args.budgets, accs))
                      + f"  scoring {scoring_s:.0f} s, slim+refit <= {max(recon_s):.0f} s", flush=True)
    print(f"\nReconstruction on {args.reconstruct_samples} calibration examples per default.")
    print("\n| default | criterion + reconstruction | dense | " + " | ".join(f"@{b}" for b in args.budgets) + " | scoring | refit |")
    print("|---|---|---|" + "---|" * len(args.budgets) + "---|---|")
    for name, label, dense, accs, scoring_s, recon_s in rows:
        cells = " | ".join(f"{a:.3f} ({100 * (a - dense):+.1f})" for a in accs)
        print(f"| {name} | {label} | {dense:.3f} | {cells} | {scoring_s:.0f} s | {recon_s:.0f} s |")


if __name__ == "__main__":
    main()
