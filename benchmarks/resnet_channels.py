"""digits-resnet on its held-out test split with and without coupled residual channels (`prune_channels`), at the
recipe's settings (scored once per setting, every budget allocated from those scores), and the share of the
dense MACs that no unit owns in each pruned model (the stem and the shortcut convs, `ArchAdapter.fixed_macs`).

The channel setting and the repair are chosen on development folds of the calibration images
(`benchmarks/cnn_repair_dev.py --channels off on`); this script reads the test split, so run it once per choice.

    nice -n 10 python benchmarks/resnet_channels.py [--budgets 0.8 0.6 0.5] [--channels off on] [--repairs batchnorm]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import check_model
from optin_hf.importance import ImportanceScores
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.report import split_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--channels", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--repairs", nargs="+", default=["batchnorm"])
    parser.add_argument("--scores", type=Path, help="scores of these settings saved before (with channel scores), read "
                        "instead of scoring: cnn_repair_dev.py's fold 0 scores the same first 64 calibration images")
    args = parser.parse_args()
    task = load_default("digits-resnet")
    base = default_recipe("digits-resnet").optin.to_dict()
    dense = split_accuracy(task.model, task.test, task.processor)
    adapter = check_model(task.model)
    rows = []
    # scored once, channels included where any row prunes them: the heads' and neurons' scores do not depend on it
    pruner = OptinPruner(OptinConfig.from_dict({**base, "prune_channels": "on" in args.channels}))
    start = time.perf_counter()
    if args.scores:
        all_scores = ImportanceScores.load(args.scores)
        pruner = OptinPruner(OptinConfig.from_dict(base))  # reads the image size and MAC length (no residual share judged)
        pruner.compute_masks(task.model, task.calibration, scores=dataclasses.replace(all_scores, channel_scores=None))
    else:
        all_scores = pruner.compute_scores(task.model, task.calibration, tokenizer=task.processor)
    scoring_s, seq_len, size = time.perf_counter() - start, pruner.seq_len, pruner.image_size
    dense_macs = count_macs(task.model, image_size=size)
    print(f"dense {dense:.3f}, fixed share {adapter.fixed_macs(task.model, size) / dense_macs:.1%}, scored in {scoring_s:.0f} s",
          flush=True)
    for channels in args.channels:
        settings = {**base, "prune_channels": channels == "on"}
        scores = all_scores if channels == "on" else dataclasses.replace(all_scores, channel_scores=None)
        for mode in args.repairs:
            for budget in args.budgets:
                config = OptinConfig.from_dict({**settings, "mac_constraint": budget, "seq_len": seq_len, "reconstruct": mode})
                model = copy.deepcopy(task.model)
                pruner = OptinPruner(config)
                masks = pruner.compute_masks(model, task.calibration, scores=scores)  # data: the residual share is judged on it
                pruner.prune_model(model, task.calibration, masks=masks, tokenizer=task.processor)
                accuracy = split_accuracy(model, task.test, task.processor)
                fixed = adapter.fixed_macs(model, size) / dense_macs
                kept = model.config.optin.get("channels_per_group", list(adapter.channel_widths(model.config)))
                rows.append((channels, mode, budget, accuracy, count_macs(model) / dense_macs, fixed, kept))
                print(f"  {mode} @{budget}: {accuracy:.3f} ({100 * (accuracy - dense):+.1f}), MACs {rows[-1][4]:.3f}, "
                      f"fixed {fixed:.1%}, channels {kept}", flush=True)
    print("\n| channels | repair | budget | test accuracy | MACs kept | fixed share | residual channels kept |")
    print("|---|---|---|---|---|---|---|")
    for channels, mode, budget, accuracy, macs, fixed, kept in rows:
        print(f"| {channels} | {mode} | {budget} | {accuracy:.3f} ({100 * (accuracy - dense):+.1f}) | {macs:.3f} | {fixed:.1%} | {kept} |")


if __name__ == "__main__":
    main()
