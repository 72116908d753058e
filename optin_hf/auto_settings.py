"""What the model-dependent defaults of `OptinConfig` mean for one model: `prune_channels=None` and
`reconstruct="auto"`. One place decides them, so the pruner (`OptinPruner._resolve_repair`) and the recipe search's
candidates (`recipe_search.candidates`) agree: each candidate records the repair its pruner then runs."""

from __future__ import annotations

import dataclasses

from .arch import ArchAdapter
from .channel_search import channels_by_default
from .config import OptinConfig


def resolve_defaults(config: OptinConfig, adapter: ArchAdapter, model_config, offloaded: bool = False) -> OptinConfig:
    """`config` as a pruner runs it on a model of `model_config` (`adapter`'s family; `offloaded`: its weights
    streamed): `prune_channels=None` becomes whether residual channels are cut (`channels_by_default`), then
    `reconstruct="auto"` the family's strongest repair for those settings: its first declared one
    (`Capabilities.auto_repair`, a refit where the model is re-scored between steps or the refit chooses the units or
    counts them per layer),
    except that where residual channels are cut it is the refit ("weights") where declared: the refit rebuilds the convs
    that read the cut channels, and the BatchNorm means alone leave more of the cut's loss (benchmarks/RESULTS.md,
    "Coupled residual channels with the consumer refit")."""
    c = config
    if c.prune_channels is None:
        c = dataclasses.replace(c, prune_channels=channels_by_default(c, adapter, model_config, offloaded))
    if c.reconstruct == "auto":
        # re-scoring a refit model, choosing units or counting them by the refit's error all need a refit
        mode = adapter.capabilities.auto_repair(refit=c.prune_steps > 1 or c.selection == "refit" or c.allocation == "refit")
        if c.prune_channels and adapter.supports("weights"):
            mode = "weights"
        c = dataclasses.replace(c, reconstruct=mode)
    return c
