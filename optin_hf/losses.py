"""OPTIN's losses: manifold distillation (MD), KL on the logits, their balancing, and the
reference's extra weights used in faithful mode."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def md_loss(dense_gram: torch.Tensor, masked_rows: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences of two cosine Gram matrices ([K, K] vs rows [K, dim])."""
    return (dense_gram - masked_rows @ masked_rows.T).pow(2).sum()


def kl_loss(dense_logits: torch.Tensor | None, masked_logits: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """KL(softmax(dense) || softmax(masked)), summed over examples, times T^2.

    Logits are [examples, classes], or a dense prediction [examples, classes, *positions]
    (a segmentation map [B, C, H, W]): there each example's KL is the mean over its positions of
    the per-position KL, so a map of one position is a classification example. As in the
    reference the logits are not divided by T. A bare encoder (no logits) or a one-logit
    regression head contributes nothing. Computed in float64: removing a structure that barely
    matters moves the logits so little that a float32 KL is mostly rounding error.
    """
    if dense_logits is None or dense_logits.shape[1] < 2:
        return torch.zeros((), dtype=torch.float64)
    positions = dense_logits[0, 0].numel()
    kl = F.kl_div(F.log_softmax(masked_logits.double(), 1), F.softmax(dense_logits.double(), 1), reduction="sum")
    return kl / positions * temperature**2


def later_layers(layer: int, num_layers: int) -> range:
    """Layers whose features a structure in `layer` is judged by: those after it, or itself if last."""
    return range(layer + 1, num_layers) if layer < num_layers - 1 else range(layer, num_layers)


def balance(md: torch.Tensor, kl: torch.Tensor, lambda_contribution: float) -> torch.Tensor:
    """MD + scaled KL, with the reference's power-of-ten scale so that MD/KL ~ lambda.

    The scale of each candidate is 10^int(log10(MD/KL) - log10(lambda)) when MD > KL, else
    the running mean of the scales so far (1 if none). Candidates are visited in the
    reference's order (layer by layer, index by index), so any engine gets the same scores.
    """
    md_flat, kl_flat = md.flatten().tolist(), kl.flatten().tolist()
    factors: list[float] = []
    scores = []
    for m, k in zip(md_flat, kl_flat):
        factor = None
        if k > 0 and m > k:
            factor = 10.0 ** int(math.log10(m / k) - math.log10(lambda_contribution))
            factors.append(factor)
        if factor is None:
            factor = sum(factors) / len(factors) if factors else 1.0
        scores.append(m + factor * k)
    return torch.tensor(scores, dtype=torch.float64).view(md.shape)


def position_prior(units: int, top: float) -> torch.Tensor:
    """Reversed geomspace(1, top, units): index 0 weighs `top`, the last index 1."""
    if units == 1:
        return torch.tensor([top], dtype=torch.float64)
    return torch.logspace(0, math.log10(top), units, dtype=torch.float64).flip(0)


def faithful_weights(num_layers: int, units: int, kind: str) -> torch.Tensor:
    """The reference config's extra weights: position prior, x0.5 last layer, x0.5 on heads."""
    prior_top, decay = (10.0, 0.5) if kind == "head" else (100.0, 1.0)
    weights = position_prior(units, prior_top).expand(num_layers, units).clone() * decay
    weights[-1] *= 0.5
    return weights


def token_gram(feature: torch.Tensor) -> torch.Tensor:
    """Per-token inter-sample cosine Grams averaged over tokens: [batch, tokens, dim] -> [batch, batch].

    Removing a token changes the token count, so token MD compares these averages instead of
    token-row Grams. mean_t(X_t X_t^T) is one matmul over the flattened [batch, tokens*dim].
    """
    rows = F.normalize(feature.float(), dim=-1)
    flat = rows.reshape(rows.shape[0], -1)
    return flat @ flat.T / rows.shape[1]


def token_md_loss(dense_gram: torch.Tensor, masked_gram: torch.Tensor) -> torch.Tensor:
    """Token MD: sum of squared differences of two token-averaged inter-sample Grams ([batch, batch])."""
    return (dense_gram - masked_gram).pow(2).sum()


def token_scores(md: torch.Tensor, kl: torch.Tensor, lambda_contribution: float, max_patch_envelope: float, patch_metric_decay: float) -> torch.Tensor:
    """The reference's token score from raw losses ([num_layers, tokens] each).

    (MD x depth[l] + balanced KL) x patch_metric_decay, x0.5 in the last layer, with depth =
    geomspace(1, max_patch_envelope, num_layers) (deeper = larger). The balancing sees the
    depth-weighted MD and keeps its own running mean (tokens apart from heads and neurons).
    """
    num_layers = md.shape[0]
    depth = torch.logspace(0, math.log10(max_patch_envelope), num_layers, dtype=torch.float64)[:, None]
    scores = balance(md.double() * depth, kl, lambda_contribution) * patch_metric_decay
    scores[-1] *= 0.5
    return scores
