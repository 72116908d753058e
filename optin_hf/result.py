"""`PruningResult`: what describes a pruned model, carried by the model itself.

As optimum's GPTQ records `quantization_config` on the model it quantized, a model slimmed by
`OptinPruner.prune_model` (or loaded by `AutoOptinModel.from_pretrained`) carries its result, so
saving, pushing and the model card take the model alone and never need the pruner. `config.json`
keeps recording the per-layer counts and the repair (`model.config.optin`), derived from the result
by `record_optin` alone; the tensors live on the model object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import ArchAdapter, check_model, get_adapter
from .config import OptinConfig
from .least_squares import record
from .link_refit import link_tensors
from .masks import MASKS_NAME, PruningMasks, load_safetensors
from .reconstruct import (RECONSTRUCTION_NAME, Reconstruction, batchnorm_means, input_tensors, output_projection,
                          reader_tensors, refit_conv_tensors)

RESULT_ATTRIBUTE = "optin_result"


@dataclass
class PruningResult:
    """The masks a model was slimmed with, the settings used and the refit parameters.

    config: the settings of the run, with `seq_len` the MAC sequence length it counted at and
    `base_model_*` the dense model it pruned, where known (a Hub id or a local folder, its commit
    when it came from the Hub, its class); reconstruction: the refit output projections
    (None when `config.reconstruct == "none"`).
    """

    config: OptinConfig
    masks: PruningMasks
    reconstruction: Reconstruction | None = None

    @property
    def seq_len(self) -> float | None:
        return self.config.seq_len


def record_optin(config, masks: PruningMasks, reconstruct: str = "none") -> None:
    """Write `config.optin`, what config.json says of a slim model: its per-layer counts, its token schedule
    and its repair. The one writer of it, so that the copy in config.json never drifts from the result."""
    config.optin = {"heads_per_layer": masks.heads_per_layer(), "neurons_per_layer": masks.neurons_per_layer()}
    if masks.token_schedule is not None:
        config.optin["token_schedule"] = masks.tokens_per_layer()
    if masks.channel_mask is not None:
        config.optin["channels_per_group"] = list(masks.channels_per_group(get_adapter(config).channel_widths(config)))
    if reconstruct != "none":  # the saved weights are the refit ones
        config.optin["reconstruct"] = reconstruct


def attach_result(model: nn.Module, result: PruningResult) -> None:
    """Record `result` on the slim `model` (a plain attribute: deepcopy carries it, state_dict does not), and
    derive `model.config.optin` from it."""
    setattr(model, RESULT_ATTRIBUTE, result)
    record_optin(model.config, result.masks, result.config.reconstruct)


def pruning_result(model: nn.Module) -> PruningResult:
    """The result `model` carries; a clear error for a model optin-hf did not prune."""
    result = getattr(model, RESULT_ATTRIBUTE, None)
    if result is None or not getattr(model.config, "optin", None):
        raise ValueError(
            f"This {type(model).__name__} was not pruned by optin-hf: call OptinPruner.prune_model(model, ...) first, "
            "or load a pruned model with AutoOptinModel.from_pretrained(...)."
        )
    return result


def result_of_pruning(model: nn.Module, config: OptinConfig, masks: PruningMasks, seq_len: float | None,
                      reconstruction: Reconstruction | None) -> PruningResult:
    """The result of slimming `model` (in place: its name and class are still the dense model's).

    A base model set in `config` wins; otherwise the name from_pretrained gave `model`, and, for a Hub
    model, the commit it was read at.
    """
    name, revision = config.base_model_name_or_path, config.base_model_revision
    if name is None:
        name = getattr(model, "name_or_path", "") or None
        revision = revision or (getattr(model.config, "_commit_hash", None) if name else None)
    config = dataclasses.replace(
        config,
        seq_len=seq_len,
        base_model_name_or_path=name,
        base_model_revision=revision,
        base_model_class=config.base_model_class or type(model).__name__,
    )
    return PruningResult(config, masks, reconstruction)


def read_result(folder: str | Path, model: nn.Module, adapter: ArchAdapter | None = None) -> PruningResult:
    """The result of a checkpoint folder that `model` was just loaded from.

    A full checkpoint's weights hold the refit parameters: they are read back from the model as a
    "weights" reconstruction (a "batchnorm" one: the BatchNorm running means), so a loaded model can
    be saved again as masks only. `adapter`: the model's, where the caller has it.
    """
    folder = Path(folder)
    config = OptinConfig.from_pretrained(folder)
    masks = PruningMasks.load(folder / MASKS_NAME)
    reconstruction, saved = None, folder / RECONSTRUCTION_NAME
    if config.reconstruct != "none" and saved.is_file():
        reconstruction = Reconstruction(config.reconstruct, load_safetensors(saved, "reconstruction"), [])
    elif config.reconstruct == "batchnorm":
        reconstruction = Reconstruction("batchnorm", batchnorm_means(model, adapter), [])
    elif config.reconstruct != "none":
        reconstruction = Reconstruction("weights", _refit_tensors(model, adapter, config.reconstruct_inputs), [])
    return PruningResult(config, masks, reconstruction)


def _refit_tensors(model: nn.Module, adapter: ArchAdapter | None, inputs: bool) -> dict[str, torch.Tensor]:
    """Every tensor a "weights" reconstruction may have written, keyed as it keys them: each output projection's
    weight ([out, in]) and bias, a refit conv's weight and means, a ResNet's readers and classifier, the links
    (SegFormer), and with `inputs` (`reconstruct_inputs`) the input projections."""
    adapter = adapter or check_model(model)
    tensors = {}
    for i, layer in enumerate(adapter.layers_of(model)):
        for sublayer in adapter.refit_sublayers:
            proj = output_projection(adapter, layer, sublayer)
            record(tensors, f"layers.{i}.{sublayer}", proj.weight(), proj.bias())
        tensors.update(refit_conv_tensors(layer, i, adapter))  # ResNet's 3x3 conv and its BatchNorm's means
    tensors.update(reader_tensors(model, adapter))
    tensors.update(link_tensors(model, adapter))
    return {**tensors, **(input_tensors(model, adapter) if inputs else {})}
