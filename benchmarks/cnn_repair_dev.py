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

    nice -n 10 python benchmarks/cnn_repair_dev.py [--criteria optin magnitude random] [--budgets 0.8 0.6 0.5]
        [--repairs none batchnorm weights scales batchnorm+weights]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model, get_submodule
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.masks import PruningMasks
from optin_hf.reconstruct import batch_norms, reconstruct
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.report import split_accuracy


@torch.no_grad()
def train_mode_statistics(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict]) -> None:
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
def bias_correction(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict]) -> None:
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


def _repairs(*modes: str) -> Callable:
    def repair(model: nn.Module, dense: nn.Module, masks: PruningMasks, batches: list[dict]) -> None:
        for mode in modes:
            reconstruct(model, dense, batches, mode)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", nargs="+", default=["optin", "magnitude", "random"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--repairs", nargs="+", choices=list(REPAIRS), default=["none", "batchnorm", "weights", "scales", "batchnorm+weights"])
    parser.add_argument("--channels", nargs="+", choices=["off", "on"], default=["off"],
                        help="prune_channels settings to compare (on: coupled residual channels too; the refits refuse it)")
    parser.add_argument("--scores-dir", help="a folder keeping each fold's scores, read back by later runs (no re-scoring)")
    args = parser.parse_args()
    task = load_default("digits-resnet")
    calibration = task.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [(halves[0], halves[1]), (halves[1], halves[0])]  # (scored and repaired on, judged on)
    dense_correct = sum(split_accuracy(task.model, dev, None) * len(dev) for _, dev in folds)
    print(f"dense dev accuracy {dense_correct / len(calibration):.3f} ({len(calibration)} images, two folds)")
    print("| criterion | channels | budget | " + " | ".join(args.repairs) + " |\n|---|---|---|" + "---|" * len(args.repairs))
    for criterion in args.criteria:
        base = dict(num_samples=64, neuron_group_size=1, neurons_multiple_of=1, importance=criterion, reconstruct="none", seed=0)
        correct = {(channels, budget, name): 0.0 for channels in args.channels for budget in args.budgets for name in args.repairs}
        for fold, (fit, dev) in enumerate(folds):
            batches = prepare_calibration(fit, None, num_samples=len(fit), batch_size=32, max_length=128)
            # scored once (with the channels when any row prunes them): the heads' and neurons' scores do not depend on it
            pruner = OptinPruner(OptinConfig(**base, prune_channels="on" in args.channels))
            cached = args.scores_dir and Path(args.scores_dir) / f"{criterion}-fold{fold}.safetensors"
            if cached and cached.is_file():
                scores = ImportanceScores.load(cached)
            else:
                scores = pruner.compute_scores(task.model, fit.select(range(64)))
                if cached:
                    scores.save(cached)
            for channels, budget in [(ch, b) for ch in args.channels for b in args.budgets]:
                # with channels the residual share is judged by the BatchNorm-repaired model on this fold's images
                config = OptinConfig(**{**base, "mac_constraint": budget, "prune_channels": channels == "on",
                                        "reconstruct": "batchnorm" if channels == "on" else "none"})
                masks = OptinPruner(config).compute_masks(  # the images also say the size the MACs are counted at
                    task.model, fit, scores=scores if channels == "on" else dataclasses.replace(scores, channel_scores=None))
                for name in args.repairs:
                    if channels == "on" and name in ("weights", "scales", "batchnorm+weights", "bias correction"):
                        continue  # these refit or correct at the dense residual widths
                    model = slim_model(copy.deepcopy(task.model), masks).eval()
                    if REPAIRS[name] is not None:
                        REPAIRS[name](model, task.model, masks, batches)
                    correct[channels, budget, name] += split_accuracy(model, dev, None) * len(dev)
        for channels, budget in [(ch, b) for ch in args.channels for b in args.budgets]:
            accs = [correct[channels, budget, name] / len(calibration) for name in args.repairs]
            cells = [f"{a:.3f}" if a else "-" for a in accs]
            print(f"| {criterion} | {channels} | {budget} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
