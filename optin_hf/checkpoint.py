"""Saving a pruned model (atomic checkpoint folders, the slim model's config.json) and strict safetensors weight loading."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .importance.scores import SCORES_NAME, ImportanceScores
from .masks import MASKS_NAME, load_safetensors
from .reconstruct import RECONSTRUCTION_NAME, save_reconstruction
from .result import PruningResult, pruning_result

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"
# transformers reads `transformers_weights` in config.json as the name of the weights file and, before it builds the
# model or downloads a weight, refuses a name that is not a safetensors file, quoting it. Without this, plain
# `from_pretrained` would build the dense shapes and stop on a wall of size-mismatch reports.
NOT_FOR_TRANSFORMERS = (
    "this is an optin-hf pruned checkpoint with per-layer head and neuron counts that transformers cannot build; "
    "load it with optin_hf.AutoOptinModel.from_pretrained(...) (pip install optin-hf)"
)


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


def write_checkpoint(
    folder: Path,
    model: nn.Module,
    result: PruningResult,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Fill `folder` with the pruned `model` as `result` describes it: the slim model's config and weights
    (skipped when `masks_only`), `optin_config.json`, the masks and the scores when given. A masks-only
    checkpoint of a reconstructed model also holds the refit parameters, which full weights already contain."""
    if not masks_only:
        # Our own key names: save_pretrained would rename keys to legacy checkpoint layouts.
        model.config.architectures = [type(model).__name__]  # the task head to rebuild
        save_model_config(model.config, folder)
        save_torch_state_dict(model.state_dict(), folder, max_shard_size=max_shard_size)
    result.config.save_pretrained(folder)
    result.masks.save(folder / MASKS_NAME)
    if masks_only and result.reconstruction is not None:
        save_reconstruction(result.reconstruction, folder / RECONSTRUCTION_NAME)
    if scores is not None:
        scores.save(folder / SCORES_NAME)


def save_pruned(
    model: nn.Module,
    save_dir: str | os.PathLike,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Write the pruned `model` (the result it carries) to `save_dir` atomically: the slim weights, sharded
    above `max_shard_size` (bytes or "5GB"), or only the masks naming the base model (`masks_only`)."""
    result = pruning_result(model)
    if masks_only and not result.config.base_model_name_or_path:
        raise ValueError(
            "A masks-only checkpoint rebuilds the model from its base, and this model's base is unknown (it was "
            "built from a config): set OptinConfig(base_model_name_or_path=...) before pruning, or save the full "
            "slim checkpoint (masks_only=False)."
        )
    with atomic_directory(save_dir) as tmp:
        write_checkpoint(tmp, model, result, scores=scores, masks_only=masks_only, max_shard_size=max_shard_size)


def save_model_config(config: PretrainedConfig, folder: str | os.PathLike) -> None:
    """Write config.json so that optin-hf reads it and plain transformers refuses it with a readable message."""
    config.save_pretrained(folder)
    path = Path(folder) / MODEL_CONFIG_NAME
    values = json.loads(path.read_text())
    values["transformers_weights"] = NOT_FOR_TRANSFORMERS
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def load_model_config(folder: str | os.PathLike) -> PretrainedConfig:
    """The slim model's config, without the guard written by `save_model_config`."""
    config = AutoConfig.from_pretrained(folder)
    if "transformers_weights" in config:
        delattr(config, "transformers_weights")
    return config


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
