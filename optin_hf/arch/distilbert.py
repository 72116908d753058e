"""DistilBERT: its output projection sits inside the attention module."""

from .base import ArchAdapter

DISTILBERT = ArchAdapter(
    model_types=("distilbert",),
    layers="transformer.layer",
    attn_core="attention",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attn_out="attention.out_lin",
    ffn_up="ffn.lin1",
    ffn_down="ffn.lin2",
    feature="ffn.lin2",
    head_count_attrs=("n_heads",),
)
