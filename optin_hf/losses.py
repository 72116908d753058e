"""OPTIN's losses: manifold distillation (MD), KL on the logits, their balancing, and the
reference's extra weights used in faithful mode."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# A language model's next-token distributions span its vocabulary (49,152 tokens for SmolLM2, 128,256 for Llama 3):
# kept whole, the dense outputs of a calibration set of 128 windows of 2,048 tokens would be [128, 2048, 128256]
# floats (134 GB). Past KL_FULL_CLASSES classes the dense side keeps, per position, only its KL_TOP_K most likely
# classes and the total mass of the others (`TopKOutputs`): ~4 kB a position at any vocabulary size.
KL_TOP_K = 256
KL_FULL_CLASSES = 4096
# Positions x classes per float64 step of the top-k KL (128 MB): a [positions, vocabulary] block of a language
# model's logits is converted to float64 a chunk at a time, never whole.
KL_CHUNK_ELEMENTS = 1 << 24


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


@dataclass
class TopKOutputs:
    """The dense side of the KL for a large vocabulary: at each position its `k` most likely classes
    and one bucket for all the others, which is all the KL then compares.

    indices [examples, positions, k]: the classes, most likely first; log_probs [examples,
    positions, k]: their dense log-probabilities; log_rest [examples, positions]: the log of the
    dense probability of every other class together; valid [examples, positions] as in KLOutputs
    (float64, computed from the logits in float64). The KL against it is the KL of the two
    distributions coarsened to these k + 1 outcomes: a lower bound of the full KL (coarsening
    never increases a KL), equal to it where the masked model keeps the dense model's proportions
    among the other classes.
    """

    indices: torch.Tensor
    log_probs: torch.Tensor
    log_rest: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, outputs: KLOutputs, k: int) -> TopKOutputs:
        """The top-`k` form of `outputs` (logits [examples, positions, classes], k < classes)."""
        logits = outputs.logits
        flat = logits.reshape(-1, logits.shape[-1])
        indices = flat.topk(k, dim=-1).indices
        log_probs = torch.empty(indices.shape, dtype=torch.float64, device=flat.device)
        log_rest = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
        for rows in _chunks(flat.shape[0], flat.shape[-1], flat.device):
            log_probs[rows], log_rest[rows] = _coarse_log_probs(flat[rows], indices[rows])
        shape = logits.shape[:2]
        return cls(indices.reshape(*shape, k), log_probs.reshape(*shape, k), log_rest.reshape(shape), outputs.valid)

    def select(self, examples: torch.Tensor) -> TopKOutputs:
        """These outputs' `examples` (indices into the batch), in that order."""
        return TopKOutputs(self.indices[examples], self.log_probs[examples], self.log_rest[examples], self.valid[examples])

    def kl_per_position(self, masked: KLOutputs) -> torch.Tensor:
        """[examples, positions] float64: KL(dense || masked) over the k + 1 outcomes at every valid
        position (0 elsewhere), from the masked model's full logits a chunk of positions at a time."""
        logits = masked.logits.reshape(-1, masked.logits.shape[-1])
        valid = self.valid.to(logits.device).reshape(-1)
        out = torch.zeros(valid.shape, dtype=torch.float64, device=logits.device)
        where = valid.nonzero().squeeze(1)
        indices, log_p = self.indices.reshape(-1, self.indices.shape[-1]), self.log_probs.reshape(-1, self.log_probs.shape[-1])
        log_p_rest = self.log_rest.reshape(-1)
        for rows in _chunks(len(where), logits.shape[-1], logits.device):
            at = where[rows]
            log_q, log_q_rest = _coarse_log_probs(logits[at], indices[at].to(logits.device))
            top = _kl_terms(log_p[at].to(logits.device), log_q).sum(-1)
            out[at] = top + _kl_terms(log_p_rest[at].to(logits.device), log_q_rest)
        return out.reshape(self.valid.shape)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise, 0 where p is 0 (log p = -inf; not NaN)."""
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q))


def _chunks(rows: int, classes: int, device: torch.device) -> list[torch.Tensor]:
    """Index ranges over `rows` of `classes` logits, each at most KL_CHUNK_ELEMENTS elements."""
    step = max(1, KL_CHUNK_ELEMENTS // max(classes, 1))
    return list(torch.arange(rows, device=device).split(step))


def _coarse_log_probs(logits: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p at `indices` [rows, k], log p of all the other classes [rows]) of softmax(`logits`)
    ([rows, classes]), in float64. The other classes' mass is their own sum, not 1 minus the top k's,
    which would cancel to 0 (and its log to -inf) where the top k hold nearly everything. One float64
    copy, exponentiated in place: a language model's vocabulary makes every pass over it count."""
    shifted = logits.double()
    shifted -= shifted.amax(-1, keepdim=True)
    top = shifted.gather(-1, indices)
    masses = shifted.exp_()
    log_total = masses.sum(-1).log()
    rest = masses.scatter_(-1, indices, 0.0).sum(-1).clamp_min(torch.finfo(torch.float64).tiny).log()
    return top - log_total[:, None], rest - log_total


DenseOutputs = KLOutputs | TopKOutputs


def bounded(outputs: KLOutputs | None) -> DenseOutputs | None:
    """The dense outputs as scoring keeps them: whole up to KL_FULL_CLASSES classes (every classifier and
    segmentation head), else their top-KL_TOP_K form (a language model's vocabulary). The module's values
    are read at each call, so a run may set them (`optin_hf.losses.KL_TOP_K = 64`)."""
    if outputs is None or outputs.logits.shape[-1] <= max(KL_FULL_CLASSES, KL_TOP_K):
        return outputs
    return TopKOutputs.of(outputs, KL_TOP_K)


def comparable(dense: DenseOutputs, outputs: KLOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(got, want): `outputs` read as `dense` keeps its values (the logits, or the log-probabilities
    of dense's top k), for a check that an engine reproduces the dense run."""
    if isinstance(dense, KLOutputs):
        return outputs.logits, dense.logits
    flat = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    indices = dense.indices.reshape(-1, dense.indices.shape[-1]).to(flat.device)
    got = torch.cat([_coarse_log_probs(flat[rows], indices[rows])[0] for rows in _chunks(len(flat), flat.shape[-1], flat.device)])
    return got.reshape(dense.log_probs.shape), dense.log_probs


def _pad_positions(values: torch.Tensor, width: int) -> torch.Tensor:
    """`values` [examples, positions, ...] zero-padded (False for a mask) to `width` positions."""
    padded = values.new_zeros((values.shape[0], width, *values.shape[2:]))
    padded[:, : values.shape[1]] = values
    return padded


def select_examples(batches: Sequence[DenseOutputs], sizes: Sequence[int], order: torch.Tensor) -> list[DenseOutputs]:
    """The dense outputs regrouped for another batching: the examples `order` indexes (into all
    batches' examples in turn), in groups of `sizes`. Each group is taken from one batch at a
    time and padded with invalid positions, so no two batches' positions are ever joined."""
    where = [(b, i) for b, outputs in enumerate(batches) for i in range(len(outputs.valid))]
    groups = []
    for indices in order.cpu().split(list(sizes)):
        parts = [batches[b].select(torch.tensor([i])) for b, i in (where[j] for j in indices)]
        width = max(p.valid.shape[1] for p in parts)
        fields = [f.name for f in dataclasses.fields(parts[0])]
        groups.append(type(parts[0])(*(torch.cat([_pad_positions(getattr(p, name), width) for p in parts]) for name in fields)))
    return groups


def kl_loss(dense: Sequence[DenseOutputs | None], masked: Sequence[KLOutputs | None], temperature: float) -> torch.Tensor:
    """KL(softmax(dense) || softmax(masked)) of each example, as the mean over its valid
    positions, summed over examples and batches (`dense[b]` pairs with `masked[b]`), times T^2.

    A classifier's example has one position; a segmentation map's are its pixels, so each
    image weighs the same whatever its size. As in the reference the logits are not divided by
    T. Batches with no outputs (a bare encoder) or one logit (a regression head) contribute
    nothing. Computed in float64: removing a structure that barely matters moves the logits so
    little that a float32 KL is mostly rounding error. Dense outputs kept in top-k form
    (`bounded`) give the KL over their k + 1 outcomes (`TopKOutputs`).
    """
    total = torch.zeros((), dtype=torch.float64)
    for d, m in zip(dense, masked, strict=True):
        if d is None:
            continue
        if isinstance(d, TopKOutputs):
            per_position = d.kl_per_position(m)
        elif d.logits.shape[-1] < 2:  # a one-logit regression head has no distribution
            continue
        else:
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
