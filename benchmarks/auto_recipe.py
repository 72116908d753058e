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

`--inputs-refit` measures every "weights" candidate twice, without and with the input refit (`reconstruct_inputs`,
whatever the recipe says; the bare candidates are shared), and prints what `importance="auto"` keeps in each arm.
Every candidate's accuracy on each fold's held-out examples is in the JSON too ("held_correct"): with `--folds K`
and no development split (the digit defaults) it is the development measure, each fold's choice counted on that
fold's held-out examples, and `--no-test` then runs such a default rather than skipping it.

    nice -n 10 python benchmarks/auto_recipe.py [--defaults bbc-news tweet-sentiment digits-vit]
        [--budgets 0.8 0.6 0.5 0.4] [--json out.json] [--refit-selection] [--folds 4] [--all-data] [--dev 1000]
        [--no-test] [--seed 1] [--inputs-refit]
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
    HeldOut, RecipeSearch, add_fold, calibration_examples, candidates, choose, contenders, search_base, split_examples,
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


@torch.no_grad()
def held_correct(model: torch.nn.Module, held: HeldOut) -> int:
    """How many of the held-out examples `model` classifies as labelled (their labels, which the runner set apart)."""
    return sum(int((model(**batch).logits.argmax(-1) == labels).sum()) for batch, labels in zip(held.batches, held.labels))


def fold_choice(rows: list[dict], fold: int, search: RecipeSearch = SEARCH) -> int:
    """The index `search`'s rank keeps among `rows` from fold `fold`'s measurements alone (as if it were the search's split)."""
    tried = []
    for row in rows:
        f = row["folds"][fold]
        tried.append(Candidate(row["importance"], row["reconstruct"], row["selection"], kl=f["kl"], md=f["md"],
                               distance=f["kl"] + f["md"], loss=f["loss"], losses=f["losses"]))
    return choose(tried, search.rank, search.loss_tolerance, search.standard_errors)


def arms(rows: list[dict]) -> dict[str, list[int]]:
    """The rows each arm of `--inputs-refit` chooses among: "plain" the recipe's six candidates, "inputs" the same with
    the input refit in every "weights" candidate (the bare ones shared)."""
    return {"plain": [i for i, row in enumerate(rows) if not row.get("inputs")],
            "inputs": [i for i, row in enumerate(rows) if row.get("inputs") or row["reconstruct"] != "weights"]}


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
    parser.add_argument("--inputs-refit", action="store_true", help="measure each weights candidate also with the input refit")
    parser.add_argument("--seed", type=int, help="the seed of the calibration draw, the held-out split and the scoring "
                        "(default: the recipe's)")
    args = parser.parse_args()
    if args.no_test and not args.dev and args.folds < 2:
        parser.error("--no-test judges on a development split or on held-out folds alone: give --dev N or --folds K")
    metric = "dev" if args.no_test else "test"  # what the summary lines rank the candidates by (no dev split: "held")
    torch.set_num_threads(1)
    results = []
    for name in args.defaults:
        task = load_default(name)
        recipe = default_recipe(name).optin
        config = dataclasses.replace(recipe, importance="auto", importance_options={}, reconstruct="auto", prune_steps=1,
                                     seed=recipe.seed if args.seed is None else args.seed)
        base = search_base(config)
        if args.inputs_refit:  # the plain arm without the input refit whatever the recipe says; the other arm with it
            base = dataclasses.replace(base, reconstruct_inputs=False)
        wanted = max(config.num_samples, config.reconstruct_samples)
        data = task.calibration.shuffle(seed=config.seed).select(range(min(wanted, len(task.calibration))))
        dev = dev_split(name, args.dev) if args.dev else None
        if args.no_test and dev is None and args.folds < 2:
            print(f"{name}: no development split, and --no-test reads no test example: skipped (or give --folds K)", flush=True)
            continue
        rank_by = metric if metric == "test" or dev is not None else "held"
        dense = None if args.no_test else held_out_metric(task, task.model)
        dense_dev = split_accuracy(task.model, dev, task.processor) if dev is not None else None
        start = time.perf_counter()
        adapter = check_model(task.model)
        tried = candidates(base, adapter, task.model.config, "auto", args.refit_selection)
        examples = calibration_examples(task.model, replayable(data), task.processor, base, HELD_OUT, wanted)
        splits = [split_examples(examples, base, HELD_OUT, fold) for fold in range(args.folds)]
        runners = [make_runner(task.model, adapter, fit, held, base, OptinPruner) for fit, held in splits]
        # the input refit's runners: the same folds and held-out outputs, and the same scores (computed without a repair)
        with_inputs = [CandidateRunner(task.model, adapter, r.fit, r.dense, dataclasses.replace(base, reconstruct_inputs=True),
                                       OptinPruner) for r in runners] if args.inputs_refit else []
        for plain, other in zip(runners, with_inputs):
            other.scored = plain.scored
        dense_held = [held_correct(task.model, r.dense) for r in runners]
        # every calibration example, none held out: it measures no distance
        everything = CandidateRunner(task.model, adapter, examples, None, base, OptinPruner) if args.all_data else None
        print(f"{name}: dense test " + ("not read" if dense is None else f"{dense:.4f}") + (f", dev {dense_dev:.4f} ({len(dev)} examples)" if dev is not None else "")
              + f"; {args.folds} fold(s) of {runners[0].dense.examples} held-out and {len(runners[0].fit)} fit examples "
              f"(dense held-out correct {dense_held}); "
              f"recipe {recipe.importance}/{recipe.reconstruct}/{recipe.allocation} ({time.perf_counter() - start:.0f} s)", flush=True)

        def measured(work) -> dict[str, float | None]:
            return {"test": None if args.no_test else held_out_metric(task, work),
                    "dev": split_accuracy(work, dev, task.processor) if dev is not None else None}

        for budget in args.budgets:
            rows = []
            variants = [(t, False) for t in tried] + [(t, True) for t in tried if t.reconstruct == "weights" and with_inputs]
            for template, inputs in variants:
                folds = []
                try:
                    for k, runner in enumerate(with_inputs if inputs else runners):
                        candidate = Candidate(template.importance, template.reconstruct, template.selection)
                        work, _ = runner.run(candidate, budget)
                        folds.append({"kl": candidate.kl, "md": candidate.md, "loss": candidate.loss, "losses": candidate.losses,
                                      "seconds": candidate.seconds, "held_correct": held_correct(work, runner.dense)})
                        if k == 0:
                            row = {**dataclasses.asdict(candidate), "label": candidate.label + (" + inputs" if inputs else ""),
                                   "inputs": inputs, **measured(work)}
                        del work
                except ValueError as err:  # a recipe this model takes not (the search skips it too)
                    print(f"  @{budget} {template.label}: not measured: {err}", flush=True)
                    continue
                row["folds"] = folds
                row["held"] = sum(f["held_correct"] for f in folds) / (len(folds) * runners[0].dense.examples)
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
                      + f"  held correct {' '.join(str(f['held_correct']) for f in folds)}"
                      + (f"  all-data test {row['all_data']['test']:.4f}" if everything is not None and not args.no_test else "")
                      + (f" dev {row['all_data']['dev']:.4f}" if everything is not None and dev is not None else "")
                      + f"  {row['seconds']:.0f} s", flush=True)
            if not rows:
                continue
            # what importance="auto" keeps under its default settings (its folds as far as measured here)
            chosen, _ = searched_choice([rows[i] for i in arms(rows)["plain"]])
            chosen = arms(rows)["plain"][chosen]
            best = max(row[rank_by] for row in rows)
            reference = {"test": dense, "dev": dense_dev, "held": sum(dense_held) / (len(runners) * runners[0].dense.examples)}[rank_by]
            rho = spearmanr([-row["distance"] for row in rows], [row[rank_by] for row in rows]).statistic
            result = {"default": name, "budget": budget, "dense": dense, "dense_dev": dense_dev, "dense_held": dense_held,
                      "metric": rank_by, "reference": reference, "candidates": rows, "chosen": chosen, "spearman": float(rho)}
            results.append(result)
            print(f"  @{budget} chosen {rows[chosen]['label']}: "
                  f"{rank_by} {rows[chosen][rank_by]:.4f} ({100 * (rows[chosen][rank_by] - reference):+.2f} vs dense, "
                  f"{100 * (rows[chosen][rank_by] - best):+.2f} vs the best candidate); Spearman {rho:+.2f}", flush=True)
            if with_inputs:
                result["arms"] = {}
                for arm, pool in arms(rows).items():
                    pick = pool[searched_choice([rows[i] for i in pool])[0]]
                    # each fold's own choice, counted on its own held-out examples (the digit defaults' development measure)
                    per_fold = [pool[fold_choice([rows[i] for i in pool], k)] for k in range(len(runners))]
                    held = [rows[i]["folds"][k]["held_correct"] for k, i in enumerate(per_fold)]
                    result["arms"][arm] = {"chosen": pick, "fold_choices": per_fold, "held_correct": held}
                    dev_count = "" if dev is None or rows[pick]["dev"] is None else f", dev correct {round(rows[pick]['dev'] * len(dev))}"
                    test = "" if rows[pick]["test"] is None else f", test {100 * (rows[pick]['test'] - dense):+.2f}"
                    print(f"  @{budget} arm {arm}: chosen {rows[pick]['label']}{dev_count}{test}; each fold's choice "
                          f"{', '.join(rows[i]['label'] for i in per_fold)}, held-out correct {held} = {sum(held)}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        scoring = {n: s[0].timings["scoring_s"] for n, s in runners[0].scored.items() if not isinstance(s, ValueError)}
        print(f"  scoring s: {', '.join(f'{n} {s:.0f}' for n, s in scoring.items())}", flush=True)
    if not results:
        return
    print("\n| default | budget | " + " | ".join(r["label"] for r in results[0]["candidates"])
          + " | chosen | vs best | Spearman |")
    for r in results:
        m, reference = r["metric"], r["reference"]
        cells = " | ".join(f"{100 * (c[m] - reference):+.2f} ({c['distance']:.4f})" for c in r["candidates"])
        chosen = r["candidates"][r["chosen"]]
        best = max(c[m] for c in r["candidates"])
        print(f"| {r['default']} | {r['budget']} | {cells} | {chosen['label']} "
              f"{100 * (chosen[m] - reference):+.2f} | {100 * (chosen[m] - best):+.2f} | {r['spearman']:+.2f} |")


if __name__ == "__main__":
    main()
