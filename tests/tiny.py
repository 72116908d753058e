"""Tiny models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DeiTConfig,
    DeiTForImageClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

TEXT = dict(vocab_size=120, max_position_embeddings=64, num_labels=3, initializer_range=0.2)
VISION = dict(image_size=16, patch_size=4, num_channels=3, num_labels=5, initializer_range=0.2)
BLOCK = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)

BUILDERS = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**TEXT, **BLOCK)),
    "bert-encoder": lambda: BertModel(BertConfig(**TEXT, **BLOCK)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**TEXT, **BLOCK, pad_token_id=1)),
    "distilbert": lambda: DistilBertForSequenceClassification(
        DistilBertConfig(**TEXT, dim=32, n_layers=3, n_heads=4, hidden_dim=48)
    ),
    "vit": lambda: ViTForImageClassification(ViTConfig(**VISION, **BLOCK)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(**VISION, **BLOCK)),
}
ARCHS = ["bert", "roberta", "distilbert", "vit", "deit"]


def tiny_model(name: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    model.config._attn_implementation = attn
    return model.eval()


def is_vision(name: str) -> bool:
    return name in ("vit", "deit")


def calibration(name: str, n: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A list of single examples; text ones have different lengths so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    if is_vision(name):
        return [{"pixel_values": torch.randn(3, 16, 16, generator=g)} for _ in range(n)]
    lengths = torch.randint(6, 20, (n,), generator=g)
    return [{"input_ids": torch.randint(5, 120, (int(k),), generator=g)} for k in lengths]


def batch(name: str, seed: int = 2) -> dict[str, torch.Tensor]:
    """One padded batch of 3 for comparing outputs."""
    g = torch.Generator().manual_seed(seed)
    if is_vision(name):
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    ids = torch.randint(5, 120, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_images(n: int, seed: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """`n` random [3, size, size] images as calibration examples (the vision families' tests)."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, size, size, generator=g)} for _ in range(n)]


def flop_macs(module: torch.nn.Module, pixels: torch.Tensor) -> float:
    """Torch's count of `module`'s matmuls and convs on `pixels`, in MACs (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(pixels)
    return counter.get_total_flops() / 2


def scores_by_criterion(model: torch.nn.Module, data: list, settings: dict) -> dict:
    """`model`'s scores by optin (on the reference engine), magnitude and random, keyed by criterion."""
    from optin_hf import OptinConfig, OptinPruner

    return {
        importance: OptinPruner(OptinConfig(importance=importance, engine="reference", **settings)).compute_scores(model, data)
        for importance in ("optin", "magnitude", "random")
    }
