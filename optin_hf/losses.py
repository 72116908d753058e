"""OPTIN's losses: manifold distillation (MD), KL on the logits, their balancing, and the
reference's extra weights used in faithful mode."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def md_loss(dense_gram: torch.Tensor, masked_rows: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences of two cosine Gram matrices ([K, K] vs rows [K, dim])."""
    return (dense_gram - masked_rows @ masked_rows.T).pow(2).sum()


@dataclass
class KLOutputs:
    """What the KL compares for one batch: logits [examples, positions, classes] and which
    positions count, valid [examples, positions] (bool).

    A position is a pooled token (classification: one per example), a pixel (segmentation) or
    a real token (a language model). Batches stay apart, each with its own number of positions,
    so batches of different lengths are never concatenated.
    """

    logits: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor | None) -> KLOutputs | None:
        """From a prediction [examples, classes, *positions] (a classifier's [B, C], a map
        [B, C, H, W]), every position valid. None for a bare encoder (no logits)."""
        if logits is None:
            return None
        flat = logits.reshape(logits.shape[0], logits.shape[1], -1).transpose(1, 2)
        return cls(flat, torch.ones(flat.shape[:2], dtype=torch.bool, device=flat.device))

    def select(self, examples: torch.Tensor) -> KLOutputs:
        """These outputs' `examples` (indices into the batch), in that order."""
        return KLOutputs(self.logits[examples], self.valid[examples])


def select_examples(batches: Sequence[KLOutputs], sizes: Sequence[int], order: torch.Tensor) -> list[KLOutputs]:
    """The dense outputs regrouped for another batching: the examples `order` indexes (into all
    batches' examples in turn), in groups of `sizes`. Each group is taken from one batch at a
    time and padded with invalid positions, so no two batches' positions are ever joined."""
    where = [(b, i) for b, outputs in enumerate(batches) for i in range(len(outputs.logits))]
    groups = []
    for indices in order.cpu().split(list(sizes)):
        parts = [batches[b].select(torch.tensor([i])) for b, i in (where[j] for j in indices)]
        width = max(p.logits.shape[1] for p in parts)
        logits = torch.cat([F.pad(p.logits, (0, 0, 0, width - p.logits.shape[1])) for p in parts])
        valid = torch.cat([F.pad(p.valid, (0, width - p.valid.shape[1])) for p in parts])
        groups.append(KLOutputs(logits, valid))
    return groups


def kl_loss(dense: Sequence[KLOutputs | None], masked: Sequence[KLOutputs | None], temperature: float) -> torch.Tensor:
    """KL(softmax(dense) || softmax(masked)) of each example, as the mean over its valid
    positions, summed over examples and batches (`dense[b]` pairs with `masked[b]`), times T^2.

    A classifier's example has one position; a segmentation map's are its pixels, so each
    image weighs the same whatever its size. As in the reference the logits are not divided by
    T. Batches with no outputs (a bare encoder) or one logit (a regression head) contribute
    nothing. Computed in float64: removing a structure that barely matters moves the logits so
    little that a float32 KL is mostly rounding error.
    """
    total = torch.zeros((), dtype=torch.float64)
    for d, m in zip(dense, masked, strict=True):
        if d is None or d.logits.shape[-1] < 2:  # a one-logit regression head has no distribution
            continue
        per_position = F.kl_div(
            F.log_softmax(m.logits.double(), -1), F.softmax(d.logits.double(), -1), reduction="none"
        ).sum(-1)
        valid = d.valid.to(per_position.device)
        # garbage at an invalid position (NaN included) must not leak into the sum
        per_example = per_position.where(valid, 0).sum(1) / valid.sum(1).clamp_min(1)
        total = total + per_example.sum().cpu()
    return total * temperature**2


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
