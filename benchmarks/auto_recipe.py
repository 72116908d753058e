"""importance="auto" on the embedded defaults: every candidate recipe's held-out distance and test accuracy, the recipe
the search chose, and how well the distance ranks the candidates as test accuracy does (Spearman).

Each default's calibration examples are drawn as the CLI draws them (seeded rows of its calibration split,
`max(num_samples, reconstruct_samples)` of them) and split as `importance="auto"` splits them: a quarter held out, the
rest scored and refit on. Each criterion scores once per default; every budget reuses the scores. The test split is
read only to report each candidate's accuracy (mIoU for segmentation), never by the search. One seed.

    nice -n 10 python benchmarks/auto_recipe.py [--defaults bbc-news tweet-sentiment digits-vit]
        [--budgets 0.8 0.6 0.5 0.4] [--json out.json] [--refit-selection]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from quality import held_out_metric
from scipy.stats import spearmanr

from optin_hf import OptinPruner
from optin_hf.recipe_search import RecipeSearch, prepare_search
from optin_hf.search_record import Candidate
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.recipes import default_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=["bbc-news", "tweet-sentiment", "digits-vit"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5, 0.4])
    parser.add_argument("--json", help="also write every measurement here (after each default)")
    parser.add_argument("--refit-selection", action="store_true", help="also the selection='refit' candidates")
    args = parser.parse_args()
    results = []
    for name in args.defaults:
        task = load_default(name)
        config = dataclasses.replace(default_recipe(name).optin, importance="auto", importance_options={}, reconstruct="auto",
                                     prune_steps=1)
        wanted = max(config.num_samples, config.reconstruct_samples)
        data = task.calibration.shuffle(seed=config.seed).select(range(min(wanted, len(task.calibration))))
        dense = held_out_metric(task, task.model)
        start = time.perf_counter()
        runner, tried = prepare_search(task.model, data, task.processor, config, RecipeSearch(refit_selection=args.refit_selection), "auto", OptinPruner)
        print(f"{name}: dense {dense:.4f}; {runner.dense.examples} held-out and {len(runner.fit)} fit examples "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for budget in args.budgets:
            rows = []
            for template in tried:
                candidate = Candidate(template.importance, template.reconstruct, template.selection)
                work, _ = runner.run(candidate, budget)
                rows.append({**dataclasses.asdict(candidate), "label": candidate.label, "test": held_out_metric(task, work)})
                del work
                print(f"  @{budget} {candidate.label:38} distance {candidate.distance:.5f} (kl {candidate.kl:.5f}, "
                      f"md {candidate.md:.5f})  test {rows[-1]['test']:.4f}  {candidate.seconds:.0f} s", flush=True)
            chosen = min(range(len(rows)), key=lambda i: rows[i]["distance"])
            best = max(row["test"] for row in rows)
            rho = spearmanr([-row["distance"] for row in rows], [row["test"] for row in rows]).statistic
            results.append({"default": name, "budget": budget, "dense": dense, "candidates": rows, "chosen": chosen,
                            "spearman": float(rho)})
            print(f"  @{budget} chosen {rows[chosen]['label']}: "
                  f"test {rows[chosen]['test']:.4f} ({100 * (rows[chosen]['test'] - dense):+.2f} vs dense, "
                  f"{100 * (rows[chosen]['test'] - best):+.2f} vs the best candidate); Spearman {rho:+.2f}", flush=True)
        scoring = {n: s[0].timings["scoring_s"] for n, s in runner.scored.items() if not isinstance(s, ValueError)}
        print(f"  scoring s: {', '.join(f'{n} {s:.0f}' for n, s in scoring.items())}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print("\n| default | budget | " + " | ".join(r["label"] for r in results[0]["candidates"])
          + " | chosen | vs best | Spearman |")
    for r in results:
        cells = " | ".join(f"{100 * (c['test'] - r['dense']):+.2f} ({c['distance']:.4f})" for c in r["candidates"])
        chosen = r["candidates"][r["chosen"]]
        best = max(c["test"] for c in r["candidates"])
        print(f"| {r['default']} | {r['budget']} | {cells} | {chosen['label']} "
              f"{100 * (chosen['test'] - r['dense']):+.2f} | {100 * (chosen['test'] - best):+.2f} | {r['spearman']:+.2f} |")


if __name__ == "__main__":
    main()
