"""Wall time of one Prune press in the Space, in-process, for embedded defaults (the model already trained and loaded).

A press as `space_app.app`'s Prune button runs it: score with the default's recipe as the Space caps it (first
press: no cached scores), allocate at the recipe's budget, slim, repair, measure dense and pruned on the first
test examples, and (a segmentation default) draw its panel. The load average is printed with each time: the issue
asks for under 2 minutes on a 2-core CPU.

    OMP_NUM_THREADS=1 python benchmarks/space_press.py [--defaults digits-resnet digit-scenes-segformer] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space_app"))
from app import SEGMENTATION_SCENES, SPACE_SETTINGS, SpaceApp, default_loaders  # noqa: E402

from optin_hf.tasks.task_data import SEGMENTATION  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defaults", nargs="+", default=["digits-resnet", "digit-scenes-segformer"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a 2-core Space: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = SpaceApp(default_loaders(), dict(SPACE_SETTINGS), Path(tempfile.mkdtemp()))
    for name in args.defaults:
        key, loader = app.resolve(name, "", "", "")
        task = app.task(key, loader)  # a default's one-time training / load is not part of a press
        budget = task.settings["mac_constraint"]
        start = time.perf_counter()
        result, cached, _ = app.prune(key, task, budget)
        pruned_s = time.perf_counter() - start
        measured = app.measure(key, task, result.model, cached.seq_len)
        if task.task == SEGMENTATION:
            app.segmentation_panel(task, result.model, 0, SEGMENTATION_SCENES)
        total = time.perf_counter() - start
        metric = measured.stats["pruned"].metrics
        print(f"{name} @{budget}: press {total:.1f} s (scoring {cached.seconds:.1f} s, prune {pruned_s:.1f} s), "
              f"{args.threads} torch threads, load average {os.getloadavg()[0]:.1f}; pruned {metric}", flush=True)


if __name__ == "__main__":
    main()
