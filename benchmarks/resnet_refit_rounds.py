"""Refit-aware allocation in rounds on digits-resnet's development folds (no test image is read).

`allocation="refit"` (`optin_hf.refit_allocation`) cuts each (block, kind) alone from the dense model and adds
the measured losses, so cuts that interact (two blocks' channels whose BatchNorm shifts add up) are priced as if
alone. Here the allocation runs in rounds down a ladder of budgets: each round measures every (block, kind)'s
cuts from the model the previous round left (slimmed and repaired), and deepens from its counts to the round's
budget. One round is `allocation="refit"` itself. Folds, scoring and repair as `cnn_repair_dev.py`.

    nice -n 10 python benchmarks/resnet_refit_rounds.py [--ladders 1 2 3] [--budgets 0.8 0.6 0.5] [--repairs batchnorm weights]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.losses import bounded, kl_loss
from optin_hf.macs import CostModel
from optin_hf.reconstruct import reconstruct
from optin_hf.refit_allocation import LEVELS, _Cut, _give_back, _keep, _outputs, _remove, unit_orders
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.report import split_accuracy


def _slim(model, masks, batches, mode, ridge: float = 1e-3):
    trial = slim_model(copy.deepcopy(model), masks).eval()
    reconstruct(trial, model, batches, mode, ridge, progress=False)
    return trial


def rounds(model, scores, units, costs, dense_macs, budgets, batches, mode, ridge: float = 1e-3, neurons_multiple_of: int = 1):
    """Masks after the last round: each round's cuts measured from the previous round's slim, repaired model
    (any family `measure_cuts` takes; neuron counts kept multiples of `neurons_multiple_of`, or all)."""
    adapter = check_model(model)
    orders = unit_orders(scores.head_scores, scores.neuron_scores, units)
    head_present, neuron_present = units.present()
    counts = {"head": head_present.sum(1).tolist(), "neuron": neuron_present.sum(1).tolist()}
    dense_out = [bounded(o) for o in _outputs(model, adapter, batches)]

    def masks_of(c):
        return units.with_masks(
            torch.stack([_keep(orders["head"][i], k, units.head_mask.shape[1]) for i, k in enumerate(c["head"])]),
            torch.stack([_keep(orders["neuron"][i], k, units.neuron_mask.shape[1]) for i, k in enumerate(c["neuron"])]))

    for budget in budgets:
        base = float(kl_loss(dense_out, _outputs(_slim(model, masks_of(counts), batches, mode, ridge), adapter, batches), 1.0))
        cuts = []
        for kind in ("head", "neuron"):
            for layer, width in enumerate(counts[kind]):
                if not width:
                    continue
                step = neurons_multiple_of if kind == "neuron" else 1
                depths = {width * (LEVELS - level) // LEVELS // step * step for level in range(1, LEVELS + 1)}
                kept = [width] + sorted(depths - {width}, reverse=True)
                cut = _Cut(kind, layer, width, step, kept, [0.0])
                for count in kept[1:]:
                    trial = {k: list(v) for k, v in counts.items()}
                    trial[kind][layer] = count
                    out = _outputs(_slim(model, masks_of(trial), batches, mode, ridge), adapter, batches)
                    cut.loss.append(float(kl_loss(dense_out, out, 1.0)) - base)
                cuts.append(cut)
        _remove(cuts, counts, costs, budget * dense_macs)
        _give_back(cuts, counts, costs, budget * dense_macs)
    return masks_of(counts)


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
                    steps = [1 - (1 - budget) * (i + 1) / ladder for i in range(ladder)]
                    masks = rounds(task.model, scores, costs.units, at, dense_macs, steps, batches, mode)
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
