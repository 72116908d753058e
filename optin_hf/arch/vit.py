"""ViT and DeiT. The MD feature is the first LayerNorm's output (the normalised layer input)."""

from dataclasses import replace

from .base import ArchAdapter

VIT = ArchAdapter(
    model_types=("vit",),
    layers="layers",
    attn_core="attention",
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    attn_out="attention.o_proj",
    ffn_up="mlp.fc1",
    ffn_down="mlp.fc2",
    feature="layernorm_before",
    head_count_attrs=("num_attention_heads",),
    patch_embedding="embeddings.patch_embeddings.projection",
    num_prefix_tokens=1,
)

# DeiT adds a distillation token after the class token.
DEIT = replace(VIT, model_types=("deit",), num_prefix_tokens=2)
