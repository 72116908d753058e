"""`AutoOptinModel`: rebuild a slimmed model from a full slim checkpoint or a masks-only one, local or on the Hub."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Union

import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .arch import ArchAdapter, get_adapter
from .checkpoint import (
    MODEL_CONFIG_NAME, load_model_config, load_weights, restore_interrupted_save, weights_fingerprint
)
from .config import CONFIG_NAME, OptinConfig
from .hub import download_base_model, download_checkpoint
from .masks import MASKS_NAME, PruningMasks
from .reconstruct import RECONSTRUCTION_NAME, load_reconstruction
from .result import attach_result, read_result
from .slim import slim_model

DeviceMap = Union[str, int, torch.device, dict]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_class(config: PretrainedConfig) -> type:
    """The task class named by `config.architectures` (the bare encoder when none is named).

    Only a transformers model class built for this config's type is taken: the name comes from a downloaded file.
    """
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is type(config):
            return cls
    if config.architectures:
        raise ValueError(
            f"{config.architectures} names no transformers model class for a {config.model_type!r} config: "
            "the checkpoint's config.json (or base_model_class in optin_config.json) is damaged."
        )
    return transformers.AutoModel._model_mapping[type(config)]


def build_slim(config: PretrainedConfig, masks: PruningMasks, adapter: ArchAdapter | None = None) -> nn.Module:
    """The slim model that `masks` give, its parameters on the meta device (buffers are real): no dense model is
    ever allocated. Load weights into it with `checkpoint.load_weights`. `adapter`: the config's, where known."""
    adapter = adapter or get_adapter(config)
    masks.check_fits(config, adapter)
    with init_empty_weights():
        return slim_model(model_class(config)(config), masks, adapter)


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The asked dtype; None (or "auto") keeps the saved one. Checked before any file is read, so that an integer
    dtype (which the float weights cannot be cast to and run in) fails before the load, not after it."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(
        f"Unknown torch_dtype {value!r}: use one of {sorted(DTYPES)} (as a string or a torch.dtype), or 'auto' for the "
        "saved dtype."
    )


def _load_slim_checkpoint(
    folder: Path, source: str, torch_dtype: torch.dtype | None, attn_implementation: str | None
) -> tuple[nn.Module, ArchAdapter]:
    config = load_model_config(folder, source)  # refuses unsupported model types before anything is built
    masks = PruningMasks.load(folder / MASKS_NAME)
    adapter = get_adapter(config)
    config = adapter.dense_config(config, masks)  # a uniform LLM's config.json holds the slim sizes: slim the dense one
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = build_slim(config, masks, adapter)
    load_weights(model, folder)
    # The weights keep their saved dtype; float buffers made at build time follow them.
    dtype = torch_dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.to(dtype)
    model.config.dtype = dtype
    return model, adapter


def _check_fingerprint(base: Path, optin: OptinConfig, source: str) -> None:
    """Refuse a base folder whose weights are not the ones the masks were made on (a local base is recorded by its
    fingerprint, a Hub one by its commit)."""
    name = optin.base_model_name_or_path
    if optin.base_model_fingerprint is None:
        if optin.base_model_revision is None and Path(name).is_dir():
            warnings.warn(
                f"{source} records no fingerprint of the weights of its base model {name} (a checkpoint saved before "
                "optin-hf recorded one), so they are not checked: make sure that folder still holds the weights the "
                "masks were made on. Saving the loaded model again records one.",
                stacklevel=4,
            )
        return
    found = weights_fingerprint(base)
    if found != optin.base_model_fingerprint:
        raise ValueError(
            f"The base model {name} of {source} holds other weights than the ones its masks were made on (their "
            f"sha256 is {found[:12]}..., {CONFIG_NAME} records {optin.base_model_fingerprint[:12]}...): slimming "
            "it would give a different model. Pass the base the masks were made on (base_model=...), or prune "
            "this base again."
        )


def _load_from_base(
    folder: Path,
    source: str,
    base_model: nn.Module | str | os.PathLike | None,
    hub_kwargs: dict,
    torch_dtype: torch.dtype | None,
    attn_implementation: str | None,
) -> tuple[nn.Module, ArchAdapter]:
    """Slim the base model (the one named in optin_config.json at its recorded commit, or `base_model`) with the
    masks, and apply the refit parameters of a reconstructed model."""
    optin = OptinConfig.from_pretrained(folder)
    masks = PruningMasks.load(folder / MASKS_NAME)
    if isinstance(base_model, nn.Module):
        model, name = base_model, type(base_model).__name__
        if optin.base_model_class and name != optin.base_model_class:
            raise ValueError(
                f"The masks of {source} were made on a {optin.base_model_class}, and base_model is a {name}: "
                f"pass a {optin.base_model_class}."
            )
        adapter = get_adapter(model.config)
        masks.check_fits(model.config, adapter)
        if torch_dtype is not None:
            model.to(torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        name = str(base_model) if base_model is not None else optin.base_model_name_or_path
        if not name:
            raise ValueError(
                f"{source} is masks-only but its {CONFIG_NAME} names no base_model_name_or_path: pass base_model=..."
            )
        revision = optin.base_model_revision if name == optin.base_model_name_or_path else None
        # A local masks-only folder was made by the user, and base_model is the user's word; a Hub repo is neither.
        trusted = base_model is not None or Path(source).is_dir()
        base, config = download_base_model(name, revision, source, allow_local=trusted, **hub_kwargs)
        if name == optin.base_model_name_or_path:
            _check_fingerprint(base, optin, source)
        if optin.base_model_class:
            config.architectures = [optin.base_model_class]  # the task head that was pruned, whatever the base names
        adapter = get_adapter(config)
        try:
            masks.check_fits(config, adapter)
        except ValueError as err:
            raise ValueError(
                f"The masks of {source} do not fit its base model {name!r} (revision {revision}): {err}"
            ) from err
        model = model_class(config).from_pretrained(
            base,
            config=config,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch_dtype or "auto",
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    model = slim_model(model, masks, adapter)
    if optin.reconstruct != "none":
        if not (folder / RECONSTRUCTION_NAME).is_file():
            raise FileNotFoundError(
                f"{source} was reconstructed (reconstruct={optin.reconstruct!r} in {CONFIG_NAME}) but has no "
                f"{RECONSTRUCTION_NAME}: re-upload it, or share the full slim checkpoint (masks_only=False)."
            )
        load_reconstruction(model, folder / RECONSTRUCTION_NAME, adapter)
    return model, adapter


def _place(model: nn.Module, device_map: DeviceMap | None) -> nn.Module:
    """Move the loaded model as transformers' `device_map` would: one device, "auto" (accelerate spreads it over the
    accelerators, else CPU) or a dict of module name -> device (accelerate's dispatch)."""
    if device_map is None:
        return model
    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or [])
    if isinstance(device_map, dict):
        return dispatch_model(model, device_map)
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device_map {device_map!r}: use 'cpu', 'cuda:0', 'auto' or a dict.") from err
    return model.to(device)


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
        *,
        base_model: nn.Module | str | os.PathLike | None = None,
        torch_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: DeviceMap | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """Rebuild the slimmed model (with its task head), in eval mode, from a folder or a Hub repo.

        A full slim checkpoint is built at its slim shapes on the meta device and its safetensors weights assigned
        (no dense model is allocated). A masks-only one slims its base model: the one its optin_config.json names
        at the recorded commit (a Hub repo may only name a Hub id) or, in a local folder, with the recorded
        fingerprint of its weights; or `base_model`, a model instance (slimmed in place) or a folder or Hub id the
        caller trusts. `revision` picks the revision of `repo_id_or_path` on the Hub; `token` and
        `local_files_only` apply to every download (HF_HUB_OFFLINE=1 acts like local_files_only=True).
        `torch_dtype` (or `dtype`: float32, float16 or bfloat16) defaults to the dtype the weights were saved in;
        `device_map` and `attn_implementation` ("eager", "sdpa") work as in transformers. Only the supported
        architectures load, and no repository's own code ever runs.
        """
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree: give one of them.")
        target_dtype = _dtype(torch_dtype if torch_dtype is not None else dtype)
        hub_kwargs = {"token": token, "local_files_only": local_files_only}
        source = str(repo_id_or_path)
        restore_interrupted_save(source)  # a save killed mid-swap left the old folder hidden beside it
        if Path(source).is_dir():
            folder = Path(source)
        else:
            folder = download_checkpoint(source, revision, **hub_kwargs)
        if not (folder / MASKS_NAME).is_file():
            raise FileNotFoundError(
                f"{source} has no {MASKS_NAME}: it is not an optin-hf checkpoint (written by OptinPruner.save or "
                "push_to_hub)."
            )
        if (folder / MODEL_CONFIG_NAME).is_file():
            if base_model is not None:
                raise ValueError(f"{source} is a full slim checkpoint: it needs no base_model.")
            model, adapter = _load_slim_checkpoint(folder, source, target_dtype, attn_implementation)
        elif (folder / CONFIG_NAME).is_file():
            model, adapter = _load_from_base(folder, source, base_model, hub_kwargs, target_dtype, attn_implementation)
        else:
            raise FileNotFoundError(
                f"{source} has {MASKS_NAME} but neither {MODEL_CONFIG_NAME} (a full slim checkpoint) nor {CONFIG_NAME} "
                "(a masks-only checkpoint naming its base model)."
            )
        model.config.name_or_path = source
        result = read_result(folder, model, adapter)  # so it can be saved or pushed again
        # The fingerprint describes the base folder at one save; each masks-only save computes it anew.
        config = dataclasses.replace(result.config, base_model_fingerprint=None)
        attach_result(model, dataclasses.replace(result, config=config))
        return _place(model, device_map).eval()
