"""Is the scoring-time estimate of a layer-streamed model (`optin_hf.engine.streaming.load_streamed`) within a factor
of 2 of the time scoring then takes, on the language-model default (SmolLM2-135M, 30 decoder layers of 13.5 MiB)?

A streamed forward reads each decoder layer's weights as it runs it. The estimate times one dense forward, each
layer's load apart from its compute (`estimate.time_dense`), and charges a layer's load once per forward that runs
it: a fast-engine stack of `variants_per_batch` candidates of one layer, over each batch. Printed beside it: the
estimate of the older cost model on the same timed forward, which charged every candidate the whole layer time,
load included (`--modes memory` runs the model held in memory instead, where the two are the same).

The recipe's scoring settings (recipes/smollm2-shakespeare.yaml, without its time budget and its refit selection)
with `--samples` windows, MLP channels in groups of `--group` and `--variants` candidates per forward, as
benchmarks/stream_memory.py runs them.
Both the estimate's timings and the scoring are read on the process CPU clock, with one torch thread (`--clock wall`:
the wall clock): on a shared machine the wall clock measures the share of the cores each part got. One run, seed 0.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/estimate_streamed.py [--samples 2] [--group 512] [--variants 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from optin_hf import OptinConfig, OptinPruner
from optin_hf.engine import estimate
from optin_hf.engine.streaming import load_streamed
from optin_hf.importance import optin as optin_importance
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.windows import calibration_windows

NAME = "shakespeare-smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2, help="calibration windows")
    parser.add_argument("--group", type=int, default=512, help="MLP channels per scored group")
    parser.add_argument("--variants", type=int, default=8, help="candidates stacked per forward")
    parser.add_argument("--modes", nargs="+", default=["streamed"], choices=["streamed", "memory"])
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    task = load_default(NAME)
    recipe = dataclasses.replace(default_recipe(NAME).optin, num_samples=args.samples, neuron_group_size=args.group)
    # scoring alone: the refit's choices, which a streamed model cannot run, come after it
    settings = {**recipe.to_dict(), "max_scoring_time": None, "variants_per_batch": args.variants, "selection": "scores",
                "allocation": "scores"}
    windows = calibration_windows(task.calibration, "text", task.processor, recipe.max_length, recipe.num_samples, recipe.seed)
    examples = [{"input_ids": w["input_ids"], "attention_mask": torch.ones_like(w["input_ids"])} for w in windows]
    print(f"{NAME}: {args.samples} windows of {recipe.max_length} tokens, MLP channels in groups of {args.group}, "
          f"{args.variants} variants per forward, one torch thread, {args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    print("| mode | candidates | estimate, load per candidate (old) | estimate (new) | measured | ratio old | ratio new |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="estimate-streamed-") as folder:
            if mode == "memory":
                model = AutoModelForCausalLM.from_pretrained(task.model_dir).eval()
            else:
                model = load_streamed(task.model_dir, offload_folder=Path(folder) / "offload")
            costs: list[tuple[tuple, dict]] = []
            spent: list[float] = []
            cost_of, estimate_clock, raw_losses = estimate.scoring_cost, estimate._clock, optin_importance.compute_raw_losses

            def kept(*cost_args, **cost_kwargs):  # the cost model's inputs, to price the older model on them
                costs.append((cost_args, cost_kwargs))
                return cost_of(*cost_args, **cost_kwargs)

            def timed(*loop_args, **loop_kwargs):  # the scoring loop: every candidate's masked runs and losses
                start = clock()
                try:
                    return raw_losses(*loop_args, **loop_kwargs)
                finally:
                    spent.append(clock() - start)

            estimate.scoring_cost, estimate._clock, optin_importance.compute_raw_losses = kept, lambda device: clock(), timed
            try:
                pruner = OptinPruner(OptinConfig.from_dict(settings))
                pruner.compute_scores(model, examples)
            finally:
                estimate.scoring_cost, estimate._clock, optin_importance.compute_raw_losses = cost_of, estimate_clock, raw_losses
            measured = sum(spent)
            (timing, *rest), options = costs[0]
            # the older model: each layer's time is its load and compute together, paid by every candidate
            loads = timing.loads or [0.0] * len(timing.layers)
            whole = dataclasses.replace(timing, layers=[a + b for a, b in zip(timing.layers, loads)], loads=[])
            old = cost_of(whole, *rest, **{**options, "variants": 1}).seconds(args.samples, args.group)
            new = pruner.plan.estimated_s
            print(f"| {mode} | {pruner.plan.num_candidates} | {old:.0f} s | {new:.0f} s | {measured:.0f} s | "
                  f"{old / measured:.2f} | {new / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
