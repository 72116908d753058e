"""Scoring time of the fast engine against the reference engine on the vision families, in one run (issue 21).

Models (`--models`): the embedded defaults `digit-scenes-segformer` and `digits-resnet`
(`optin_hf.tasks.defaults.load_default`, trained and cached on first use), calibrated on their own
calibration split at their recipe's settings (samples, batch size, neuron groups, MD tokens); and the
reference architectures of `family_speed.py` (`swin`, `resnet`, `convnext`, `segformer`, `mask2former`)
with random weights at their image size, calibrated on `--samples` seeded random images with neurons
in groups of `--group`: the time depends on the shapes only.

Both engines score the same candidates: every `--head-stride`-th head and every `--neuron-stride`-th
neuron group of each layer, so each layer has the share of the subset it has of a full run (the
reference engine costs one full forward per candidate, the fast engine less the later its layer).
Each engine is timed from its dense capture to its last candidate, wall clock and process CPU time
(on a shared machine the CPU time shows the work). Printed per model: both times, their ratios
(reference / fast), and the largest relative difference of a candidate's raw MD or KL between them.

    PYTHONPATH=.:benchmarks nice -n 10 python benchmarks/engine_speed.py [--models swin digit-scenes-segformer]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from optin_hf import OptinConfig
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.engine.run import candidate_masks, chunks
from family_speed import FAMILIES, pixels

DEFAULTS = ("digit-scenes-segformer", "digits-resnet")
Candidate = tuple[str, int, int]  # (kind, layer, index of its group)


@dataclass
class Timed:
    """Raw (MD, KL) per candidate and the seconds it took, wall and CPU."""

    losses: dict[Candidate, tuple[float, float]]
    wall: float
    cpu: float


def load(name: str, samples: int, group: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], OptinConfig, str]:
    """(model, calibration batches, the settings it scores with, where it comes from)."""
    if name in DEFAULTS:
        from optin_hf.tasks.defaults import load_default
        from optin_hf.tasks.recipes import default_recipe

        task, config = load_default(name), default_recipe(name).optin
        batches = prepare_calibration(task.calibration, num_samples=config.num_samples, batch_size=config.batch_size,
                                      max_length=config.max_length)
        return task.model.eval(), batches, config, f"load_default({name!r}), its recipe's settings"
    spec = FAMILIES[name]
    images = [{"pixel_values": image} for image in pixels(samples, spec.image_size)]
    config = OptinConfig(num_samples=samples, batch_size=samples, neuron_group_size=group)
    batches = prepare_calibration(images, num_samples=samples, batch_size=samples, max_length=config.max_length)
    torch.manual_seed(0)
    return spec.build().eval(), batches, config, f"{spec.checkpoint}'s architecture, random weights, {spec.image_size} px"


def subset(model: nn.Module, group: int, head_stride: int, neuron_stride: int) -> tuple[list[Candidate], int]:
    """The timed candidates, in the order a scoring run visits them, and how many a full run has."""
    geometry = check_model(model).layer_geometry(model.config)
    counts = {(kind, layer): units for layer, g in enumerate(geometry)
              for kind, units in (("head", g.heads), ("neuron", math.ceil(g.neurons / group)))}
    strides = {"head": head_stride, "neuron": neuron_stride}
    picked = [(kind, layer, index) for kind in ("head", "neuron") for layer in range(len(geometry))
              for index in range(0, counts[kind, layer], strides[kind])]
    return picked, sum(counts.values())


def score(runner_class, model, batches, config, candidates: list[Candidate]) -> Timed:
    """Raw losses of `candidates` by one engine, timed with its dense capture."""
    adapter = check_model(model)
    widths = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
    groups = {"head": 1, "neuron": config.neuron_group_size}
    losses = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        runner = runner_class(model, adapter, batches, config)
        for chunk in chunks(candidates, runner.variants):
            kind, layer = chunk[0][:2]
            masks = candidate_masks([index for _, _, index in chunk], widths[kind], groups[kind])
            losses.update(zip(chunk, runner.run(kind, layer, masks)))
    return Timed(losses, time.perf_counter() - wall, time.process_time() - cpu)


def largest_difference(fast: Timed, reference: Timed) -> float:
    """The largest relative difference of a raw MD or KL between the engines (0 where the reference's is 0)."""
    return max(abs(f - r) / abs(r) for c in reference.losses for f, r in zip(fast.losses[c], reference.losses[c]) if r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=[*DEFAULTS, *FAMILIES], default=["digit-scenes-segformer", "swin"])
    parser.add_argument("--samples", type=int, default=4, help="random images of a random-weight model")
    parser.add_argument("--group", type=int, default=64, help="neuron group size of a random-weight model")
    parser.add_argument("--head-stride", type=int, default=1)
    parser.add_argument("--neuron-stride", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_start, start = os.getloadavg()[0], time.perf_counter()
    table = []
    for name in args.models:
        model, batches, config, source = load(name, args.samples, args.group)
        candidates, total = subset(model, config.neuron_group_size, args.head_stride, args.neuron_stride)
        images = sum(len(b["pixel_values"]) for b in batches)
        side = "x".join(map(str, batches[0]["pixel_values"].shape[-2:]))
        print(f"{name}: {source}; {images} images of {side}, neurons in groups of {config.neuron_group_size}; "
              f"{len(candidates)} of its {total} candidates timed", flush=True)
        reference = score(ReferenceRunner, model, batches, config, candidates)
        fast = score(FastRunner, model, batches, config, candidates)
        wall, cpu = reference.wall / fast.wall, reference.cpu / fast.cpu
        print(f"  reference {reference.wall:.1f} s wall ({reference.cpu:.1f} s CPU), fast {fast.wall:.1f} s wall "
              f"({fast.cpu:.1f} s CPU): {wall:.2f}x wall, {cpu:.2f}x CPU", flush=True)
        table.append(
            f"| {name} | {images} x {side} | {len(candidates)} of {total} | {reference.wall:.1f} ({reference.cpu:.1f}) "
            f"| {fast.wall:.1f} ({fast.cpu:.1f}) | {wall:.2f} | {cpu:.2f} | {largest_difference(fast, reference):.1e} |"
        )
    minutes = (time.perf_counter() - start) / 60
    print("\n".join([
        "",
        f"{args.threads} torch thread(s), torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPU cores, load average "
        f"{load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, {minutes:.0f} min in all.",
        "",
        "| model | calibration | candidates timed | reference s wall (CPU) | fast s wall (CPU) | speed-up wall | speed-up CPU "
        "| largest raw MD/KL difference |",
        "|---|---|---|---|---|---|---|---|",
        *table,
    ]))


if __name__ == "__main__":
    main()
