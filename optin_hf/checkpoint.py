"""Atomic checkpoint folders, the slim model's config.json, and strict safetensors weight loading."""

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

from .arch import ADAPTERS
from .config import OptinConfig
from .importance.scores import SCORES_NAME, ImportanceScores
from .masks import MASKS_NAME, PruningMasks, load_safetensors
from .reconstruct import RECONSTRUCTION_NAME, Reconstruction, save_reconstruction

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
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
    model: nn.Module | None,
    config: OptinConfig,
    masks: PruningMasks,
    scores: ImportanceScores | None,
    max_shard_size: int | str,
    reconstruction: Reconstruction | None = None,
) -> None:
    """Fill `folder`: the slim model's config and weights (skipped when `model` is None: a masks-only
    checkpoint), `optin_config.json`, the masks and the scores when known. A masks-only checkpoint
    of a reconstructed model also holds the refit parameters, which full weights already contain."""
    if model is not None:
        # Our own key names: save_pretrained would rename keys to legacy checkpoint layouts.
        model.config.architectures = [type(model).__name__]  # the task head to rebuild
        save_model_config(model.config, folder)
        save_torch_state_dict(model.state_dict(), folder, max_shard_size=max_shard_size)
    config.save_pretrained(folder)
    masks.save(folder / MASKS_NAME)
    if model is None and reconstruction is not None:
        save_reconstruction(reconstruction, folder / RECONSTRUCTION_NAME)
    if scores is not None:
        scores.save(folder / SCORES_NAME)


def save_model_config(config: PretrainedConfig, folder: str | os.PathLike) -> None:
    """Write config.json so that optin-hf reads it and plain transformers refuses it with a readable message."""
    config.save_pretrained(folder)
    path = Path(folder) / MODEL_CONFIG_NAME
    values = json.loads(path.read_text())
    values["transformers_weights"] = NOT_FOR_TRANSFORMERS
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def load_supported_config(name_or_path: str | os.PathLike, source: str | None = None, **hub_kwargs) -> PretrainedConfig:
    """The config of a model optin-hf supports, from a folder or a Hub id.

    config.json is read as plain JSON and its `model_type` checked before transformers resolves any class, so a repo
    with its own code (`auto_map`) is refused, not imported or run; `trust_remote_code=False` backs that up.
    """
    values, _ = PretrainedConfig.get_config_dict(name_or_path, **hub_kwargs)
    model_type = values.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{source or name_or_path} is a {model_type!r} model: optin-hf supports model_type {sorted(ADAPTERS)} "
            "only, and never runs a repository's own code (trust_remote_code)."
        )
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)


def load_model_config(folder: str | os.PathLike, source: str | None = None) -> PretrainedConfig:
    """The slim model's config, without the guard written by `save_model_config`."""
    config = load_supported_config(folder, source)
    if "transformers_weights" in config:
        delattr(config, "transformers_weights")
    return config


def _shard_names(folder: Path) -> list[str]:
    """The weight files of `folder`; an index may only name plain file names inside it."""
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        if (folder / WEIGHTS_NAME).is_file():
            return [WEIGHTS_NAME]
        raise FileNotFoundError(f"No {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {folder}: the slim weights are missing.")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is not a valid weights index (no weight_map of file names): {err}") from err
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or "\\" in name or Path(name).name != name:
            raise ValueError(
                f"{index} names the weights file {name!r}, which is not a plain file name in {folder}: optin-hf reads "
                "weights only from the checkpoint folder itself. Re-save or re-download the checkpoint."
            )
    return sorted(names)


def load_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load (possibly sharded) safetensors weights into `model`, which may be built on the meta device.

    The tensors are assigned, not copied, so they keep their saved dtype; missing or unexpected keys, shapes that
    differ from the ones the masks built, and parameters still on the meta device afterwards are refused.
    """
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for name in _shard_names(folder):
        state.update(load_safetensors(folder / name, "model weights"))
    built = model.state_dict()
    wrong = [
        f"{key} is {list(value.shape)} in the weights, {list(built[key].shape)} from the masks"
        for key, value in state.items()
        if key in built and value.shape != built[key].shape
    ]
    if wrong:
        raise ValueError(
            f"The weights in {folder} do not fit the model that its {MASKS_NAME} describes: {'; '.join(wrong[:3])}"
            f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}. The masks file belongs to another pruned "
            "model: put back the masks saved with these weights, or save the pruned model again."
        )
    result = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in expected_missing]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {folder} do not match the pruned model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Were they saved from another model or masks?"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise ValueError(f"The weights in {folder} leave {empty[:5]} unset: were they saved from another model?")
