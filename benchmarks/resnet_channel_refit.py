"""Coupled residual channels with the consumer refit on the wide-stem ResNet (issue 21): development folds.

The model is `benchmarks/family_digits.py --family resnet-wide`'s (trained once, cached there), or with
`--model digits-resnet` that default's. Two folds of the 256
calibration images: each scores on one half (all 128 of its images, `importance="optin"`, `prune_channels=True`,
the library's other defaults), prunes and repairs on that half, and is judged on the other (no test image is
read). Prints the accuracy, the mean cross-entropy on the labels and the KL from the dense model per image, the kept
residual widths and the fixed share of the dense MACs the kept widths leave. `--split test` prunes on the 256
calibration images and judges on the test split (read once per final setting).

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks nice -n 10 python benchmarks/resnet_channel_refit.py --settings ...
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from family_digits import trained
from optin_hf import OptinConfig, OptinPruner, channel_search, count_macs
from optin_hf.arch import ADAPTERS, check_model
from optin_hf.arch.resnet import RESNET
from optin_hf.importance import ImportanceScores
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits

# name -> OptinConfig fields (mac_constraint left out)
SETTINGS = {
    "auto": {},  # OptinConfig(mac_constraint=b): the recipe search, residual channels by default
    "optin": dict(importance="optin"),  # residual channels and the refit by default
    "bn": dict(importance="optin", reconstruct="batchnorm", prune_channels=False),
    "weights": dict(importance="optin", reconstruct="weights", prune_channels=False),
    "ch-bn": dict(importance="optin", reconstruct="batchnorm", prune_channels=True),
    "ch-weights": dict(importance="optin", reconstruct="weights", prune_channels=True),
    # recipes/digits-resnet.yaml's settings (the fold's 128 images scored)
    "recipe": dict(importance="optin", reconstruct="weights", neuron_group_size=1, neurons_multiple_of=1, prune_channels=False,
                   allocation="refit", allocation_rounds=2),
    "ch-recipe": dict(importance="optin", reconstruct="weights", neuron_group_size=1, neurons_multiple_of=1,
                      prune_channels=True),
}


@torch.no_grad()
def judge(slim, dense, split) -> tuple[float, float, float]:
    """(accuracy, mean CE on the labels, mean KL from the dense model) of `slim` on `split`."""
    rows = split.with_format("torch")[:]
    x, y = rows["pixel_values"], rows["label"]
    logits, ref = slim(pixel_values=x).logits, dense(pixel_values=x).logits
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y)), float(kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--model", choices=["resnet-wide", "digits-resnet"], default="resnet-wide")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--extra", type=json.loads, default={}, help="more OptinConfig fields for every setting")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--scores-dir", type=Path, default=Path("/tmp/s31/channels"))
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("--repairs", nargs="+", help="the ResNet adapter's declared repairs in this order (its first is 'auto')")
    parser.add_argument("--uniform-shares", action="store_true", help="no trial of the stem's group alone (STEM_APART off)")
    parser.add_argument("--shares", nargs="+", type=float, help="the residual shares the channel search tries (its SHARES)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.shares:
        channel_search.SHARES = tuple(args.shares)
    channel_search.STEM_APART = not args.uniform_shares
    if args.repairs:
        ADAPTERS["resnet"] = dataclasses.replace(RESNET, capabilities=dataclasses.replace(RESNET.capabilities, repairs=tuple(args.repairs)))
    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    if args.model == "digits-resnet":
        task = load_default("digits-resnet")
        model, splits = task.model.eval(), task
    else:
        model = trained("resnet-wide", splits.train, list(corpus.label_names))
    adapter, size = check_model(model), (32, 32)
    dense_macs = count_macs(model, image_size=32)
    calibration = splits.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [(f"fold{i}", halves[i], halves[1 - i]) for i in args.folds] if args.split == "dev" else [("test", calibration, splits.test)]
    print(f"fixed share dense: {adapter.fixed_macs(model, size) / dense_macs:.1%}", flush=True)
    totals: dict = {}
    for name, fit, held in folds:
        cached = args.scores_dir / f"scores-{args.model}-{name}.safetensors"
        if cached.is_file():
            scores = ImportanceScores.load(cached)
        else:
            start = time.perf_counter()
            scores = OptinPruner(OptinConfig(importance="optin", prune_channels=True)).compute_scores(model, fit)
            scores.save(cached)
            print(f"{name}: scored in {time.perf_counter() - start:.0f} s", flush=True)
        if args.score_only:
            continue
        dense_acc = judge(model, model, held)[0]
        for setting in args.settings:
            fields = {**SETTINGS[setting], **args.extra}
            for budget in args.budgets:
                start = time.perf_counter()
                pruner = OptinPruner(OptinConfig(**fields, mac_constraint=budget))
                slim = copy.deepcopy(model)
                if setting == "auto":  # the search scores each candidate criterion itself
                    pruner.prune_model(slim, fit)
                    masks = pruner.masks
                else:
                    use = copy.copy(scores)
                    if fields.get("prune_channels") is False:
                        use.channel_scores = None
                    masks = pruner.compute_masks(slim, fit, scores=use)
                    pruner.prune_model(slim, fit, masks=masks)
                acc, ce, kl = judge(slim.eval(), model, held)
                fixed = adapter.fixed_macs(slim, size) / dense_macs
                widths = adapter.kept_channels(slim)
                heads, neurons = masks.head_mask.sum(1).tolist(), masks.neuron_mask.sum(1).tolist()
                chosen = f"{pruner.config.importance} + {pruner.config.reconstruct}, channels {pruner.config.prune_channels}"
                print(f"{name} {setting} ({chosen}) @{budget}: acc {acc:.3f} ({100 * (acc - dense_acc):+.1f}) CE {ce:.3f} KL {kl:.3f} "
                      f"widths {widths} fixed {fixed:.1%} h{heads} n{neurons} ({time.perf_counter() - start:.0f} s)", flush=True)
                total = totals.setdefault((setting, budget), [0.0, 0.0, 0.0, 0.0, 0])
                for k, v in enumerate((acc, ce, kl, dense_acc)):
                    total[k] += v * len(held)
                total[4] += len(held)
    print("\n| setting | " + " | ".join(f"@{b} acc (CE / KL)" for b in args.budgets) + " |")
    for setting in args.settings:
        cells = []
        for b in args.budgets:
            if (setting, b) in totals:
                acc, ce, kl, dense_acc, n = totals[setting, b]
                cells.append(f"{acc / n:.3f} ({100 * (acc - dense_acc) / n:+.1f}; {ce / n:.3f} / {kl / n:.3f})")
        print(f"| {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
