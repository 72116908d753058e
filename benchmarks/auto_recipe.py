"""importance="auto" on the embedded defaults: every candidate recipe's held-out distance and test accuracy, the recipe
the search chose, and how well the distance ranks the candidates as test accuracy does (Spearman).

Each default's calibration examples are drawn as the CLI draws them (seeded rows of its calibration split,
`max(num_samples, reconstruct_samples)` of them) and split as `importance="auto"` splits them: a quarter held out, the
rest scored and refit on. With `--folds K` the same examples are split K times (fold k holds out the k-th quarter of
one seeded permutation; fold 0 is the search's own split) and each candidate's distance, loss and every held-out
example's loss are measured on every fold (in the JSON), so rules that average folds or compare candidates in pairs
can be judged offline; the "chosen" column replays the search's own folds (`searched_choice`); `--all-data` also prunes each candidate on every
calibration example (what a search that re-prunes its choice on all the data keeps). Each criterion scores once per
fold; every budget reuses the scores.

`--dev N` also measures accuracy on a development split: up to N examples of the default's corpus that no split uses
(neither training, calibration nor test: the text defaults cap their training set, so the rest of the corpus is
unused). Rules for choosing are judged on it; the test split is read only to report each candidate's accuracy (mIoU
for segmentation), never by the search, and `--no-test` reads none of it (rules judged on the development split
alone). Each candidate's held-out loss (its task loss on the held-out examples' labels, which the search's label-aware
ranks read) is in the JSON beside its distance, so ranks can be compared offline. One seed: the recipe's, or `--seed`
(it draws the calibration examples, the held-out split and the scoring's token rows; the splits stay the recipe's).

    nice -n 10 python benchmarks/auto_recipe.py [--defaults bbc-news tweet-sentiment digits-vit]
        [--budgets 0.8 0.6 0.5 0.4] [--json out.json] [--refit-selection] [--folds 4] [--all-data] [--dev 1000]
        [--no-test] [--seed 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
from quality import held_out_metric
from scipy.stats import spearmanr

from optin_hf import OptinPruner
from optin_hf.arch import check_model
from optin_hf.data import replayable
from optin_hf.pruner import CandidateRunner, make_runner
from optin_hf.recipe_search import (
    RecipeSearch, add_fold, calibration_examples, candidates, choose, contenders, search_base, split_examples,
)
from optin_hf.search_record import Candidate
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.report import split_accuracy

SEARCH = RecipeSearch()  # the search's own settings: its held-out share and its rank
HELD_OUT = SEARCH.held_out


def dev_split(name: str, size: int):
    """Up to `size` examples of default `name`'s corpus that neither its training, calibration nor test split uses
    (the corpus order `splits.split_indices` cuts, past the training rows), or None where every example is used."""
    recipe = RECIPES[name]
    spec = recipe.split
    if spec.train_size is None:
        return None
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    order = list(range(len(corpus)))
    random.Random(spec.seed).shuffle(order)
    used = order[: spec.test_size + spec.calibration_size + spec.train_size]
    rest = order[len(used):][:size]
    assert not {corpus.keys[i] for i in rest} & {corpus.keys[i] for i in used}, "the development split overlaps a used split"
    return corpus.to_dataset(rest) if rest else None


def searched_choice(rows: list[dict], search: RecipeSearch = SEARCH) -> tuple[int, list[Candidate]]:
    """(the index chosen, the candidates as measured) where `importance="auto"` under `search` chooses among the measured
    `rows` (each with its per-fold measurements in "folds"): every candidate on the first fold, then each later fold for
    the candidates still in contention (`recipe_search.contenders`), as `pruner.search_recipe` runs them."""
    def part(row: dict, fold: int) -> Candidate:
        f = row["folds"][fold]
        return Candidate(row["importance"], row["reconstruct"], row["selection"], kl=f["kl"], md=f["md"],
                         distance=f["kl"] + f["md"], loss=f["loss"], losses=f["losses"], seconds=f["seconds"])

    tried = [Candidate(row["importance"], row["reconstruct"], row["selection"]) for row in rows]
    for candidate, row in zip(tried, rows):
        add_fold(candidate, part(row, 0))
    for fold in range(1, min(search.folds, min(len(row["folds"]) for row in rows))):
        rivals = contenders(tried, search)
        if len(rivals) < 2:
            break
        for i in rivals:
            add_fold(tried[i], part(rows[i], fold))
    return choose(tried, search.rank, search.loss_tolerance, search.standard_errors), tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=["bbc-news", "tweet-sentiment", "digits-vit"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5, 0.4])
    parser.add_argument("--json", help="also write every measurement here (after each budget)")
    parser.add_argument("--refit-selection", action="store_true", help="also the selection='refit' candidates")
    parser.add_argument("--folds", type=int, default=1, help="held-out folds each candidate is measured on (fold 0: the search's)")
    parser.add_argument("--all-data", action="store_true", help="also prune each candidate on every calibration example")
    parser.add_argument("--dev", type=int, default=0, help="examples of the unused development split to measure accuracy on")
    parser.add_argument("--no-test", action="store_true", help="read no test example (judging rules on --dev alone)")
    parser.add_argument("--seed", type=int, help="the seed of the calibration draw, the held-out split and the scoring "
                        "(default: the recipe's)")
    args = parser.parse_args()
    if args.no_test and not args.dev:
        parser.error("--no-test judges on the development split alone: give --dev N")
    metric = "dev" if args.no_test else "test"  # what the summary lines rank the candidates by
    torch.set_num_threads(1)
    results = []
    for name in args.defaults:
        task = load_default(name)
        recipe = default_recipe(name).optin
        config = dataclasses.replace(recipe, importance="auto", importance_options={}, reconstruct="auto", prune_steps=1,
                                     seed=recipe.seed if args.seed is None else args.seed)
        base = search_base(config)
        wanted = max(config.num_samples, config.reconstruct_samples)
        data = task.calibration.shuffle(seed=config.seed).select(range(min(wanted, len(task.calibration))))
        dev = dev_split(name, args.dev) if args.dev else None
        if args.no_test and dev is None:
            print(f"{name}: no development split, and --no-test reads no test example: skipped", flush=True)
            continue
        dense = None if args.no_test else held_out_metric(task, task.model)
        dense_dev = split_accuracy(task.model, dev, task.processor) if dev is not None else None
        start = time.perf_counter()
        adapter = check_model(task.model)
        tried = candidates(base, adapter, task.model.config, "auto", args.refit_selection)
        examples = calibration_examples(task.model, replayable(data), task.processor, base, HELD_OUT, wanted)
        splits = [split_examples(examples, base, HELD_OUT, fold) for fold in range(args.folds)]
        runners = [make_runner(task.model, adapter, fit, held, base, OptinPruner) for fit, held in splits]
        # every calibration example, none held out: it measures no distance
        everything = CandidateRunner(task.model, adapter, examples, None, base, OptinPruner) if args.all_data else None
        print(f"{name}: dense test " + ("not read" if dense is None else f"{dense:.4f}") + (f", dev {dense_dev:.4f} ({len(dev)} examples)" if dev is not None else "")
              + f"; {args.folds} fold(s) of {runners[0].dense.examples} held-out and {len(runners[0].fit)} fit examples; "
              f"recipe {recipe.importance}/{recipe.reconstruct}/{recipe.allocation} ({time.perf_counter() - start:.0f} s)", flush=True)

        def measured(work) -> dict[str, float | None]:
            return {"test": None if args.no_test else held_out_metric(task, work),
                    "dev": split_accuracy(work, dev, task.processor) if dev is not None else None}

        for budget in args.budgets:
            rows = []
            for template in tried:
                folds = []
                try:
                    for k, runner in enumerate(runners):
                        candidate = Candidate(template.importance, template.reconstruct, template.selection)
                        work, _ = runner.run(candidate, budget)
                        folds.append({"kl": candidate.kl, "md": candidate.md, "loss": candidate.loss, "losses": candidate.losses,
                                      "seconds": candidate.seconds})
                        if k == 0:
                            row = {**dataclasses.asdict(candidate), "label": candidate.label, **measured(work)}
                        del work
                except ValueError as err:  # a recipe this model takes not (the search skips it too)
                    print(f"  @{budget} {template.label}: not measured: {err}", flush=True)
                    continue
                row["folds"] = folds
                if everything is not None:
                    work, _ = everything.run(Candidate(template.importance, template.reconstruct, template.selection), budget)
                    row["all_data"] = measured(work)
                    del work
                rows.append(row)
                print(f"  @{budget} {row['label']:38} distance {row['distance']:.5f} (kl {row['kl']:.5f}, md {row['md']:.5f}) "
                      + (f"loss {row['loss']:.5f} " if row["loss"] is not None else "")
                      + f"folds {' '.join(format(f['kl'] + f['md'], '.5f') for f in folds)}"
                      + (f"  test {row['test']:.4f}" if row["test"] is not None else "")
                      + (f" dev {row['dev']:.4f}" if dev is not None else "")
                      + (f"  all-data test {row['all_data']['test']:.4f}" if everything is not None and not args.no_test else "")
                      + (f" dev {row['all_data']['dev']:.4f}" if everything is not None and dev is not None else "")
                      + f"  {row['seconds']:.0f} s", flush=True)
            if not rows:
                continue
            # what importance="auto" keeps under its default settings (its folds as far as measured here)
            chosen, _ = searched_choice(rows)
            best = max(row[metric] for row in rows)
            reference = dense if metric == "test" else dense_dev
            rho = spearmanr([-row["distance"] for row in rows], [row[metric] for row in rows]).statistic
            results.append({"default": name, "budget": budget, "dense": dense, "dense_dev": dense_dev, "candidates": rows,
                            "chosen": chosen, "spearman": float(rho)})
            print(f"  @{budget} chosen {rows[chosen]['label']}: "
                  f"{metric} {rows[chosen][metric]:.4f} ({100 * (rows[chosen][metric] - reference):+.2f} vs dense, "
                  f"{100 * (rows[chosen][metric] - best):+.2f} vs the best candidate); Spearman {rho:+.2f}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        scoring = {n: s[0].timings["scoring_s"] for n, s in runners[0].scored.items() if not isinstance(s, ValueError)}
        print(f"  scoring s: {', '.join(f'{n} {s:.0f}' for n, s in scoring.items())}", flush=True)
    print("\n| default | budget | " + " | ".join(r["label"] for r in results[0]["candidates"])
          + " | chosen | vs best | Spearman |")
    for r in results:
        reference = r["dense"] if metric == "test" else r["dense_dev"]
        cells = " | ".join(f"{100 * (c[metric] - reference):+.2f} ({c['distance']:.4f})" for c in r["candidates"])
        chosen = r["candidates"][r["chosen"]]
        best = max(c[metric] for c in r["candidates"])
        print(f"| {r['default']} | {r['budget']} | {cells} | {chosen['label']} "
              f"{100 * (chosen[metric] - reference):+.2f} | {100 * (chosen[metric] - best):+.2f} | {r['spearman']:+.2f} |")


if __name__ == "__main__":
    main()
