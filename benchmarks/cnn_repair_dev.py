"""The CNN repairs compared on development splits of digits-resnet (how its repair was chosen); no test image is read.

Two folds of the default's 256 calibration images: scored on the first 64 images of one half (the recipe
scores 64), repaired on that half (128 images), judged on the other half; the table gives the accuracy
over both dev halves (256 images, each judged once). Per criterion and budget, dev accuracy of:
- none;
- batchnorm: `reconstruct="batchnorm"`, running means re-estimated, variances kept;
- weights / scales: the least-squares refit of each block's last 1x1 conv with its BatchNorm to the
  dense pre-activation sum (`reconstruct="weights"` / `"scales"`);
- batchnorm+weights: the BatchNorm repair, then the refit on top (it refits the last conv's BatchNorm again);
- train-mode bn, bias correction (optional, `--repairs`): means and variances re-estimated by BatchNorm
  train-mode passes with cumulative averages; each removed channel's mean activation in the dense model
  times the next conv's weights, folded into the next BatchNorm's running mean.

`--allocations refit` also counts each block's channels by the loss its cuts leave after the row's repair
(`optin_hf.refit_allocation`, measured once per fold and repair on the repair's images, every budget allocated
from it; with `--rounds N` > 1, `allocation_rounds=N`: N measurements down a ladder per budget); `--selections refit` re-chooses the units at those counts by the refit's greedy OBS error
(`optin_hf.refit_selection`), whatever the repair run afterwards.

    nice -n 10 python benchmarks/cnn_repair_dev.py [--criteria optin magnitude random] [--budgets 0.8 0.6 0.5]
        [--repairs none batchnorm weights scales batchnorm+weights] [--allocations scores refit]
        [--selections scores refit] [--scored-images 64] [--levels 4] [--rounds 1] [--options JSON] [--scores-dir DIR]

Every repair takes (slim model, dense model, masks, batches, ridge); the scratch repairs ignore the ridge.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model, get_submodule
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.macs import CostModel
from optin_hf.masks import PruningMasks
from optin_hf.reconstruct import batch_norms, reconstruct
from optin_hf import refit_allocation
from optin_hf.refit_allocation import allocate_by_refit, allocate_cuts, measure_cuts, unit_orders
from optin_hf.refit_selection import select_by_refit
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.report import split_accuracy


@torch.no_grad()
def train_mode_statistics(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict], ridge: float) -> None:
    """Every block BatchNorm's mean and variance re-estimated in train mode, cumulative averages."""
    norms = [norm for layer in check_model(model).layers_of(model) for _, norm in batch_norms(layer)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for batch in batches:
        model(**batch)
    model.eval()


@torch.no_grad()
def bias_correction(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict], ridge: float) -> None:
    """Fold the removed channels' expected contribution to the next conv into the next BatchNorm's mean."""
    adapter = check_model(dense)
    for i, (slim, layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(dense))):
        for producer, consumer, kept in (("layer.0", "layer.1", masks.head_mask[i]), ("layer.1", "layer.2", masks.neuron_mask[i])):
            removed = ~kept[: get_submodule(layer, producer).convolution.out_channels]
            if not removed.any():
                continue
            seen = []  # (Σ over images and positions [channels], number of positions)
            hook = lambda m, a, out: seen.append((out.double().sum((0, 2, 3)), out.shape[0] * out.shape[2] * out.shape[3]))  # noqa: E731
            handle = get_submodule(layer, producer).register_forward_hook(hook)
            for batch in batches:
                dense(**batch)
            handle.remove()
            mean = sum(total for total, _ in seen) / sum(n for _, n in seen)
            weights = get_submodule(layer, consumer).convolution.weight.double().sum((2, 3))  # [out, in]
            shift = weights[:, removed] @ mean[removed]
            if consumer == "layer.1":
                shift = shift[masks.neuron_mask[i][: len(shift)]]
            get_submodule(slim, consumer).normalization.running_mean.sub_(shift.float())


@torch.no_grad()
def dev_losses(model: nn.Module, dense: nn.Module, dev) -> tuple[float, float]:
    """Summed cross-entropy on the dev images' labels and summed KL(dense || model): smoother guides than the
    accuracy where one image is 0.4 point."""
    pixels, labels = torch.tensor(dev["pixel_values"]), torch.tensor(dev["label"])
    logits, reference = model.eval()(pixel_values=pixels).logits, dense.eval()(pixel_values=pixels).logits
    log_p, log_q = logits.log_softmax(-1), reference.log_softmax(-1)
    return float(-log_p.gather(1, labels[:, None]).sum()), float((log_q.exp() * (log_q - log_p)).sum())


def _repairs(*modes: str) -> Callable:
    def repair(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict], ridge: float) -> None:
        for mode in modes:
            reconstruct(model, dense, batches, mode, ridge)

    return repair


REPAIRS: dict[str, Callable | None] = {
    "none": None,
    "batchnorm": _repairs("batchnorm"),
    "weights": _repairs("weights"),
    "scales": _repairs("scales"),
    "batchnorm+weights": _repairs("batchnorm", "weights"),
    "train-mode bn": train_mode_statistics,
    "bias correction": bias_correction,
}


def refit_counts(pruner: OptinPruner, model: nn.Module, scores: ImportanceScores, batches: list[dict], mode: str, rounds: int = 1):
    """`allocation="refit"` with the `mode` repair: budget -> masks (one round: every budget from one measurement;
    `rounds` > 1: the library's `allocation_rounds`, measured for each budget)."""
    adapter, c = check_model(model), pruner.config
    costs = CostModel.of(model, adapter, pruner.image_size)
    at, dense = costs.at(costs.uniform(pruner.seq_len)), costs.dense(pruner.seq_len)
    if rounds > 1:
        return lambda budget: allocate_by_refit(model, adapter, scores.head_scores, scores.neuron_scores, at, costs.units,
                                                budget * dense, batches, mode, c.reconstruct_ridge,
                                                neurons_multiple_of=c.neurons_multiple_of, rounds=rounds)
    orders = unit_orders(scores.head_scores, scores.neuron_scores, costs.units)
    cuts = measure_cuts(model, adapter, orders, costs.units, batches, mode, c.reconstruct_ridge,
                        neurons_multiple_of=c.neurons_multiple_of)
    return lambda budget: allocate_cuts(copy.deepcopy(cuts), orders, at, costs.units, budget * dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", nargs="+", default=["optin", "magnitude", "random"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--repairs", nargs="+", choices=list(REPAIRS), default=["none", "batchnorm", "weights", "scales", "batchnorm+weights"])
    parser.add_argument("--channels", nargs="+", choices=["off", "on"], default=["off"],
                        help="prune_channels settings to compare (on: coupled residual channels too; the refits refuse it)")
    parser.add_argument("--scores-dir", help="a folder keeping each fold's scores, read back by later runs (no re-scoring)")
    parser.add_argument("--allocations", nargs="+", choices=["scores", "refit"], default=["scores"])
    parser.add_argument("--selections", nargs="+", choices=["scores", "refit"], default=["scores"])
    parser.add_argument("--scored-images", type=int, default=64, help="images of the fold's half scored on (at most 128)")
    parser.add_argument("--options", default="{}", help="JSON OptinConfig settings over the recipe's (e.g. num_samples)")
    parser.add_argument("--levels", type=int, default=refit_allocation.LEVELS, help="measured depths per (block, kind) of the refit allocation")
    parser.add_argument("--rounds", type=int, default=1, help="allocation_rounds of the refit allocation")
    args = parser.parse_args()
    refit_allocation.LEVELS = args.levels  # read by measure_cuts (a library constant: this compares finer depths)
    task = load_default("digits-resnet")
    calibration = task.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [(halves[0], halves[1]), (halves[1], halves[0])]  # (scored and repaired on, judged on)
    dense_correct = sum(split_accuracy(task.model, dev, None) * len(dev) for _, dev in folds)
    print(f"dense dev accuracy {dense_correct / len(calibration):.3f} ({len(calibration)} images, two folds)")
    print("| criterion | channels | allocation | selection | budget | " + " | ".join(args.repairs) + " |\n|---|---|---|---|---|"
          + "---|" * len(args.repairs))
    variants = [(ch, al, se) for ch in args.channels for al in args.allocations for se in args.selections
                if ch == "off" or (al, se) == ("scores", "scores")]  # the refit counts and choices refuse prune_channels
    for criterion in args.criteria:
        base = {**dict(num_samples=args.scored_images, neuron_group_size=1, neurons_multiple_of=1, importance=criterion,
                       reconstruct="none", seed=0), **json.loads(args.options)}
        correct = {(*variant, budget, name): 0.0 for variant in variants for budget in args.budgets for name in args.repairs}
        losses = {key: [0.0, 0.0] for key in correct}
        for fold, (fit, dev) in enumerate(folds):
            batches = prepare_calibration(fit, None, num_samples=len(fit), batch_size=32, max_length=128)
            # scored once (with the channels when any row prunes them): the heads' and neurons' scores do not depend on it
            pruner = OptinPruner(OptinConfig(**base, prune_channels="on" in args.channels))
            extra = "" if json.loads(args.options) == {} else "-" + "-".join(f"{k}{v}" for k, v in sorted(json.loads(args.options).items()))
            cached = args.scores_dir and Path(args.scores_dir) / f"{criterion}-{args.scored_images}{extra}-fold{fold}.safetensors"
            if cached and cached.is_file():
                scores = ImportanceScores.load(cached)
                pruner.compute_masks(task.model, fit, scores=dataclasses.replace(scores, channel_scores=None))  # the image size
            else:
                scores = pruner.compute_scores(task.model, fit.select(range(args.scored_images)))
                if cached:
                    scores.save(cached)
            counts = {}  # repair -> budget -> masks, measured when first asked
            for (channels, allocation, selection), budget in [(v, b) for v in variants for b in args.budgets]:
                # with channels the residual share is judged by the BatchNorm-repaired model on this fold's images
                config = OptinConfig(**{**base, "mac_constraint": budget, "prune_channels": channels == "on",
                                        "reconstruct": "batchnorm" if channels == "on" else "none"})
                masks = OptinPruner(config).compute_masks(  # the images also say the size the MACs are counted at
                    task.model, fit, scores=scores if channels == "on" else dataclasses.replace(scores, channel_scores=None))
                for name in args.repairs:
                    if channels == "on" and name in ("weights", "scales", "batchnorm+weights", "bias correction"):
                        continue  # these refit or correct at the dense residual widths
                    chosen = masks
                    if allocation == "refit":
                        # the cuts are judged after the row's repair (its last refit; the scratch repairs: batchnorm)
                        mode = name.split("+")[-1] if name in ("none", "batchnorm", "weights", "scales", "batchnorm+weights") else "batchnorm"
                        if mode not in counts:
                            counts[mode] = refit_counts(pruner, task.model, scores, batches, mode, args.rounds)
                        chosen = counts[mode](budget)
                    if selection == "refit":
                        chosen = select_by_refit(task.model, chosen, batches)
                    model = slim_model(copy.deepcopy(task.model), chosen).eval()
                    if REPAIRS[name] is not None:
                        REPAIRS[name](model, task.model, chosen, batches, config.reconstruct_ridge)
                    correct[channels, allocation, selection, budget, name] += split_accuracy(model, dev, None) * len(dev)
                    for i, value in enumerate(dev_losses(model, task.model, dev)):
                        losses[channels, allocation, selection, budget, name][i] += value
                    print(f"  fold {fold} {criterion} {channels} {allocation} {selection} @{budget} {name}: heads "
                          f"{chosen.head_mask.sum(1).tolist()} neurons {chosen.neuron_mask.sum(1).tolist()}", flush=True)
        for variant, budget in [(v, b) for v in variants for b in args.budgets]:
            accs = [correct[(*variant, budget, name)] / len(calibration) for name in args.repairs]
            cells = [f"{a:.3f}" if a else "-" for a in accs]
            print(f"| {criterion} | {' | '.join(variant)} | {budget} | " + " | ".join(cells) + " |", flush=True)
            print("  dev cross-entropy / KL from dense, mean per image: " + ", ".join(
                f"{name} {losses[(*variant, budget, name)][0] / len(calibration):.4f} / {losses[(*variant, budget, name)][1] / len(calibration):.4f}"
                for name in args.repairs), flush=True)

if __name__ == "__main__":
    main()
