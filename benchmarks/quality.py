"""Test accuracy of the embedded defaults pruned at several MAC budgets, per criterion.

OPTIN faithful and clean share one scoring run: the faithful weights multiply the balanced
scores, so the clean scores are the faithful ones divided by those (positive) weights.
Settings per default are those of its recipe in recipes/. Prints one table.

    python benchmarks/quality.py [--defaults bbc-news tweet-sentiment digits-vit] [--budgets 0.8 0.6 0.5]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from optin_hf import ImportanceScores, OptinPruner
from optin_hf.defaults import evaluate_accuracy, load_default
from optin_hf.losses import faithful_weights
from optin_hf.recipes import load_recipe

RECIPES = {"bbc-news": "minilm-bbc-news.yaml", "tweet-sentiment": "minilm-tweet-sentiment.yaml", "digits-vit": "vit-digits.yaml"}
ROOT = Path(__file__).resolve().parents[1]


def unweighted(scores: ImportanceScores) -> ImportanceScores:
    layers, heads = scores.head_scores.shape
    neurons = scores.neuron_scores.shape[1]
    return ImportanceScores(
        scores.head_scores / faithful_weights(layers, heads, "head"),
        scores.neuron_scores / faithful_weights(layers, neurons, "neuron"),
        "optin-clean",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=list(RECIPES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    args = parser.parse_args()
    rows = []
    for name in args.defaults:
        task = load_default(name)
        base = load_recipe(ROOT / "recipes" / RECIPES[name]).optin
        dense = evaluate_accuracy(task.model, task.test, task.processor)
        scores = {}
        for importance in ("optin", "magnitude", "random"):
            pruner = OptinPruner(type(base).from_dict({**base.to_dict(), "importance": importance, "faithful": True}))
            scores[importance if importance != "optin" else "optin-faithful"] = pruner.compute_scores(
                task.model, task.calibration, tokenizer=task.processor
            )
            seq_len = pruner.seq_len
        scores["optin-clean"] = unweighted(scores["optin-faithful"])
        for criterion, score in scores.items():
            accs = []
            for budget in args.budgets:
                model = copy.deepcopy(task.model)
                config = type(base).from_dict({**base.to_dict(), "mac_constraint": budget, "seq_len": seq_len})
                pruner = OptinPruner(config)
                pruner.prune_model(model, masks=pruner.compute_masks(model, scores=score))
                accs.append(evaluate_accuracy(model, task.test, task.processor))
            rows.append((name, criterion, dense, accs))
            print(f"{name:16} {criterion:15} dense {dense:.3f} " + " ".join(f"@{b}: {a:.3f}" for b, a in zip(args.budgets, accs)), flush=True)
    print("\n| default | criterion | dense | " + " | ".join(f"@{b}" for b in args.budgets) + " |")
    print("|---|---|---|" + "---|" * len(args.budgets))
    for name, criterion, dense, accs in rows:
        print(f"| {name} | {criterion} | {dense:.3f} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
