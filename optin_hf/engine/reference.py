"""The reference engine: one full masked forward of the whole model per candidate.

Slow, but it runs the model exactly as a user would, so it is the yardstick the fast engine
is tested against (`OptinConfig(engine="reference")`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter
from ..capture import DenseCapture, capture_dense, scoring_forward, select_rows
from ..hooks import apply_masks, record_features
from ..losses import kl_loss, later_layers, md_loss


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
    outputs = []
    with record_features(model, adapter) as features:
        for batch, batch_rows in zip(batches, capture.rows):
            outputs.append(adapter.kl_outputs(scoring_forward(model, batch), batch))
            for z in judged:
                rows[z].append(select_rows(features[z], batch_rows.to(device), capture.tokens))
    md = sum(float(md_loss(capture.grams[z], torch.cat(rows[z]))) for z in judged)
    kl = float(kl_loss(capture.outputs, outputs, temperature))
    return md, kl


class ReferenceRunner:
    """Runs candidates one at a time, each with the whole model masked by hooks."""

    variants = 1

    def __init__(self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config):
        self.model, self.adapter, self.batches = model, adapter, batches
        self.temperature = config.temperature
        self.capture = capture_dense(model, adapter, batches, config.md_tokens, config.seed)
        self.num_layers = len(adapter.layers_of(model))

    def run(self, kind: str, layer: int, unit_mask: torch.Tensor) -> list[tuple[float, float]]:
        """(MD, KL) of each candidate of `layer` (unit_mask: [variants, units]), one forward each."""
        results = []
        for row in unit_mask.cpu():
            mask = torch.ones(self.num_layers, row.numel())
            mask[layer] = row
            masks = {"head_mask": mask} if kind == "head" else {"neuron_mask": mask}
            with apply_masks(self.model, self.adapter, **masks):
                losses = masked_run_losses(
                    self.model, self.adapter, self.batches, self.capture, layer, self.temperature
                )
            results.append(losses)
        return results
