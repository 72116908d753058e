"""What every decoder-only language model adapter shares (Llama, Mistral, Qwen2/3, GPT-2).

- MACs are counted per token (`count_macs(model, seq_len)`): every projection once per token,
  the LM head included (`fixed_macs`, no unit owns it), and the attention scores and context at
  a context of `seq_len` keys, which is what the eager and sdpa kernels compute for a window of
  `seq_len` tokens (the causal mask hides half of the score matrix; the kernels still compute it).
  One forward over `seq_len` tokens costs `seq_len` times this: torch's FLOP counter over that
  forward, divided by the tokens, gives the same number.
- The KL compares next-token distributions at every real token (`kl_outputs`: the logits
  [examples, positions, vocabulary], valid where `attention_mask` is 1).
- A layer that keeps no attention unit gets `CachedEmptyAttention`, which still writes a
  one-wide placeholder into the key/value cache: transformers reads the cached length off layer
  0 (positions, the causal mask's size), and a layer that never wrote would say 0.
- A uniform slim model (every layer keeps the same counts) is a standard config of its family
  (`standard_config`), which plain `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..losses import KLOutputs
from .base import ArchAdapter, EmptyAttention, get_submodule, set_submodule
from .projection import num_features


class CachedEmptyAttention(EmptyAttention):
    """The attention of a decoder layer that keeps no head: it adds only its output projection's
    bias (if any), and keeps the key/value cache as long as the other layers' (see the module docstring)
    with a [batch, 1, tokens, 1] zero placeholder, the least a cache layer can hold and still count tokens."""

    def __init__(self, out_proj: nn.Module, name: str, layer_idx: int):
        super().__init__(out_proj, name)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return super().forward(hidden_states)


class EmptyInputConv1D(Conv1D):
    """A `Conv1D` left with no input feature (a GPT-2 layer that keeps no head or no neuron): its
    output is its bias. Conv1D's own forward cannot flatten an empty input (`view(-1, 0)`)."""

    @classmethod
    def like(cls, conv: Conv1D) -> EmptyInputConv1D:
        new = cls(conv.nf, 0)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.nf) + self.bias


def lm_head_classifier(norm: str):
    """The part of a causal LM's forward after its last layer: the final norm (`norm`, a path under
    `model.base_model`) and the LM head. The logits come as [examples, vocabulary, positions], the
    layout `KLOutputs.of` reads (classes before positions, as a segmentation map's)."""

    def classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(get_submodule(model.base_model, norm)(hidden)).transpose(1, 2)

    return classify


def causal_kl_outputs(output, batch: Mapping[str, torch.Tensor]) -> KLOutputs | None:
    """Next-token logits [examples, positions, vocabulary] of every real token (valid = attention_mask)."""
    logits = getattr(output, "logits", None)
    if logits is None:
        return None
    mask = batch.get("attention_mask")
    valid = torch.ones(logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return KLOutputs(logits, valid.to(logits.device))


@dataclass(frozen=True)
class CausalLMAdapter(ArchAdapter):
    """A decoder-only language model: per-token MACs with the LM head fixed, next-token KL, and a
    cache-keeping empty attention. Subclasses give the geometry (slices, MAC formulas, configs)."""

    def kept_heads(self, layer: nn.Module, config) -> int:
        """Read off the output projection's input: a fused q|k|v projection (GPT-2) has 3x the features."""
        if isinstance(get_submodule(layer, self.attn_core), EmptyAttention):
            return 0
        return num_features(get_submodule(layer, self.attn_out), "in") // self.layer_head_dim(layer, config)

    def slim_heads(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        layer_idx = get_submodule(layer, self.attn_core).layer_idx
        super().slim_heads(layer, keep, config)
        if len(keep) == 0:  # keep the cache as long as the other layers'
            name = self.attn_out.removeprefix(self.attn_core + ".")
            out = empty_input_safe(get_submodule(layer, self.attn_out))
            set_submodule(layer, self.attn_core, CachedEmptyAttention(out, name, layer_idx))

    def slim_neurons(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        super().slim_neurons(layer, keep, config)
        if len(keep) == 0:
            set_submodule(layer, self.ffn_down, empty_input_safe(get_submodule(layer, self.ffn_down)))

    def kl_outputs(self, output, batch: Mapping[str, torch.Tensor]) -> KLOutputs | None:
        return causal_kl_outputs(output, batch)

    def fixed_macs(self, model: nn.Module, image_size=None) -> int:
        """Per token: the LM head (hidden x vocabulary), which no unit owns; 0 for a bare decoder."""
        head = model.get_output_embeddings() if model.base_model is not model else None
        return 0 if head is None else int(head.weight.shape[0] * head.weight.shape[1])

    def uniform_counts(self, masks) -> tuple[int, int] | None:
        """(units, neurons) every layer keeps, or None where layers differ or one keeps none of a kind."""
        heads, neurons = set(masks.heads_per_layer()), set(masks.neurons_per_layer())
        if len(heads) != 1 or len(neurons) != 1 or 0 in heads | neurons:
            return None
        return heads.pop(), neurons.pop()

    def standard_config(self, config, masks):
        """Subclasses set the slim sizes when every layer keeps the same counts (`uniform_counts`)."""
        return None

    def dense_config(self, config, masks):
        if self.uniform_counts(masks) is None:
            return config
        try:
            masks.check_fits(config, self)
            return config
        except ValueError:  # the masks' widths are the dense counts: `config` holds the slim sizes
            dense = self.standard_dense_config(config, masks)
        kept = self.uniform_counts(masks)
        standard = all((g.heads, g.neurons) == kept for g in self.layer_geometry(config))
        return dense if dense is not None and standard else config

    def standard_dense_config(self, config, masks):
        """The inverse of `standard_config`: the dense config a standard slim `config` was made from by `masks`
        (their widths are the dense counts). Subclasses set the sizes."""
        return None


def empty_input_safe(module: nn.Module) -> nn.Module:
    """`module`, or a Conv1D left with no input feature as one whose forward runs (`EmptyInputConv1D`)."""
    return EmptyInputConv1D.like(module) if isinstance(module, Conv1D) and module.nx == 0 else module


def with_sizes(config, **sizes):
    """A copy of `config` with other `sizes` (attribute -> value)."""
    new = copy.deepcopy(config)
    for key, value in sizes.items():
        setattr(new, key, value)
    return new
