"""What the model-dependent defaults of `OptinConfig` mean for one model: `allocation="auto"`, `prune_channels=None`
and `reconstruct="auto"`. One place decides them, so the pruner (`OptinPruner._resolve_repair`) and the recipe search's
candidates (`recipe_search.candidates`) agree: each candidate records the repair its pruner then runs."""

from __future__ import annotations

import dataclasses

from .arch import ArchAdapter, require
from .channel_search import channels_by_default
from .config import OptinConfig

# The most layers a model may have for `allocation="auto"` to be the refit's where it is the family's own (SegFormer-b0
# and b1 have 8): it slims and refits the whole model layers x kinds x 4 times (ConvNeXt-T's 18 blocks: 72 refits).
MAX_REFIT_ALLOCATION_LAYERS = 8


def resolve_defaults(config: OptinConfig, adapter: ArchAdapter, model_config, offloaded: bool = False) -> OptinConfig:
    """`config` as a pruner runs it on a model of `model_config` (`adapter`'s family; `offloaded`: its weights
    streamed): `prune_channels=None` becomes whether residual channels are cut (`channels_by_default`), then
    `reconstruct="auto"` the family's strongest repair for those settings: its first declared one
    (`Capabilities.auto_repair`; a refit where the settings need one: `_needs_refit`), except that where residual
    channels are cut it is the refit ("weights") where declared: the refit rebuilds the convs that read the cut
    channels, and the BatchNorm means alone leave more of the cut's loss (benchmarks/RESULTS.md, "Coupled residual
    channels with the consumer refit"); and the refit where input projections or a ResNet's readers are to be refit too (`reconstruct_inputs`,
    `reconstruct_readers`).
    `allocation="auto"` is resolved first, to the family's own (`Capabilities.allocation`) unless the settings rule a
    per-layer allocation out (`auto_allocation`).
    Raises where the settings need a refit, or input projections or readers refit, and the family declares none."""
    c = config
    if c.allocation == "auto":
        c = dataclasses.replace(c, allocation=auto_allocation(c, adapter, model_config, offloaded))
    if c.prune_channels is None:
        c = dataclasses.replace(c, prune_channels=channels_by_default(c, adapter, model_config, offloaded))
    if c.reconstruct_inputs:
        require(adapter, "inputs", model_config.model_type)
    if c.reconstruct_readers:
        require(adapter, "readers", model_config.model_type)
    if c.reconstruct != "auto":
        return c
    needs = _needs_refit(c)
    mode = adapter.capabilities.auto_repair(refit=needs is not None)
    if (c.prune_channels or c.reconstruct_inputs or c.reconstruct_readers) and adapter.supports("weights"):
        mode = "weights"
    if needs is not None and mode == "none":
        raise ValueError(f"{needs}, and the {model_config.model_type} adapter declares no refit (it supports: "
                         f"{', '.join(adapter.capabilities.supported())}): {_WITHOUT_REFIT[needs.split('=')[0]]}.")
    return dataclasses.replace(c, reconstruct=mode)


def auto_allocation(config: OptinConfig, adapter: ArchAdapter, model_config, offloaded: bool = False) -> str:
    """What `allocation="auto"` counts units per layer by: the family's own allocation (`Capabilities.allocation`), or
    the scores' budget search where the settings rule a per-layer allocation out (`OptinConfig.counts_per_layer`) or
    the model's layers are offloaded (a per-layer allocation runs the model in memory); where the fluctuation has no
    neurons to spread; and where the refit allocation has no refit to measure by (a named repair that is not one, as
    `OptinConfig` refuses for a named "refit") or the model has more than `MAX_REFIT_ALLOCATION_LAYERS` layers (it
    slims and refits the whole model layers x kinds x 4 times).
    Without calibration data the pruner falls back to the scores too (`OptinPruner.compute_masks`)."""
    own = adapter.capabilities.allocation
    if not config.counts_per_layer() or offloaded:
        return "scores"
    if own == "fluctuation" and not config.prune_neurons:
        return "scores"
    if own == "refit" and (config.reconstruct in ("none", "batchnorm")
                           or len(adapter.layer_geometry(model_config)) > MAX_REFIT_ALLOCATION_LAYERS):
        return "scores"
    return own


# the setting that needs a refit -> how to do without one
_WITHOUT_REFIT = {"prune_steps": "set prune_steps=1", "selection": "set selection='scores'",
                  "allocation": "set allocation='scores'"}


def _needs_refit(config: OptinConfig) -> str | None:
    """Why `config`'s settings need a refit (re-scoring a refit model between steps, choosing units or counting them
    per layer by the refit's error), or None."""
    if config.prune_steps > 1:
        return f"prune_steps={config.prune_steps} re-scores a refit model between steps"
    if config.selection == "refit":
        return "selection='refit' chooses units by the error left after the refit"
    if config.allocation == "refit":
        return "allocation='refit' counts units per layer by the error left after the refit"
    return None
