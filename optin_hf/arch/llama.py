"""Llama, Mistral, Qwen2 and Qwen3 causal LMs: grouped-query attention, rotary positions, RMSNorm
and a gated MLP, one layout in transformers 5.

Units. Under grouped-query attention g = num_attention_heads / num_key_value_heads query heads
share one key/value head. One attention unit is one KV group: its g query heads' q_proj rows
(g*dh), its key and value rows (dh each) and its g*dh o_proj columns. Removing query heads inside
a group would keep the group's K/V (the KV cache, a decoder's memory bottleneck, would not
shrink) and give layers of ragged groups that no config can describe; removing whole groups keeps
g, so every slim layer is still a standard attention with fewer KV heads. Qwen2's q/k/v biases
follow their rows; Qwen3's q_norm/k_norm act on one head's dh features, shared by all heads, so
they stay. One MLP unit is a gate row, an up row and a down column together.

A slim layer needs no head count anywhere: transformers 5 reads the head counts of its attention
off the tensor shapes (q_proj's output viewed as [..., -1, head_dim]; num_key_value_groups, which
is g, stays), so layers may keep different numbers of groups, and `generate` with its dynamic
key/value cache runs them. A layer that keeps no group writes a placeholder into the cache
(`causal_lm.CachedEmptyAttention`); an MLP that keeps no channel adds nothing. A static cache
(`cache_implementation="static"`) sizes every layer from the config: use it with uniform models.

MACs per token at a context of L keys (`causal_lm`): a KV group d*g*dh (q) + 2*d*dh (k, v) +
g*dh*d (o) + 2*L*g*dh (scores and context); an MLP channel 3*d; fixed: the LM head d*V.
Not counted: embeddings (a lookup), RMSNorms, rotary embeddings, the SiLU gate product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LayerGeometry
from .capabilities import Capabilities
from .causal_lm import CausalLMAdapter, lm_head_classifier, with_sizes
from .projection import Slice


def _finish_attention(layer: nn.Module, heads: torch.Tensor, layer_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer_input + layer.self_attn.o_proj(heads)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden + down  # the MLP ends with down_proj


@dataclass(frozen=True)
class GroupedQueryAdapter(CausalLMAdapter):
    """One attention unit = one KV group (module docstring); `LayerGeometry.head_dim` is a unit's
    query width g*dh, the o_proj columns it owns."""

    @staticmethod
    def sizes(config) -> tuple[int, int, int]:
        """(query heads, KV heads, head size dh) of a dense config."""
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return heads, kv, head_dim

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        heads, kv, head_dim = self.sizes(config)
        unit = LayerGeometry(kv, heads // kv * head_dim, int(config.hidden_size), int(config.intermediate_size))
        return (unit,) * int(config.num_hidden_layers)

    def head_slices(self, config=None) -> tuple[Slice, ...]:
        if config is None:
            raise TypeError("A KV group's key and value rows are head_dim wide, which the config gives: pass the config.")
        head_dim = self.sizes(config)[2]
        return (Slice(self.query, "out"), Slice(self.key, "out", head_dim), Slice(self.value, "out", head_dim),
                Slice(self.attn_out, "in"))

    def neuron_slices(self, config=None) -> tuple[Slice, ...]:
        return (Slice("mlp.gate_proj", "out"), Slice(self.ffn_up, "out"), Slice(self.ffn_down, "in"))

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size=None) -> float:
        heads, kv, head_dim = self.sizes(config)
        hidden, width = int(config.hidden_size), heads // kv * head_dim
        return 2 * hidden * width + 2 * hidden * head_dim + 2 * seq_len * width

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size=None) -> float:
        return 3 * int(config.hidden_size)

    def standard_config(self, config, masks):
        counts = self.uniform_counts(masks)
        if counts is None:
            return None
        groups, neurons = counts
        heads, kv, head_dim = self.sizes(config)
        # head_dim is written out: with fewer heads, hidden_size / num_attention_heads is no longer it
        return with_sizes(config, num_attention_heads=groups * (heads // kv), num_key_value_heads=groups,
                         head_dim=head_dim, intermediate_size=neurons)

    def standard_dense_config(self, config, masks):
        heads, kv, head_dim = self.sizes(config)
        groups = masks.head_mask.shape[1]
        return with_sizes(config, num_attention_heads=groups * (heads // kv), num_key_value_heads=groups,
                         head_dim=head_dim, intermediate_size=masks.neuron_mask.shape[1])


LLAMA = GroupedQueryAdapter(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="layers",
    attn_core="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_up="mlp.up_proj",
    ffn_down="mlp.down_proj",
    ffn_input="post_attention_layernorm",
    feature="input_layernorm",  # the normalised layer input, as ViT's layernorm_before
    pooled_tokens=0,  # the LM head reads every token
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    unit_names=("KV groups", "MLP channels"),
    fixed_parts="the LM head",
    packs_examples=False,  # causal attention and rotary positions: examples are never laid end to end
    output_is_ffn_sum=True,  # pre-norm: the layer returns the residual plus the MLP's output
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True, allocation="fluctuation"),
    classifiers={f"{name}ForCausalLM": lm_head_classifier("norm") for name in ("Llama", "Mistral", "Qwen2", "Qwen3")},
)
