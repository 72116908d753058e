"""How sure is a perplexity difference? Two models' per-window losses (`benchmarks/llm_quality.py --per-window DIR`),
compared window by window: the perplexity ratio A / B on the table's windows and on all the windows read, with
a 95% paired bootstrap interval (windows resampled with replacement, the same draw for both models, so what the
interval measures is how much the ratio depends on which windows were read).

    python benchmarks/window_bootstrap.py DIR/A.safetensors DIR/B.safetensors [--resamples 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def ratio_interval(a: torch.Tensor, b: torch.Tensor, tokens: int, resamples: int, seed: int) -> tuple[float, float, float]:
    """(ratio, 2.5th percentile, 97.5th percentile) of exp(mean(a - b) / tokens), the perplexity ratio of two models
    whose window losses (summed NLL over `tokens` predicted tokens each) are `a` and `b`, windows resampled as pairs."""
    difference = (a - b).double()
    draws = torch.randint(len(difference), (resamples, len(difference)), generator=torch.Generator().manual_seed(seed))
    means = difference[draws].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(difference.mean()) / tokens), math.exp(low / tokens), math.exp(high / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tokens", type=int, default=127, help="predicted tokens per window (128-token windows: 127)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    a, b = load_file(args.a), load_file(args.b)
    print(f"A = {Path(args.a).stem}, B = {Path(args.b).stem}; perplexity ratio A / B, 95% paired bootstrap interval "
          f"({args.resamples} resamples, seed {args.seed})")
    for split in [k for k in a if not k.endswith("_table")]:
        if split not in b or not torch.equal(a[f"{split}_table"], b[f"{split}_table"]):
            raise SystemExit(f"{split}: the two files do not hold the same windows")
        table = a[f"{split}_table"]
        for name, picked in ((f"{split}, the table's {int(table.sum())} windows", table),
                             (f"{split}, all {len(table)} windows read", torch.ones_like(table))):
            x, y = a[split][picked], b[split][picked]
            ratio, low, high = ratio_interval(x, y, args.tokens, args.resamples, args.seed)
            ppl_a, ppl_b = (math.exp(float(v.mean()) / args.tokens) for v in (x, y))
            print(f"{name}: A {ppl_a:.3f}, B {ppl_b:.3f}, A / B {ratio:.4f} [{low:.4f}, {high:.4f}]; A better on "
                  f"{int((x < y).sum())} of {len(x)} windows")


if __name__ == "__main__":
    main()
