"""Refit-aware allocation in rounds on digits-resnet's development folds (no test image is read).

`allocation="refit"` (`optin_hf.refit_allocation`) cuts each (block, kind) alone from the dense model and adds
the measured losses, so cuts that interact (two blocks' channels whose BatchNorm shifts add up) are priced as if
alone. Here the allocation runs in rounds down a ladder of budgets (`allocation_rounds`, now in the library):
each round measures every (block, kind)'s cuts from the counts the previous round left (the rest slimmed and
repaired with it), and deepens from them to the round's budget. One round is `allocation="refit"` itself. Folds,
scoring and repair as `cnn_repair_dev.py` (whose `--rounds` runs the same with its other options).

    nice -n 10 python benchmarks/resnet_refit_rounds.py [--ladders 1 2 3] [--budgets 0.8 0.6 0.5] [--repairs batchnorm weights]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.macs import CostModel
from optin_hf.reconstruct import reconstruct
from optin_hf.refit_allocation import allocate_by_refit
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.report import split_accuracy


def _slim(model, masks, batches, mode, ridge: float = 1e-3):
    trial = slim_model(copy.deepcopy(model), masks).eval()
    reconstruct(trial, model, batches, mode, ridge, progress=False)
    return trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--ladders", nargs="+", type=int, default=[1, 2, 3], help="rounds per budget (evenly spaced MACs)")
    parser.add_argument("--repairs", nargs="+", default=["batchnorm", "weights"])
    parser.add_argument("--criterion", default="optin")
    parser.add_argument("--scores-dir", help="cnn_repair_dev.py's --scores-dir (the same fold scores)")
    args = parser.parse_args()
    task = load_default("digits-resnet")
    calibration = task.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [(halves[0], halves[1]), (halves[1], halves[0])]
    correct = {}
    for fold, (fit, dev) in enumerate(folds):
        batches = prepare_calibration(fit, None, num_samples=len(fit), batch_size=32, max_length=128)
        pruner = OptinPruner(OptinConfig(num_samples=64, neuron_group_size=1, neurons_multiple_of=1, importance=args.criterion,
                                         reconstruct="none", seed=0))
        cached = args.scores_dir and Path(args.scores_dir) / f"{args.criterion}-64-fold{fold}.safetensors"
        if cached and cached.is_file():
            scores = ImportanceScores.load(cached)
            pruner.compute_masks(task.model, fit, scores=dataclasses.replace(scores, channel_scores=None))
        else:
            scores = pruner.compute_scores(task.model, fit.select(range(64)))
        costs = CostModel.of(task.model, check_model(task.model), pruner.image_size)
        at, dense_macs = costs.at(costs.uniform(pruner.seq_len)), costs.dense(pruner.seq_len)
        for mode in args.repairs:
            for ladder in args.ladders:
                for budget in args.budgets:
                    masks = allocate_by_refit(task.model, check_model(task.model), scores.head_scores, scores.neuron_scores, at,
                                              costs.units, budget * dense_macs, batches, mode, 1e-3, rounds=ladder)
                    model = _slim(task.model, masks, batches, mode)
                    key = (mode, ladder, budget)
                    correct[key] = correct.get(key, 0) + split_accuracy(model, dev, None) * len(dev)
                    print(f"  fold {fold} {mode} rounds {ladder} @{budget}: heads {masks.head_mask.sum(1).tolist()} "
                          f"neurons {masks.neuron_mask.sum(1).tolist()}", flush=True)
    print("| repair | rounds | " + " | ".join(f"@{b}" for b in args.budgets) + " |")
    for mode in args.repairs:
        for ladder in args.ladders:
            print(f"| {mode} | {ladder} | " + " | ".join(f"{correct[mode, ladder, b] / len(calibration):.3f}" for b in args.budgets) + " |")


if __name__ == "__main__":
    main()
