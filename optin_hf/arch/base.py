"""`ArchAdapter`: where one model family keeps its heads, FFN neurons and recorded features.

Everything architecture-specific is data here (dotted module paths); the rest of optin-hf
reads models only through an adapter, so adding a family means adding one adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# (layer, input of the attention output projection, layer input) -> input of the FFN block
FinishAttention = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (layer, input of the FFN block) -> layer output
FeedForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# (layer, output of the FFN down projection, input of the FFN block) -> layer output
FinishFeedForward = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (task model, last layer's output hidden states) -> logits
Classifier = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _no_logits(model: nn.Module, hidden: torch.Tensor) -> None:
    return None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent), name, module)


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one architecture family.

    `layers` is relative to `model.base_model`; the other paths are relative to one layer.
    `ffn_input` is the module whose first input is the FFN sublayer's input, which is also the
    residual that sublayer adds to (the attention sublayer's residual is the layer input).
    `attn_core` is the module that computes the heads; a layer that keeps no head gets it
    replaced by `EmptyAttention`. When `attn_out` lies inside `attn_core`, the replacement
    keeps that projection so the layer still adds its bias.

    The fast engine runs a layer in pieces so it can start inside it: `finish_attention`
    (from the heads' concatenated output to the FFN input) and `feed_forward` (from the FFN
    input to the layer output); `finish_feed_forward` (from the down projection's output to
    the layer output), optional, lets it score a neuron without rerunning its FFN (the down
    projection is linear); `classifiers` maps a task model's class name to the part of its
    forward after the last layer.
    """

    model_types: tuple[str, ...]
    layers: str
    attn_core: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_up: str
    ffn_down: str
    ffn_input: str
    feature: str
    head_count_attrs: tuple[str, ...]
    all_head_size_attr: str | None = None
    patch_embedding: str | None = None
    num_prefix_tokens: int = 1
    finish_attention: FinishAttention | None = None
    feed_forward: FeedForward | None = None
    finish_feed_forward: FinishFeedForward | None = None
    classifiers: Mapping[str, Classifier] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_vision(self) -> bool:
        return self.patch_embedding is not None

    @property
    def out_inside_core(self) -> bool:
        return self.attn_out.startswith(self.attn_core + ".")

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model.base_model, self.layers)

    def num_heads(self, config) -> int:
        return int(config.num_attention_heads)

    def head_dim(self, config) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def intermediate_size(self, config) -> int:
        return int(getattr(config, "intermediate_size", None) or config.hidden_dim)

    def kept_heads(self, layer: nn.Module, config) -> int:
        """Heads a (possibly slimmed) layer runs, read off its query projection."""
        if isinstance(get_submodule(layer, self.attn_core), EmptyAttention):
            return 0
        return get_submodule(layer, self.query).out_features // self.head_dim(config)

    def kept_neurons(self, layer: nn.Module) -> int:
        return get_submodule(layer, self.ffn_up).out_features

    def classifier_of(self, model: nn.Module) -> Classifier | None:
        """How `model` turns its last hidden states into logits; None if unknown here.

        A bare encoder (`model.base_model is model`) has no logits, so it needs none.
        """
        if model.base_model is model:
            return _no_logits
        return self.classifiers.get(type(model).__name__)

    def default_seq_len(self, config) -> int | None:
        """Tokens per image for vision models (patches + prefix tokens); None for text."""
        if not self.is_vision:
            return None
        return (config.image_size // config.patch_size) ** 2 + self.num_prefix_tokens

    def patch_embedding_macs(self, model: nn.Module) -> int:
        if self.patch_embedding is None:
            return 0
        conv = get_submodule(model.base_model, self.patch_embedding)
        kernel = conv.weight[0].numel()  # in_channels * P * P
        num_patches = (model.config.image_size // model.config.patch_size) ** 2
        return num_patches * kernel * conv.out_channels


class EmptyAttention(nn.Module):
    """Stands in for the attention of a layer that keeps no head.

    It returns what the layer's attention would with zero heads: nothing from the heads, so
    only the output projection's bias (when that projection lives inside the attention, where
    it stays under its own name, so `ArchAdapter.attn_out` still finds it).
    """

    def __init__(self, out_proj: nn.Linear | None = None, name: str = "out_proj"):
        super().__init__()
        self.out_name = name if out_proj is not None else None
        if out_proj is not None:
            self.add_module(name, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return (getattr(self, self.out_name)(empty) if self.out_name else empty), None
