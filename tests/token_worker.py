"""Runs the token candidates of a tiny ViT, as a separate program: for the distributed test of
tests/test_token_losses.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 token_worker.py OUT.safetensors CHECKPOINT_DIR
The main process writes the raw MD and KL to OUT; every process writes its checkpoint file.
"""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from tiny import tiny_model

from optin_hf.arch import get_adapter
from optin_hf.engine.token_losses import capture_token_grams, reference_token_losses


def token_batches() -> list[dict[str, torch.Tensor]]:
    """The calibration batches of the token tests (shared with the in-process runs)."""
    g = torch.Generator().manual_seed(3)
    return [{"pixel_values": torch.randn(3, 3, 16, 16, generator=g)} for _ in range(2)]


def main() -> None:
    out, checkpoint_dir = sys.argv[1:3]
    model = tiny_model("vit")
    adapter = get_adapter(model)
    batches = token_batches()
    raw = reference_token_losses(model, adapter, batches, capture_token_grams(model, adapter, batches), 4.0, checkpoint_dir=checkpoint_dir)
    state = PartialState()
    if state.is_main_process:
        save_file({"md": raw.md, "kl": raw.kl}, out)
    # A process group left to the interpreter's exit can abort in gloo's threads ("terminate called without an
    # active exception"): end it once every process is done, as a launched program should.
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
