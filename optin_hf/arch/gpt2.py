"""GPT-2 causal LMs: transformers' `Conv1D` projections (weights [in, out]), one fused q|k|v
projection (`c_attn`), learned positions added before the first layer, and biases everywhere.

A head owns dh features in each of c_attn's q, k and v blocks (`Slice(segments=3)`) with their
biases, and its dh c_proj columns; an MLP neuron its c_fc column and bias and its c_proj row.
The slim attention splits c_attn's output at `split_size`, set to kept heads x dh. A layer that
keeps no head keeps c_proj (its bias is still added) and a cache placeholder
(`causal_lm.CachedEmptyAttention`).

MACs per token at a context of L keys: a head 3*d*dh (q, k, v) + 2*L*dh + dh*d; a neuron 2*d;
fixed: the LM head d*V. Not counted: embeddings, LayerNorms, biases, GELU.

A uniform slim GPT-2 is a standard config only with every head kept (n_inner = the kept
neurons): GPT-2 derives its head size as n_embd / n_head, so fewer heads cannot be written.
Cross-attention (`add_cross_attention=True`) is refused.
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
    # resid_dropout is the identity in eval mode, how optin-hf runs a model (an emptied layer has none)
    return layer_input + layer.attn.c_proj(heads)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden + layer.mlp(layer.ln_2(hidden))


def _finish_feed_forward(layer: nn.Module, down: torch.Tensor, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden + down  # the MLP ends with c_proj (and an eval-mode dropout)


@dataclass(frozen=True)
class GPT2Adapter(CausalLMAdapter):
    """Fused q|k|v in Conv1D layout; sizes under GPT-2's names (n_embd, n_head, n_inner)."""

    def check_config(self, config) -> None:
        if getattr(config, "add_cross_attention", False):
            raise ValueError(
                "GPT-2 with add_cross_attention=True (a decoder of an encoder-decoder model) is not supported: optin-hf "
                "prunes GPT-2 causal LMs (add_cross_attention=False)."
            )

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        hidden, heads = int(config.n_embd), int(config.n_head)
        neurons = int(config.n_inner or 4 * hidden)
        return (LayerGeometry(heads, hidden // heads, hidden, neurons),) * int(config.n_layer)

    def head_slices(self, config=None) -> tuple[Slice, ...]:
        return (Slice(self.query, "out", segments=3), Slice(self.attn_out, "in"))

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size=None) -> float:
        hidden, head_dim = int(config.n_embd), int(config.n_embd) // int(config.n_head)
        return 4 * hidden * head_dim + 2 * seq_len * head_dim

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size=None) -> float:
        return 2 * int(config.n_embd)

    def standard_config(self, config, masks):
        counts = self.uniform_counts(masks)
        if counts is None or counts[0] != int(config.n_head):
            return None
        return with_sizes(config, n_inner=counts[1])

    def standard_dense_config(self, config, masks):
        return with_sizes(config, n_inner=masks.neuron_mask.shape[1])


GPT2 = GPT2Adapter(
    model_types=("gpt2",),
    layers="h",
    attn_core="attn",
    query="attn.c_attn",
    key="attn.c_attn",
    value="attn.c_attn",
    attn_out="attn.c_proj",
    ffn_up="mlp.c_fc",
    ffn_down="mlp.c_proj",
    ffn_input="ln_2",
    feature="ln_1",  # the normalised layer input
    head_count_attrs=("num_heads",),
    all_head_size_attr="split_size",
    pooled_tokens=0,  # the LM head reads every token
    finish_attention=_finish_attention,
    feed_forward=_feed_forward,
    finish_feed_forward=_finish_feed_forward,
    unit_names=("attention heads", "MLP neurons"),
    fixed_parts="the LM head",
    packs_examples=False,  # causal attention: examples are never laid end to end
    output_is_ffn_sum=True,  # pre-norm: the layer returns the residual plus the MLP's output
    capabilities=Capabilities(fast_engine=True, repairs=("weights", "scales"), inputs=True),
    classifiers={"GPT2LMHeadModel": lm_head_classifier("ln_f")},
)
