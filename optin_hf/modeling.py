"""`AutoOptinModel`: rebuild a slimmed model from a full slim checkpoint or a masks-only one, local or on the Hub."""

from __future__ import annotations

import os
from pathlib import Path

import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .checkpoint import MODEL_CONFIG_NAME, load_model_config, load_weights, restore_interrupted_save
from .config import CONFIG_NAME, OptinConfig
from .hub import download_base_model, download_checkpoint
from .masks import MASKS_NAME, PruningMasks
from .reconstruct import RECONSTRUCTION_NAME, load_reconstruction
from .result import attach_result, read_result
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
    reconstructed = (getattr(config, "optin", None) or {}).get("reconstruct")
    model = slim_model(model_class(config)(config), masks)
    if reconstructed:  # the saved weights are the refit ones; say so as the pruned model did
        model.config.optin["reconstruct"] = reconstructed
    return model


def _load_slim_checkpoint(folder: Path) -> nn.Module:
    model = build_slim(load_model_config(folder), PruningMasks.load(folder / MASKS_NAME))
    load_weights(model, folder)
    return model


def _load_from_base(folder: Path, source: str, token: str | bool | None, local_files_only: bool) -> nn.Module:
    """Download the base model named in optin_config.json at its recorded commit and slim it with the masks."""
    optin = OptinConfig.from_pretrained(folder)
    name, revision = optin.base_model_name_or_path, optin.base_model_revision
    if not name:
        raise ValueError(f"{source} is masks-only but its {CONFIG_NAME} names no base_model_name_or_path.")
    base = download_base_model(name, revision, source, token=token, local_files_only=local_files_only)
    config = AutoConfig.from_pretrained(base)
    if optin.base_model_class:
        config.architectures = [optin.base_model_class]  # the task head that was pruned, whatever the base names
    masks = PruningMasks.load(folder / MASKS_NAME)
    try:
        masks.check_fits(config)
    except ValueError as err:
        raise ValueError(
            f"The masks of {source} do not fit its base model {name!r} (revision {revision}): {err}"
        ) from err
    model = slim_model(model_class(config).from_pretrained(base, config=config, use_safetensors=True), masks)
    if optin.reconstruct != "none":
        if not (folder / RECONSTRUCTION_NAME).is_file():
            raise FileNotFoundError(
                f"{source} was reconstructed (reconstruct={optin.reconstruct!r} in {CONFIG_NAME}) but has no "
                f"{RECONSTRUCTION_NAME}: re-upload it, or share the full slim checkpoint (masks_only=False)."
            )
        load_reconstruction(model, folder / RECONSTRUCTION_NAME)
        model.config.optin["reconstruct"] = optin.reconstruct
    return model


class AutoOptinModel:
    """Loads pruned models, like `AutoModel` loads dense ones."""

    def __init__(self) -> None:
        raise OSError("AutoOptinModel is a loader: use AutoOptinModel.from_pretrained(repo_id_or_path).")

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> nn.Module:
        """Rebuild the slimmed model (with its task head), in eval mode, from a folder or a Hub repo.

        A full slim checkpoint loads on its own; a masks-only one downloads the base model it names, at the
        recorded commit, slims it and applies the refit parameters of a reconstructed model. `revision` picks the revision of `repo_id_or_path` on the Hub; `token` and
        `local_files_only` apply to every download (HF_HUB_OFFLINE=1 acts like local_files_only=True).
        """
        source = str(repo_id_or_path)
        restore_interrupted_save(source)  # a save killed mid-swap left the old folder hidden beside it
        if Path(source).is_dir():
            folder = Path(source)
        else:
            folder = download_checkpoint(source, revision, token=token, local_files_only=local_files_only)
        if not (folder / MASKS_NAME).is_file():
            raise FileNotFoundError(
                f"{source} has no {MASKS_NAME}: it is not an optin-hf checkpoint (written by OptinPruner.save or "
                "push_to_hub)."
            )
        if (folder / MODEL_CONFIG_NAME).is_file():
            model = _load_slim_checkpoint(folder)
        elif (folder / CONFIG_NAME).is_file():
            model = _load_from_base(folder, source, token, local_files_only)
        else:
            raise FileNotFoundError(
                f"{source} has {MASKS_NAME} but neither {MODEL_CONFIG_NAME} (a full slim checkpoint) nor {CONFIG_NAME} "
                "(a masks-only checkpoint naming its base model)."
            )
        model.config.name_or_path = source
        attach_result(model, read_result(folder, model))  # so it can be saved or pushed again
        return model.eval()
