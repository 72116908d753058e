"""The CNN repairs compared on a development split of digits-resnet (how `reconstruct="batchnorm"` was chosen).

Scored on calibration images 0-63 (as the recipe), repaired on images 0-127, judged on images 128-255 of
the default's calibration split: no test image is read. Per criterion and budget, dev accuracy of:
none; "batchnorm" (optin-hf: running means re-estimated, variances kept); means and variances
re-estimated by BatchNorm train-mode passes with cumulative averages (momentum=None); and an analytic
bias correction (each removed channel's mean activation in the dense model times the next conv's
weights summed over its kernel, folded into the next BatchNorm's running mean).

    python benchmarks/cnn_repair_dev.py [--criteria optin magnitude random] [--budgets 0.8 0.6 0.5]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model, get_submodule
from optin_hf.data import prepare_calibration
from optin_hf.masks import PruningMasks
from optin_hf.reconstruct import batch_norms, reconstruct
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.report import split_accuracy


@torch.no_grad()
def train_mode_statistics(model: nn.Module, batches: list[dict]) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", nargs="+", default=["optin", "magnitude", "random"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    args = parser.parse_args()
    task = load_default("digits-resnet")
    calibration = task.calibration
    scoring, repair, dev = calibration.select(range(64)), calibration.select(range(128)), calibration.select(range(128, 256))
    batches = prepare_calibration(repair, None, num_samples=128, batch_size=32, max_length=128)
    print(f"dense dev accuracy {split_accuracy(task.model, dev, None):.3f} ({len(dev)} images)")
    repairs = ("none", "batchnorm (means)", "train-mode means+vars", "bias correction")
    print("| criterion | budget | " + " | ".join(repairs) + " |\n|---|---|" + "---|" * len(repairs))
    for criterion in args.criteria:
        base = dict(num_samples=64, neuron_group_size=1, neurons_multiple_of=1, importance=criterion, reconstruct="none", seed=0)
        pruner = OptinPruner(OptinConfig(**base))
        scores = pruner.compute_scores(task.model, scoring)
        for budget in args.budgets:
            masks = OptinPruner(OptinConfig(**{**base, "mac_constraint": budget, "seq_len": pruner.seq_len})).compute_masks(task.model, scores=scores)
            accs = []
            for name in repairs:
                model = slim_model(copy.deepcopy(task.model), masks).eval()
                if name.startswith("batchnorm"):
                    reconstruct(model, task.model, batches, "batchnorm")
                elif name.startswith("train-mode"):
                    train_mode_statistics(model, batches)
                elif name.startswith("bias"):
                    bias_correction(model, task.model, masks, batches)
                accs.append(split_accuracy(model, dev, None))
            print(f"| {criterion} | {budget} | " + " | ".join(f"{a:.3f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
