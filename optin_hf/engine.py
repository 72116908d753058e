"""How candidate structures are run. The reference engine: one full masked forward each.

Every engine returns the raw per-candidate MD and KL (`RawLosses`); balancing and weights
are applied afterwards, so engines that visit candidates in another order agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter
from .capture import DenseCapture, logits_of, select_rows
from .hooks import apply_masks, record_features
from .losses import kl_loss, later_layers, md_loss


@dataclass
class RawLosses:
    """Unbalanced losses per candidate. Each tensor is [num_layers, units] (units = heads or neurons)."""

    md: torch.Tensor
    kl: torch.Tensor


@torch.no_grad()
def masked_run_losses(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    capture: DenseCapture,
    layer: int,
    temperature: float,
) -> tuple[float, float]:
    """MD over the later layers and KL of one masked run (masks already applied by hooks)."""
    device = next(model.parameters()).device
    num_layers = len(capture.grams)
    judged = later_layers(layer, num_layers)
    rows: dict[int, list[torch.Tensor]] = {z: [] for z in judged}
    logits = []
    with record_features(model, adapter) as features:
        for batch, batch_rows in zip(batches, capture.rows):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            logits.append(logits_of(out))
            for z in judged:
                rows[z].append(select_rows(features[z], batch_rows.to(device)))
    md = sum(float(md_loss(capture.grams[z], torch.cat(rows[z]))) for z in judged)
    masked_logits = torch.cat(logits) if logits[0] is not None else None
    kl = float(kl_loss(capture.logits, masked_logits, temperature))
    return md, kl


def reference_losses(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    capture: DenseCapture,
    kind: str,
    units: int,
    temperature: float,
) -> RawLosses:
    """Score each head (kind="head") or neuron alone with one full forward per candidate."""
    num_layers = len(capture.grams)
    md = torch.zeros(num_layers, units, dtype=torch.float64)
    kl = torch.zeros_like(md)
    bar = tqdm(total=num_layers * units, desc=f"OPTIN {kind}s", unit=kind)
    for layer in range(num_layers):
        for index in range(units):
            mask = torch.ones(num_layers, units)
            mask[layer, index] = 0.0
            masks = {"head_mask": mask} if kind == "head" else {"neuron_mask": mask}
            with apply_masks(model, adapter, **masks):
                md[layer, index], kl[layer, index] = masked_run_losses(model, adapter, batches, capture, layer, temperature)
            bar.update()
    bar.close()
    return RawLosses(md, kl)
