"""Held-out perplexity of the language-model default (SmolLM2-135M on Shakespeare) pruned at several MAC budgets, per
criterion (OPTIN, FLAP, Wanda-sp) with and without the refit, per-layer and uniform, and tokens/s against dense.

Every criterion scores once, on the recipe's calibration windows (recipes/smollm2-shakespeare.yaml: its window
length, number of windows and neuron groups; without its scoring time budget, so the number of windows does not
depend on the machine's load); every budget is allocated from those scores, slimmed, refit (or not) on the
recipe's refit windows, and measured on the default's held-out windows (4 plays never used for calibration, 64
windows of 128 tokens spread evenly over them). One seed (the recipe's).

    nice -n 10 python benchmarks/llm_quality.py [--budgets 0.8 0.6 0.5] [--criteria optin flap wanda_sp] [--speed]
        [--reconstruct weights none] [--selection scores refit] [--layouts per-layer uniform] [--scores-dir DIR]
        [--reconstruct-samples N] [--inputs | --no-inputs] [--per-window DIR [--per-window-count 512]]
        [--allocation scores|fluctuation [--allocation-band 0.2] [--shape-at F]]

`--selection refit` adds the rows that re-choose each layer's units by the error the refit leaves
(`OptinConfig(selection="refit")`, at the allocation's counts); `--layouts` which allocations run (per-layer, and
`uniform_layers`: OPTIN's rows, and FLAP's and Wanda-sp's with the refit selection, the recipe's setting with their
scores); `--inputs` makes the refit rows refit each sublayer's input projections too (`reconstruct_inputs`; default:
the recipe's); `--scores-dir` keeps each criterion's scores there and reads them back, so that runs
in parallel processes (one row set each) score once.

`--allocation fluctuation` gives the per-layer rows `OptinConfig(allocation="fluctuation")`'s counts (band
`--allocation-band`; `--shape-at 0` reads FLAP's threshold at each budget, as s42's first candidates did).

`--per-window DIR` keeps each model's loss on every window it reads (512 spread over each split's plays besides the
table's own) for `benchmarks/window_bootstrap.py`, which says how far a difference between two rows outruns the
windows' noise.

`--dev N --lambdas 10 1 0.1` instead measures OPTIN + refit at each balance weight `lambda_contribution` (the raw
losses are computed once) on N windows of 4 development plays, which neither the calibration nor the held-out
plays include: a setting chosen there was not chosen on the test plays. `--then-test` measures each model pruned
for `--dev` on the held-out plays as well (rows whose setting is already fixed: one pruning for both).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from optin_hf import ImportanceScores, OptinConfig, OptinPruner, count_macs
from optin_hf import fluctuation_allocation
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.generation import tokens_per_second
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.windows import calibration_windows, evaluation_windows, negative_log_likelihood, spread, window_losses

NAME = "shakespeare-smollm2"
# (criterion, reconstruction, uniform_layers, selection): the rows of the table, in order.
ROWS = [
    ("optin", "weights", False, "scores"), ("optin", "none", False, "scores"), ("optin", "weights", True, "scores"),
    ("optin", "weights", True, "refit"), ("optin", "weights", False, "refit"),
    ("flap", "weights", False, "scores"), ("flap", "none", False, "scores"), ("flap", "weights", False, "refit"),
    ("flap", "weights", True, "refit"),
    ("wanda_sp", "weights", False, "scores"), ("wanda_sp", "none", False, "scores"), ("wanda_sp", "weights", False, "refit"),
    ("wanda_sp", "weights", True, "refit"),
]


def row_label(criterion: str, mode: str, uniform: bool, selection: str) -> str:
    return (criterion + ("" if mode == "none" else " + refit") + (", refit selection" if selection == "refit" else "")
            + (", uniform" if uniform else ""))


def criterion_scores(pruner: OptinPruner, model: torch.nn.Module, calibration: list, folder: str | None, criterion: str):
    """The criterion's scores, read from `folder` where an earlier run kept them (then kept there)."""
    path = Path(folder, f"{criterion}.safetensors") if folder else None
    if path is not None and path.exists():
        return ImportanceScores.load(path)
    scores = pruner.compute_scores(model, calibration)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scores.save(path)
    return scores


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, tokens = negative_log_likelihood(model, windows)
    return math.exp(nll / tokens)


class WindowLosses:
    """`--per-window DIR`: each model reads `count` windows spread evenly over each split's plays and the table's own
    windows, each window's loss kept in DIR/<label>.safetensors (`benchmarks/window_bootstrap.py` compares two such
    files); the table's perplexities are taken from its own windows (`spread`: the same as without the option)."""

    def __init__(self, folder: str, splits: dict[str, tuple[torch.Tensor, int]], count: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.splits = {}  # name -> (the windows read, which of them the table reads)
        for name, (every, table) in splits.items():
            picked = torch.cat([spread(len(every), count), spread(len(every), table)]).unique()
            self.splits[name] = (every[picked], torch.isin(picked, spread(len(every), table)))

    def measure(self, model: torch.nn.Module, label: str, reuse: bool = False) -> dict[str, float]:
        """Each split's perplexity on the table's windows, after saving every read window's loss under `label`
        (`reuse`: read back where an earlier run saved the same windows' losses, as for the unchanged dense model)."""
        path = self.folder / f"{label}.safetensors"
        kept = load_file(path) if reuse and path.exists() else {}
        if all(name in kept and torch.equal(kept[f"{name}_table"], table) for name, (_, table) in self.splits.items()):
            losses = {name: kept[name] for name in self.splits}
        else:
            losses = {name: window_losses(model, windows) for name, (windows, _) in self.splits.items()}
            save_file({**losses, **{f"{name}_table": table for name, (_, table) in self.splits.items()}}, path)
        return {name: math.exp(float(losses[name][table].mean()) / (windows.shape[1] - 1))
                for name, (windows, table) in self.splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6])
    parser.add_argument("--criteria", nargs="+", default=["optin", "flap", "wanda_sp"])
    parser.add_argument("--speed", action="store_true", help="also time tokens/s of each OPTIN + refit model against dense")
    parser.add_argument("--dev", type=int, metavar="N", help="measure on N windows of 4 development plays, not the held-out ones")
    parser.add_argument("--lambdas", nargs="+", type=float, help="OPTIN + refit at each lambda_contribution (with --dev)")
    parser.add_argument("--then-test", action="store_true",
                        help="with --dev: measure each pruned model on the held-out plays too, after the development plays")
    parser.add_argument("--reconstruct-samples", type=int, metavar="N", help="refit on N windows (default: the recipe's)")
    parser.add_argument("--reconstruct", nargs="+", default=["weights", "none"], help="the rows' repairs to run")
    parser.add_argument("--inputs", action=argparse.BooleanOptionalAction,
                        help="the refit rows also refit q/k/v and gate/up first (reconstruct_inputs; default: the recipe's)")
    parser.add_argument("--selection", nargs="+", default=["scores"], choices=["scores", "refit"], help="the rows' unit choices to run")
    parser.add_argument("--layouts", nargs="+", default=["per-layer", "uniform"], choices=["per-layer", "uniform"])
    parser.add_argument("--allocation", default="scores", choices=["scores", "fluctuation"],
                        help="the per-layer rows' counts: the scores' budget search, or `allocation='fluctuation'`")
    parser.add_argument("--allocation-band", type=float, default=0.2, help="with --allocation fluctuation: `allocation_band`")
    parser.add_argument("--shape-at", type=float, help="with --allocation fluctuation: read the shape at this fraction "
                        "of the MACs instead of the library's SHAPE_AT (0: at each budget, s42's first candidates)")
    parser.add_argument("--scores-dir", help="keep each criterion's scores here and read them back")
    parser.add_argument("--per-window", metavar="DIR", help="also read --per-window-count windows of each measured split, "
                        "each window's loss kept in DIR (`WindowLosses`; benchmarks/window_bootstrap.py compares two rows)")
    parser.add_argument("--per-window-count", type=int, default=512, metavar="N",
                        help="windows per split with --per-window (the 4 test plays have 1,193; 0.2 s each on 2 threads)")
    args = parser.parse_args()
    if args.shape_at is not None:
        fluctuation_allocation.SHAPE_AT = args.shape_at  # what its `reading_point` reads
    if args.then_test and not args.dev:
        parser.error("--then-test measures the held-out plays after --dev N's development plays: give --dev N")
    task = load_default(NAME)
    recipe = default_recipe(NAME).optin
    if args.reconstruct_samples:
        recipe = dataclasses.replace(recipe, reconstruct_samples=args.reconstruct_samples)
    if args.inputs is not None:
        recipe = dataclasses.replace(recipe, reconstruct_inputs=args.inputs)
    base = {**recipe.to_dict(), "max_scoring_time": None}
    wanted = max(recipe.num_samples, recipe.reconstruct_samples)
    calibration = calibration_windows(task.calibration, "text", task.processor, recipe.max_length, wanted, recipe.seed)
    held_out = test = evaluation_windows(task.test, "text", task.processor, task.eval_window, task.max_eval_samples)
    if args.dev:
        registry = RECIPES[NAME]
        development = CORPORA[registry.corpus]().development(registry.split)
        print(f"development plays: {development['play']}")
        held_out = evaluation_windows(development, "text", task.processor, task.eval_window, args.dev)
    splits = {}
    if args.per_window and args.dev:
        splits["development"] = (evaluation_windows(development, "text", task.processor, task.eval_window, None), args.dev)
    if args.per_window and (args.then_test or not args.dev):
        splits["test"] = (evaluation_windows(task.test, "text", task.processor, task.eval_window, None), task.max_eval_samples)
    per_window = WindowLosses(args.per_window, splits, args.per_window_count) if splits else None

    def measure(model: torch.nn.Module, label: str) -> tuple[float, float | None]:
        """Perplexity on the table's held-out windows, and on the test plays' with --then-test."""
        if per_window is not None:
            found = per_window.measure(model, label, reuse=label == "dense")
            return found["development" if args.dev else "test"], found.get("test") if args.then_test else None
        return perplexity(model, held_out), perplexity(model, test) if args.then_test else None

    if args.lambdas:
        lambda_rows(task, calibration, held_out, base, args.budgets, args.lambdas)
        return
    print(f"{NAME}: {len(calibration)} calibration windows of {recipe.max_length} tokens (scoring reads the first "
          f"{recipe.num_samples}, the refit {recipe.reconstruct_samples}, input refit {recipe.reconstruct_inputs}); "
          f"{len(held_out)} held-out windows of "
          f"{held_out.shape[1]} tokens; {torch.get_num_threads()} torch threads", flush=True)
    start = time.perf_counter()
    dense, dense_test = measure(task.model, "dense")
    dense_macs, dense_parameters = count_macs(task.model, recipe.seq_len), sum(p.numel() for p in task.model.parameters())
    print(f"dense perplexity {dense:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows, scores, scoring_s = [], {}, {}
    layouts = {"per-layer": False, "uniform": True}
    wanted_rows = [r for r in ROWS if r[0] in args.criteria and r[1] in args.reconstruct and r[3] in args.selection
                   and r[2] in [layouts[k] for k in args.layouts]]
    for criterion, mode, uniform, selection in wanted_rows:
        if criterion not in scores:
            pruner = OptinPruner(OptinConfig.from_dict({**base, "importance": criterion}))
            start = time.perf_counter()
            scores[criterion] = criterion_scores(pruner, task.model, calibration, args.scores_dir, criterion)
            scoring_s[criterion] = time.perf_counter() - start
            print(f"{criterion} scored in {scoring_s[criterion]:.0f} s", flush=True)
        results = []
        for budget in args.budgets:
            allocation = "scores" if uniform else args.allocation
            settings = {**base, "importance": criterion, "mac_constraint": budget, "reconstruct": mode, "uniform_layers": uniform,
                        "selection": selection, "reconstruct_inputs": recipe.reconstruct_inputs and mode == "weights",
                        "allocation": allocation, **({"allocation_band": args.allocation_band} if allocation == "fluctuation" else {})}
            pruner = OptinPruner(OptinConfig.from_dict(settings))
            model = copy.deepcopy(task.model)
            start = time.perf_counter()
            masks = pruner.compute_masks(model, calibration, scores=scores[criterion])  # applies selection="refit" too
            pruner.prune_model(model, calibration, masks=masks)
            seconds = time.perf_counter() - start
            name = row_label(criterion, mode, uniform, selection) + ("" if allocation == "scores" else f", {allocation} allocation")
            value, tested = measure(model, f"{re.sub('[^a-z0-9]+', '-', name)}@{budget}")
            if tested is not None:  # the same model, measured once on the held-out plays after the development ones
                print(f"{name:40} @{budget}: held-out test perplexity {tested:.3f} "
                      f"({100 * (tested / dense_test - 1):+.1f}% of dense {dense_test:.3f})", flush=True)
            macs = count_macs(model, recipe.seq_len) / dense_macs
            removed = 1 - sum(p.numel() for p in model.parameters()) / dense_parameters
            speeds = None
            if args.speed and criterion == "optin" and mode == "weights":
                measured = tokens_per_second({"dense": task.model, "pruned": model}, recipe.seq_len)
                speeds = {k: measured["pruned"][k] / measured["dense"][k] for k in measured["dense"] if not k.endswith("_s")}
            results.append((budget, value, macs, removed, speeds))
            print(f"{name:40} @{budget}: perplexity {value:.3f} ({100 * (value / dense - 1):+.1f}%), MACs x{macs:.3f}, "
                  f"{100 * removed:.1f}% of the parameters removed, slim+refit {seconds:.0f} s"
                  + (f", tokens/s pruned/dense {speeds}" if speeds else ""), flush=True)
        rows.append((name, results))
    print("\n| criterion | dense | " + " | ".join(f"@{b} MACs" for b in args.budgets) + " |")
    print("|---|---|" + "---|" * len(args.budgets))
    for label, results in rows:
        cells = " | ".join(f"{value:.2f} ({100 * (value / dense - 1):+.1f}%; {100 * removed:.0f}% params)" for _, value, _, removed, _ in results)
        print(f"| {label} | {dense:.2f} | {cells} |")
    print("\nscoring seconds: " + ", ".join(f"{c} {s:.0f}" for c, s in scoring_s.items()))


def lambda_rows(task, calibration, windows: torch.Tensor, base: dict, budgets: list[float], lambdas: list[float]) -> None:
    """OPTIN + refit at each balance weight: the raw MD and KL do not depend on it, so they are computed once
    (kept in a scoring checkpoint) and re-balanced."""
    dense = perplexity(task.model, windows)
    print(f"dense perplexity {dense:.3f} on {len(windows)} windows", flush=True)
    with tempfile.TemporaryDirectory() as losses_dir:
        for value in lambdas:
            pruner = OptinPruner(OptinConfig.from_dict({**base, "lambda_contribution": value, "checkpoint_dir": losses_dir}))
            scores = pruner.compute_scores(task.model, calibration)
            cells = []
            for budget in budgets:
                pruner = OptinPruner(OptinConfig.from_dict({**base, "mac_constraint": budget, "lambda_contribution": value}))
                model = copy.deepcopy(task.model)
                pruner.prune_model(model, calibration, masks=pruner.compute_masks(model, calibration, scores=scores))
                result = perplexity(model, windows)
                cells.append(f"@{budget}: {result:.2f} ({100 * (result / dense - 1):+.1f}%)")
            print(f"lambda_contribution {value:g}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
