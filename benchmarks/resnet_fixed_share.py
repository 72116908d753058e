"""How much of a bottleneck ResNet's MACs no unit owns today, and how that share falls if each stage's residual
width (the block output channels tied by the residual adds, with the shortcut convs) became a unit too (issue 21,
item 4: a design figure, computed from the shapes; nothing is pruned).

Per block of C_in input and C_out output channels, m inner channels (heads = neurons = m) on maps of R positions
after the reduce conv and P after the 3x3 conv, the encoder's MACs (`count_macs`) are
    C_in·m·R (1x1 reduce) + 9·m²·P (3x3) + m·C_out·P (1x1 expand) [+ C_in·C_out·P (shortcut conv)],
plus the stem, num_channels·49·E·S (E stem channels on S positions). Today the stem and the shortcut convs are
fixed and C_in, C_out never shrink. With coupled channels a stage keeps a share ρ of its width (and the stem of
its E), so the stem costs ρ·stem, a shortcut ρ²·C_in·C_out·P, and the 1x1 convs ρ·r·(...) at an inner share r.

Printed per model: its MACs, the fixed share without channel pruning (checked against `ArchAdapter.fixed_macs`),
the fixed share with `prune_channels=True` at a uniform ρ = 0.5 and at one channel per group (the least the
stem and shortcuts can cost, `ResNetAdapter.fixed_macs_at`), and for each budget the uniform inner share r that
reaches it without channels (none where the fixed share alone exceeds it), and the uniform share r = ρ of every
unit with them.

    PYTHONPATH=. python benchmarks/resnet_fixed_share.py [--budgets 0.8 0.6 0.5 0.3]
"""

from __future__ import annotations

import argparse
import math

from transformers import ResNetConfig, ResNetForImageClassification

from optin_hf import count_macs
from optin_hf.arch import check_model
from optin_hf.arch.resnet import blocks, conv_out

# (name, config, image size): the digits-resnet default's shape and microsoft/resnet-50's (random weights)
MODELS = [
    ("digits-resnet", ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[96, 192], depths=[2, 2], num_labels=10), 32),
    ("resnet-50 shape", ResNetConfig(), 224),
]


def macs(config: ResNetConfig, size: int, r: float, rho: float) -> float:
    """The encoder's MACs with a share r of every block's inner channels and rho of every residual width."""
    stem = config.num_channels * 49 * config.embedding_size * math.prod(conv_out((size, size), 7, 2, 3))
    total = rho * stem
    for b in blocks(config, (size, size)):
        reduced, out = math.prod(b.reduced), math.prod(b.out_map)
        total += rho * r * b.in_channels * b.inner * reduced + 9 * (r * b.inner) ** 2 * out + r * rho * b.inner * b.out_channels * out
        total += rho**2 * b.in_channels * b.out_channels * out if b.shortcut else 0.0
    return total


def share_for(budget: float, config: ResNetConfig, size: int, coupled: bool) -> float | None:
    """The uniform share (bisection) whose MACs are `budget` of the dense ones; None if out of reach."""
    dense = macs(config, size, 1.0, 1.0)
    cost = (lambda r: macs(config, size, r, r)) if coupled else (lambda r: macs(config, size, r, 1.0))
    if cost(0.0) > budget * dense:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if cost((low + high) / 2) < budget * dense else (low, (low + high) / 2)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.5, 0.3])
    args = parser.parse_args()
    print("| model | MACs | fixed, no channels | fixed at ρ = 0.5 | fixed at 1 channel/group | "
          + " | ".join(f"r at {b} without / with channels" for b in args.budgets) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.budgets))
    for name, config, size in MODELS:
        model = ResNetForImageClassification(config).eval()
        dense = macs(config, size, 1.0, 1.0)
        counted = count_macs(model, image_size=size)
        assert abs(counted - dense) < 1e-6 * dense, (counted, dense)  # the formula is what count_macs counts
        adapter = check_model(model)
        fixed = adapter.fixed_macs(model, (size, size))
        widths = adapter.channel_widths(config)
        half = adapter.fixed_macs_at(config, (size, size), tuple(w // 2 for w in widths))
        least = adapter.fixed_macs_at(config, (size, size), (1,) * len(widths))
        cells = []
        for budget in args.budgets:
            today, coupled = share_for(budget, config, size, False), share_for(budget, config, size, True)
            cells.append(f"{'out of reach' if today is None else f'{today:.2f}'} / {coupled:.2f}")
        print(f"| {name} | {dense / 1e6:.1f} M | {fixed / dense:.1%} | {half / dense:.1%} | {least / dense:.2%} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
