"""The default search's repair per candidate on a ResNet (issue 21, item 1): before, every repaired candidate of
`OptinConfig(mac_constraint=b)` took the family's first repair ("batchnorm"), OPTIN's too, which cuts the residual
channels; now each candidate's repair is the one its own pruner resolves (`auto_settings.resolve_defaults`), so
OPTIN's is refit ("weights"). Both candidate lists are measured at once: every candidate of either list is pruned once,
exactly as the search prunes it (`recipe_search.calibration_examples`, `split_examples`, `pruner.make_runner`:
the first fold's fit examples), and each list's choice is replayed offline with the search's own rank
(`recipe_search.choose`), so "before" and "after" are the models the two searches keep. On the development folds every
candidate is judged; on the test split only the kept models (`--lists`: which of the two).

Development folds as `benchmarks/resnet_channel_refit.py`'s: the 256 calibration images in two halves, the search run on
one half and the kept model judged on the other (accuracy, mean CE on the labels, mean KL from the dense model). No
test image is read unless `--split test` (the search on the 256 calibration images, judged on the test split).

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks nice -n 10 python benchmarks/resnet_auto_repair.py --model resnet-wide
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from family_digits import trained
from resnet_channel_refit import judge

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.pruner import make_runner
from optin_hf.recipe_search import RecipeSearch, calibration_examples, candidates, choose, search_base, split_examples
from optin_hf.search_record import Candidate
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits


def before(after: list[Candidate], adapter) -> list[Candidate]:
    """The old candidate list: every repaired candidate with the family's first declared repair ("batchnorm")."""
    first = adapter.capabilities.auto_repair()
    return [Candidate(c.importance, first if c.reconstruct != "none" else "none", c.selection) for c in after]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--model", choices=["resnet-wide", "digits-resnet"], default="resnet-wide")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--lists", nargs="+", choices=["before", "after"], default=["before", "after"],
                        help="the candidate lists whose choice is judged (on test: each kept model read once)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    if args.model == "digits-resnet":
        splits = load_default("digits-resnet")
        model = splits.model.eval()
    else:
        model = trained("resnet-wide", splits.train, list(corpus.label_names))
    adapter, search = check_model(model), RecipeSearch()
    halves = [splits.calibration.select(range(128)), splits.calibration.select(range(128, 256))]
    folds = ([(f"fold{i}", halves[i], halves[1 - i]) for i in args.folds] if args.split == "dev"
             else [("test", splits.calibration, splits.test)])
    totals: dict = {}
    for name, fit, held in folds:
        base = search_base(OptinConfig())
        after = candidates(base, adapter, model.config, "auto")
        old = before(after, adapter)
        lists = [(which, listed) for which, listed in (("before", old), ("after", after)) if which in args.lists]
        union = list({(c.importance, c.reconstruct, c.selection): c for _, listed in lists for c in listed})
        examples = calibration_examples(model, fit, None, base, search.held_out, max(base.num_samples, base.reconstruct_samples))
        fit_examples, held_examples = split_examples(examples, base, search.held_out)
        runner = make_runner(model, adapter, fit_examples, held_examples, base, OptinPruner)
        dense_acc = judge(model, model, held)[0]
        for budget in args.budgets:
            measured: dict[tuple[str, str, str], tuple[Candidate, torch.nn.Module, str]] = {}
            judged: dict[tuple[str, str, str], tuple[float, float, float]] = {}
            for key in union:
                start = time.perf_counter()
                candidate = Candidate(*key)
                work, pruner = runner.run(candidate, budget)
                widths = str(adapter.kept_channels(work)) if pruner.config.prune_channels else "kept"
                measured[key] = candidate, work.eval(), widths
                if args.split == "dev":  # every candidate's development accuracy; on test only the kept models' (below)
                    judged[key] = judge(work, model, held)
                print(f"{name} @{budget} {candidate.label:24} distance {candidate.distance:.5f} loss {candidate.loss:.5f} "
                      + (f"acc {judged[key][0]:.3f} CE {judged[key][1]:.3f} KL {judged[key][2]:.3f} " if key in judged else "")
                      + f"widths {widths} ({time.perf_counter() - start:.0f} s)", flush=True)
            for which, listed in lists:
                tried = [copy.deepcopy(measured[(c.importance, c.reconstruct, c.selection)][0]) for c in listed]
                chosen = tried[choose(tried, search.rank, search.loss_tolerance, search.standard_errors)]
                key = (chosen.importance, chosen.reconstruct, chosen.selection)
                if key not in judged:
                    judged[key] = judge(measured[key][1], model, held)
                acc, ce, kl = judged[key]
                print(f"{name} @{budget} {which}: chose {chosen.label}: acc {acc:.3f} ({100 * (acc - dense_acc):+.1f}) "
                      f"CE {ce:.3f} KL {kl:.3f} widths {measured[key][2]}", flush=True)
                total = totals.setdefault((which, budget), [0.0, 0.0, 0.0, 0.0, 0, []])
                for k, v in enumerate((acc, ce, kl, dense_acc)):
                    total[k] += v * len(held)
                total[4] += len(held)
                total[5].append(chosen.label)
            del measured
    print(f"\n{args.model}, {args.split}: | search | " + " | ".join(f"@{b} acc (CE / KL)" for b in args.budgets) + " |")
    for which in args.lists:
        cells = []
        for b in args.budgets:
            acc, ce, kl, dense_acc, n, chose = totals[which, b]
            cells.append(f"{acc / n:.3f} ({100 * (acc - dense_acc) / n:+.1f}; {ce / n:.3f} / {kl / n:.3f}; {', '.join(chose)})")
        print(f"| {which} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
