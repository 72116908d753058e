"""A ResNet like the issue's holdout (a wide stem: 44% of its MACs in the stem and the shortcut convs), trained
from scratch here on digits-resnet's training split, pruned with and without coupled residual channels
(`prune_channels`), BatchNorm repair, at the digits-resnet recipe's scoring settings.

Two development folds of the calibration images (scored on 64 images of one half, repaired on that half, judged
on the other; no test image), then, with `--test`, the held-out test split once (scored on the first 64
calibration images, repaired on all 256 of them, as the default's CLI run).

    nice -n 10 python benchmarks/resnet_wide_stem.py [--budgets 0.8 0.6 0.5] [--test]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from transformers import ResNetForImageClassification

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.reconstruct import reconstruct
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits
from optin_hf.tasks.defaults.train import train_resnet
from optin_hf.tasks.report import split_accuracy

# digits-resnet's training settings with a wide stem (48 channels) and narrower stages: 44.4% of the MACs fixed
HPARAMS = dict(embedding_size=48, hidden_sizes=(64, 128), depths=(2, 2))


def pruned_accuracy(model, scores, fit, dev, budget: float, channels: bool) -> tuple[float, tuple[int, ...] | None]:
    """Accuracy on `dev` of `model` pruned at `budget` from `scores` and repaired on `fit`; the kept channel widths."""
    # with channels the residual share is judged by the BatchNorm-repaired model on the `fit` images
    base = dict(num_samples=64, neuron_group_size=1, neurons_multiple_of=1, reconstruct="batchnorm", seed=0, mac_constraint=budget)
    masks = OptinPruner(OptinConfig(**base, prune_channels=channels)).compute_masks(
        model, fit, scores=scores if channels else dataclasses.replace(scores, channel_scores=None))
    slim = slim_model(copy.deepcopy(model), masks).eval()
    reconstruct(slim, model, prepare_calibration(fit, None, num_samples=len(fit), batch_size=32, max_length=128), "batchnorm")
    widths = masks.channels_per_group(check_model(model).channel_widths(model.config)) if channels else None
    return split_accuracy(slim, dev, None), widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--test", action="store_true", help="also prune on the calibration images and judge on the test split")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1], help="the development folds to run")
    parser.add_argument("--cache", type=Path, help="a folder keeping the trained model and each fold's scores for later runs")
    args = parser.parse_args()
    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    if args.cache and (args.cache / "model").is_dir():
        model = ResNetForImageClassification.from_pretrained(args.cache / "model")
    else:
        model, _ = train_resnet(dataclasses.replace(recipe.hparams, **HPARAMS), splits.train, list(corpus.label_names))
        if args.cache:
            model.save_pretrained(args.cache / "model")
    model.eval()
    adapter, size = check_model(model), (32, 32)
    share = adapter.fixed_macs(model, size) / count_macs(model, image_size=size)
    calibration = splits.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [("dev", halves[0], halves[1]), ("dev", halves[1], halves[0])]
    folds = [(*folds[i], f"fold{i}") for i in args.folds]
    if args.test:
        folds.append(("test", calibration, splits.test, "test"))
    correct: dict[tuple[str, bool, float], float] = {}
    seen: dict[str, int] = {}
    dense: dict[str, float] = {}
    for split, fit, judged, name in folds:
        cached = args.cache / f"scores-{name}.safetensors" if args.cache else None
        if cached and cached.is_file():
            scores = ImportanceScores.load(cached)
        else:
            pruner = OptinPruner(OptinConfig(num_samples=64, neuron_group_size=1, neurons_multiple_of=1, seed=0, prune_channels=True))
            scores = pruner.compute_scores(model, fit.select(range(64)))
            if cached:
                scores.save(cached)
        seen[split] = seen.get(split, 0) + len(judged)
        dense[split] = dense.get(split, 0.0) + split_accuracy(model, judged, None) * len(judged)
        for channels in (False, True):
            for budget in args.budgets:
                accuracy, widths = pruned_accuracy(model, scores, fit, judged, budget, channels)
                correct[split, channels, budget] = correct.get((split, channels, budget), 0.0) + accuracy * len(judged)
                print(f"{split} channels={channels} @{budget}: {accuracy:.3f} widths {widths}", flush=True)
    print(f"\nwide-stem ResNet {HPARAMS}: fixed share {share:.1%}")
    print("| split | dense | channels | " + " | ".join(f"@{b}" for b in args.budgets) + " |")
    print("|---|---|---|" + "---|" * len(args.budgets))
    for split in seen:
        base = dense[split] / seen[split]
        for channels in (False, True):
            accs = [correct[split, channels, b] / seen[split] for b in args.budgets]
            cells = " | ".join(f"{a:.3f} ({100 * (a - base):+.1f})" for a in accs)
            print(f"| {split} | {base:.3f} | {'on' if channels else 'off'} | {cells} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
