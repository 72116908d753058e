"""Atomic checkpoint folders and strict safetensors weight loading."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .masks import load_safetensors

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `target` that replaces it only if the block succeeds.

    A failure (or a kill) leaves the old `target` untouched and no half-written folder that
    looks like a checkpoint.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load (possibly sharded) safetensors weights, refusing missing or unexpected keys."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"No {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {folder}: the slim weights are missing.")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_safetensors(folder / name, "model weights"))
    result = model.load_state_dict(state, strict=False)
    expected_missing = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in expected_missing]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {folder} do not match the pruned model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Were they saved from another model or masks?"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
