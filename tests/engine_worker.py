"""Scores a tiny BERT with the fast engine, as a separate program: for the distributed and
kill-and-resume tests of tests/test_engine.py.

Usage: python engine_worker.py OUT.safetensors [--checkpoint-dir DIR] [--variants N] [--delay SECONDS]
(also under `python -m torch.distributed.run --nproc_per_node 2`). The main process writes
the scores to OUT; --delay sleeps after each checkpoint write so a test can kill the run midway.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import PartialState
from tiny import calibration, tiny_model

from optin_hf import OptinConfig, OptinPruner
from optin_hf.engine.resume import LossCheckpoint

WORKER_CONFIG = dict(importance="optin", md_tokens=40, num_samples=12, batch_size=5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--variants", type=int)
    args = parser.parse_args()
    if args.delay:
        save = LossCheckpoint.save

        def slow_save(self, tensors):
            save(self, tensors)
            time.sleep(args.delay)

        LossCheckpoint.save = slow_save
    config = OptinConfig(**WORKER_CONFIG, checkpoint_dir=args.checkpoint_dir, variants_per_batch=args.variants)
    scores = OptinPruner(config).compute_scores(tiny_model("bert"), calibration("bert"))
    state = PartialState()
    if state.is_main_process:
        scores.save(args.out)
    state.wait_for_everyone()
    state.destroy_process_group()  # as tests/token_worker.py: no process group left to the interpreter's exit


if __name__ == "__main__":
    main()
