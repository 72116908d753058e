"""Is the scoring time printed before scoring (`optin_hf/engine/estimate.py`) within a factor of 2 of
the time scoring then takes, on every family?

Each family's tiny test model (`tests/tiny.py`, FAMILIES: random weights, which do not change the
time) is scored with OPTIN on random calibration data, its neurons scored one by one, on the engine
the pruner picks for it (the fast one where the family declares it, else the reference); the run's
own estimate (`OptinPruner.timings["estimated_scoring_s"]`, from one timed dense forward) is
compared with the time its scoring loops then take (every candidate's masked runs and losses; on a ResNet,
whose residual channels the default cuts, also one masked run per channel). `resnet-wide` (not a test family) is
the wide-stem ResNet of benchmarks/family_digits.py's `--family resnet-wide` (a 48-channel 7x7 stem, bottleneck
stages of 64 and 128 channels, two blocks each, one-channel 32x32 images, 240 residual channels) with random
weights, which do not change the time. The calibration size is picked per family so
that scoring takes about a second: long enough that the timers' resolution and a warm-up do not
dominate, short enough for the whole script to take a few minutes. Each family runs once untimed
(imports), then `--repeats` times (the median ratio is printed with the spread), with one torch thread.

`--clock cpu` (the default) reads both sides on the process's CPU clock: the estimate's timings
(`estimate._clock`) and the scoring loop's. With one thread that is the time each takes on an idle
core, whatever else the machine runs: on a shared machine the milliseconds the estimate times and
the seconds of scoring get different shares of the cores, and a wall-clock ratio measures that
share, not the cost model. `--clock wall` compares the estimate the pruner prints with the scoring's
wall time, as a user on an idle machine sees them.

`--streamed` loads each causal-LM family's model layer-streamed (`engine.streaming.load_streamed`, its decoder
layers offloaded to disk), where a forward also reads every layer's weights; `--variants` fixes how many candidates the
fast engine stacks in one forward (each stack reads each layer it runs once).

    PYTHONPATH=.:tests nice -n 10 python benchmarks/estimate_accuracy.py [--repeats 3] [--clock cpu] [--engine fast]
        [--families swin resnet] [--streamed --families llama qwen2] [--variants 4] [--samples 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.engine import estimate
from optin_hf.engine.run import engine_for
from optin_hf.engine.streaming import load_streamed
from optin_hf.importance import optin as optin_importance
from tiny import FAMILIES, VISION_SETTINGS


@dataclass
class Bench:
    """A model to score: `build()`, calibration `examples(n, seed)`, and the OptinConfig `settings` it is scored with."""

    build: Callable[[], nn.Module]
    examples: Callable[[int, int], list[dict[str, torch.Tensor]]]
    settings: dict


def wide_resnet() -> nn.Module:
    """benchmarks/family_digits.py's wide-stem ResNet (`train_wide_resnet`'s config), untrained."""
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=48, hidden_sizes=[64, 128], depths=[2, 2], layer_type="bottleneck",
                          num_labels=10, image_size=32)
    return ResNetForImageClassification(config).eval()


def digit_like(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(1, 32, 32, generator=g)} for _ in range(n)]


BENCHES = {**{name: Bench(f.build, f.examples, f.settings) for name, f in FAMILIES.items()},
           "resnet-wide": Bench(wide_resnet, digit_like, {**VISION_SETTINGS, "neuron_group_size": 8})}

# Calibration examples per family, so that the fast engine's scoring takes about a second on one idle thread (16 for a
# family not named). Mask2Former's takes 4 s at 8: at 4 the timed forward of a 4-image batch is mostly per-forward
# overhead of its decoders, which the estimate charges per image (its ratio was 2.2 there, 1.1 at 8 and at 16).
SAMPLES = {"bert": 48, "roberta": 48, "distilbert": 48, "vit": 48, "deit": 48, "swin": 24, "resnet": 32, "convnext": 32,
           "segformer": 16, "dinov2": 48, "mask2former": 8, "resnet-wide": 16}
FACTOR = 2.0


def streamed_copy(model: nn.Module, folder: Path) -> nn.Module:
    """`model` saved under `folder` and loaded back layer-streamed (`load_streamed`: its decoder layers offloaded to
    disk, read for each forward)."""
    model.save_pretrained(folder / "model")
    return load_streamed(folder / "model", offload_folder=folder / "offload", attn_implementation="eager")


def measure(name: str, samples: int, clock, engine: str, streamed: bool = False,
            variants: int | None = None) -> tuple[str, int, float, float]:
    """(engine, candidates, estimated s, measured s) of one OPTIN scoring run of family `name`, both on `clock`;
    `streamed`: the model layer-streamed from disk; `variants`: the fast engine's candidates per forward (None: auto)."""
    family = BENCHES[name]
    model = family.build()
    if streamed:
        folder = tempfile.TemporaryDirectory()
        model = streamed_copy(model, Path(folder.name))
    config = OptinConfig(**{**family.settings, "num_samples": samples, "batch_size": min(samples, 16), "neuron_group_size": 1,
                            "reconstruct": "none", "engine": engine, "variants_per_batch": variants})
    pruner = OptinPruner(config)
    spent: list[float] = []
    loops = {name: getattr(optin_importance, name) for name in ("compute_raw_losses", "residual_channel_scores")}
    estimate_clock = estimate._clock

    def timed(loop):  # a scoring loop: every candidate's (or residual channel's) masked runs and losses
        def run(*args, **kwargs):
            start = clock()
            try:
                return loop(*args, **kwargs)
            finally:
                spent.append(clock() - start)

        return run

    for loop_name, loop in loops.items():
        setattr(optin_importance, loop_name, timed(loop))
    estimate._clock = lambda device: clock()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference engine's fallback warning, once per run
            pruner.compute_scores(model, family.examples(samples, 1))
    finally:
        for loop_name, loop in loops.items():
            setattr(optin_importance, loop_name, loop)
        estimate._clock = estimate_clock
    engine = engine_for(model, check_model(model), pruner.config)
    return engine, pruner.plan.num_candidates, pruner.timings["estimated_scoring_s"], sum(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(BENCHES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--engine", choices=["fast", "reference"], default="fast",
                        help="the engine asked for (a family without the fast engine runs the reference)")
    parser.add_argument("--streamed", action="store_true",
                        help="score the causal-LM families layer-streamed from disk (load_streamed)")
    parser.add_argument("--variants", type=int, default=None, help="the fast engine's variants_per_batch (default: auto)")
    parser.add_argument("--samples", type=int, default=None, help="calibration examples (default: SAMPLES, per family)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"{args.clock} clock, one torch thread, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"ratio = estimate / measured, median of {args.repeats} (range)")
    print(f"{'family':<12} {'engine':<10} {'cands':>6} {'estimate s':>11} {'measured s':>11} {'ratio':>6}")
    outside = []
    for name in args.families:
        samples = args.samples or SAMPLES.get(name, 16)
        options = (clock, args.engine, args.streamed, args.variants)
        measure(name, samples, *options)  # a warm-up: the family's first run pays its imports and the allocator's growth
        runs = [measure(name, samples, *options) for _ in range(args.repeats)]
        engine, candidates = runs[0][:2]
        ratios = sorted(estimated / measured for _, _, estimated, measured in runs)
        ratio = statistics.median(ratios)
        print(f"{name:<12} {engine:<10} {candidates:>6} {statistics.median(r[2] for r in runs):>11.2f} "
              f"{statistics.median(r[3] for r in runs):>11.2f} {ratio:>6.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
        if not 1 / FACTOR <= ratio <= FACTOR:
            outside.append(name)
    print(f"load average {os.getloadavg()[0]:.1f}; outside a factor of {FACTOR:g}: {', '.join(outside) or 'none'}")


if __name__ == "__main__":
    main()
