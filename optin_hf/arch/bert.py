"""BERT-style text encoders: bert and roberta share one layout."""

from .base import ArchAdapter

BERT = ArchAdapter(
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    attn_core="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    feature="output.dense",
    head_count_attrs=("num_attention_heads",),
    all_head_size_attr="all_head_size",
)
