"""`AutoOptinModel`: rebuild a slimmed model from a folder written by `OptinPruner.save`."""

from __future__ import annotations

import os
from pathlib import Path

import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .checkpoint import load_weights
from .masks import MASKS_NAME, PruningMasks
from .slim import slim_model


def model_class(config: PretrainedConfig) -> type:
    """The task class named by `config.architectures` (the bare encoder when none is named)."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def build_slim(config: PretrainedConfig, masks: PruningMasks) -> nn.Module:
    """An untrained model with the slim shapes that `masks` give."""
    masks.check_fits(config)
    model = model_class(config)(config)
    return slim_model(model, masks)


class AutoOptinModel:
    """Loads pruned models, like `AutoModel` loads dense ones."""

    def __init__(self) -> None:
        raise OSError("AutoOptinModel is a loader: use AutoOptinModel.from_pretrained(path).")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> nn.Module:
        """Rebuild the slimmed model (with its task head) saved in `path`, in eval mode."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} is not a folder written by OptinPruner.save.")
        if not (folder / MASKS_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {MASKS_NAME}: it is not an optin-hf checkpoint.")
        config = AutoConfig.from_pretrained(folder)
        model = build_slim(config, PruningMasks.load(folder / MASKS_NAME))
        load_weights(model, folder)
        return model.eval()
