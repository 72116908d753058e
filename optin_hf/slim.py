"""Physical slimming: smaller layers so that a pruned model really runs faster.

What each head and FFN neuron owns, and how to cut it out, is the adapter's (`slim_heads`,
`slim_neurons`); this module only walks the layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter, check_model
from .masks import PruningMasks, check_masks
from .result import record_optin
from .tokens import install_token_merging


@torch.no_grad()
def slim_model(model: nn.Module, masks: PruningMasks, adapter: ArchAdapter | None = None) -> nn.Module:
    """Remove the masked heads and neurons from a dense model, in place; returns the model.

    A layer left with no head keeps only its attention output bias; one left with no neuron
    keeps only the FFN output bias. A token schedule in the masks installs token merging
    (`tokens.TokenMerging`). The kept counts are written to `config.optin`. `adapter` is the
    model's adapter where the caller has it.
    """
    adapter = adapter or check_model(model)
    check_masks(masks, "slim_model")
    masks.check_fits(model.config, adapter)
    for i, layer in enumerate(adapter.layers_of(model)):
        adapter.slim_heads(layer, masks.head_mask[i].nonzero().flatten(), model.config)
        adapter.slim_neurons(layer, masks.neuron_mask[i].nonzero().flatten(), model.config)
    if masks.channel_mask is not None:  # residual channels, tied across layers (`OptinConfig.prune_channels`)
        adapter.slim_channels(model, masks.channel_keeps(adapter.channel_widths(model.config)))
    if masks.token_schedule is not None:
        install_token_merging(model, adapter, masks.tokens_per_layer())
    record_optin(model.config, masks)  # the repair, if any, is added with the result (`result.attach_result`)
    return model
