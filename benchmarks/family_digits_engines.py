"""Fast against reference scoring engine on the trained digits models of `benchmarks/family_digits.py` (issue 21).

`engine_speed.py` times the ImageNet-shaped random-weight architectures; their ConvNeXt starts every layer scale
at 1e-6, so a candidate's KL is about 1e-13 and the engines' raw losses differ by float32 rounding alone (up to 1%
relative). Trained weights give losses of a useful size, so the agreement of the engines is read here. Both
engines score every candidate (heads alone, neurons in groups of `--group`) on the first `--samples` calibration
images of the digits-resnet split, 1 torch thread; each engine is timed from its dense capture to its last candidate.

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks nice -n 10 python benchmarks/family_digits_engines.py --families convnext swin
"""

from __future__ import annotations

import argparse
import os

import torch

from engine_speed import largest_difference, score, subset
from family_digits import FAMILIES, trained
from optin_hf import OptinConfig
from optin_hf.data import prepare_calibration
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=["convnext", "swin"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    load = os.getloadavg()[0]
    rows = []
    for family in args.families:
        model = trained(family, splits.train, list(corpus.label_names))
        config = OptinConfig(num_samples=args.samples, batch_size=32, neuron_group_size=args.group)
        batches = prepare_calibration(splits.calibration, num_samples=args.samples, batch_size=32, max_length=128)
        candidates, total = subset(model, args.group, 1, 1)
        reference = score(ReferenceRunner, model, batches, config, candidates)
        fast = score(FastRunner, model, batches, config, candidates)
        rows.append(f"| {family} (trained on digits, family_digits.py) | {args.samples} x 32x32 | {len(candidates)} of {total} "
                    f"| {reference.wall:.1f} ({reference.cpu:.1f}) | {fast.wall:.1f} ({fast.cpu:.1f}) "
                    f"| {reference.wall / fast.wall:.2f} | {reference.cpu / fast.cpu:.2f} | {largest_difference(fast, reference):.1e} |")
        print(rows[-1], flush=True)
    print(f"\ntorch {torch.__version__}, 1 thread, load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
