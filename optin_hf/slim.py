"""Physical slimming: smaller Linear layers so that a pruned model really runs faster."""

from __future__ import annotations

import torch
from torch import nn

from .arch import EmptyAttention, check_model, get_submodule, set_submodule
from .masks import PruningMasks, check_masks
from .tokens import install_token_merging


def _select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0, outputs) or columns (dim=1, inputs) `index`."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    # A 1x1 meta Linear re-dimensioned: no wasted (or zero-size, warning) random init.
    new = nn.Linear(1, 1, bias=linear.bias is not None, device="meta")
    new.out_features, new.in_features = weight.shape
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, index) if dim == 0 else bias).clone(), requires_grad=linear.bias.requires_grad)
    return new


@torch.no_grad()
def slim_model(model: nn.Module, masks: PruningMasks) -> nn.Module:
    """Remove the masked heads and neurons from a dense model, in place; returns the model.

    A layer left with no head keeps only its attention output bias; one left with no neuron
    keeps only the FFN output bias. A token schedule in the masks installs token merging
    (`tokens.TokenMerging`). The kept counts are written to `config.optin`.
    """
    adapter = check_model(model)
    check_masks(masks, "slim_model")
    masks.check_fits(model.config)
    head_dim = adapter.head_dim(model.config)
    for i, layer in enumerate(adapter.layers_of(model)):
        heads = masks.head_mask[i].nonzero().flatten()
        rows = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        out = _select_linear(get_submodule(layer, adapter.attn_out), rows, dim=1)
        set_submodule(layer, adapter.attn_out, out)
        if len(heads) == 0:
            inside = adapter.attn_out.removeprefix(adapter.attn_core + ".") if adapter.out_inside_core else None
            set_submodule(layer, adapter.attn_core, EmptyAttention(out, inside) if inside else EmptyAttention())
        else:
            for path in (adapter.query, adapter.key, adapter.value):
                set_submodule(layer, path, _select_linear(get_submodule(layer, path), rows, dim=0))
            core = get_submodule(layer, adapter.attn_core)
            for attr in adapter.head_count_attrs:
                setattr(core, attr, len(heads))
            if adapter.all_head_size_attr:
                setattr(core, adapter.all_head_size_attr, len(rows))
        neurons = masks.neuron_mask[i].nonzero().flatten()
        set_submodule(layer, adapter.ffn_up, _select_linear(get_submodule(layer, adapter.ffn_up), neurons, dim=0))
        set_submodule(layer, adapter.ffn_down, _select_linear(get_submodule(layer, adapter.ffn_down), neurons, dim=1))
    model.config.optin = {"heads_per_layer": masks.heads_per_layer(), "neurons_per_layer": masks.neurons_per_layer()}
    if masks.token_schedule is not None:
        install_token_merging(model, adapter, masks.tokens_per_layer())
        model.config.optin["token_schedule"] = masks.tokens_per_layer()
    return model
