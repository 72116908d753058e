"""A small ConvNeXt trained here from scratch on the digits of the `digits-resnet` default (the same 32x32 images
and the same train / calibration / test split), pruned at several MAC budgets without and with the refit (issue 21:
ConvNeXt has no default, so its quality rows come from this model).

The repair is chosen on development splits of the calibration images (two folds, as
`benchmarks/cnn_repair_dev.py`: scored on 64 images of one half, repaired on that half, judged on the other);
the test rows then score on calibration images 0-63 and repair on all 256, and are judged on the held-out
test split. One training seed, one scoring seed (0).

    PYTHONPATH=. nice -n 10 python benchmarks/convnext_digits.py [--budgets 0.8 0.6 0.5] [--criteria optin random]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.reconstruct import reconstruct
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits
from optin_hf.tasks.defaults.train import OptimHParams, _train_images  # the defaults' own image training loop
from optin_hf.tasks.report import split_accuracy

CACHE = Path("/tmp/optin-convnext-digits")
HPARAMS = OptimHParams(epochs=20, batch_size=64, lr=2e-3)
REPAIRS = ("none", "weights", "scales")


def trained(train, label_names: list[str]) -> ConvNextForImageClassification:
    """The ConvNeXt, trained once and cached in CACHE: 4x4 patches, two stages of 48 and 96 channels, two blocks
    each; layer scales start at 0.1 (ConvNeXt's 1e-6 leaves the blocks idle for too long in a short run from scratch)."""
    if (CACHE / "config.json").is_file():
        return ConvNextForImageClassification.from_pretrained(CACHE).eval()
    torch.manual_seed(HPARAMS.seed)
    config = ConvNextConfig(num_channels=1, patch_size=4, num_stages=2, hidden_sizes=[48, 96], depths=[2, 2], image_size=32,
                            layer_scale_init_value=0.1,
                            num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                            label2id={name: i for i, name in enumerate(label_names)})
    model, _ = _train_images(ConvNextForImageClassification(config), HPARAMS, train, "training digits ConvNeXt")
    model.save_pretrained(CACHE)
    return model.eval()


def pruned(model, scores, seq_len, budget: float, repair: str, batches, base: dict):
    config = OptinConfig(**{**base, "mac_constraint": budget, "seq_len": seq_len})
    masks = OptinPruner(config).compute_masks(model, scores=scores)
    slim = slim_model(copy.deepcopy(model), masks).eval()
    if repair != "none":
        reconstruct(slim, model, batches, repair)
    return slim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--criteria", nargs="+", default=["optin", "random"])
    args = parser.parse_args()
    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    model = trained(splits.train, corpus.label_names)
    calibration, test = splits.calibration, splits.test
    adapter = check_model(model)
    fixed = adapter.fixed_macs(model, (32, 32)) / count_macs(model, image_size=32)
    print(f"ConvNeXt on digits: dense test accuracy {split_accuracy(model, test, None):.3f} ({len(test)} images), "
          f"{count_macs(model, image_size=32) / 1e6:.2f} M MACs, {fixed:.1%} fixed")
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    for criterion in args.criteria:
        base = dict(num_samples=64, neuron_group_size=4, neurons_multiple_of=1, importance=criterion, reconstruct="none", seed=0)
        correct = {(budget, repair): 0.0 for budget in args.budgets for repair in REPAIRS}
        for fit, dev in ((halves[0], halves[1]), (halves[1], halves[0])):
            pruner = OptinPruner(OptinConfig(**base))
            scores = pruner.compute_scores(model, fit.select(range(64)))
            batches = prepare_calibration(fit, None, num_samples=len(fit), batch_size=32, max_length=128)
            for budget in args.budgets:
                for repair in REPAIRS:
                    slim = pruned(model, scores, pruner.seq_len, budget, repair, batches, base)
                    correct[budget, repair] += split_accuracy(slim, dev, None) * len(dev)
        print(f"\n{criterion}, development (two folds of the calibration images, {len(calibration)} judged):")
        print("| budget | " + " | ".join(REPAIRS) + " |\n|---|" + "---|" * len(REPAIRS))
        chosen = {}
        for budget in args.budgets:
            accs = {repair: correct[budget, repair] / len(calibration) for repair in REPAIRS}
            chosen[budget] = max(REPAIRS, key=lambda repair: accs[repair])
            print(f"| {budget} | " + " | ".join(f"{accs[r]:.3f}" for r in REPAIRS) + f" | -> {chosen[budget]}")
        pruner = OptinPruner(OptinConfig(**base))
        scores = pruner.compute_scores(model, calibration.select(range(64)))
        batches = prepare_calibration(calibration, None, num_samples=len(calibration), batch_size=32, max_length=128)
        print(f"\n{criterion}, test ({len(test)} images; the repair chosen on development marked *):")
        print("| budget | " + " | ".join(REPAIRS) + " |\n|---|" + "---|" * len(REPAIRS))
        for budget in args.budgets:
            accs = [split_accuracy(pruned(model, scores, pruner.seq_len, budget, repair, batches, base), test, None) for repair in REPAIRS]
            cells = [f"{a:.3f}{'*' if r == chosen[budget] else ''}" for r, a in zip(REPAIRS, accs)]
            print(f"| {budget} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
