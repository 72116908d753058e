"""The dense run: what every masked run is compared against."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchAdapter
from .data import image_size_of
from .hooks import record_features
from .losses import DenseOutputs, bounded


@dataclass
class DenseCapture:
    """Reference outputs of the dense model on the calibration batches.

    rows[b]: flat indices into batch b's [batch*tokens] of the MD token subset (real tokens
    only, seeded, K in all). grams[z]: [K, K] cosine Gram of layer z's feature on that
    subset. outputs[b]: what the KL compares on batch b (`ArchAdapter.kl_outputs`; None for a
    bare encoder), kept per batch so batches of different lengths are never joined, and in
    top-k form past `losses.KL_FULL_CLASSES` classes (`losses.bounded`: a language model's
    vocabulary), so their memory does not grow with the vocabulary. tokens: the tokens
    per example that `rows` index (vision), so a layer that holds fewer (Swin's later stages)
    reads the rows at its own resolution (`layer_rows`); None: every layer holds the batch's.
    """

    rows: list[torch.Tensor]
    grams: list[torch.Tensor]
    outputs: list[DenseOutputs | None]
    tokens: int | None = None


def scoring_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], logits: bool = True):
    """The model's forward on `batch` (moved to the model's device), as every scoring run calls
    it: with `use_cache=False` where the forward takes it, since a scoring run never decodes on,
    and a kept key/value cache would only hold memory. `logits=False`: a causal LM computes its
    logits at the last position only (a run that reads the layers, not the output)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    takes = inspect.signature(model.forward).parameters
    if "use_cache" in takes:
        inputs["use_cache"] = False
    if not logits and "logits_to_keep" in takes:
        inputs["logits_to_keep"] = 1
    return model(**inputs)


def layer_rows(rows: torch.Tensor, tokens: int | None, layer_tokens: int) -> torch.Tensor:
    """Flat indices `rows` into [batch * tokens] moved to a layer of `layer_tokens` per example:
    position p becomes p * layer_tokens // tokens; positions that land together are kept once."""
    if tokens is None or tokens == layer_tokens:
        return rows
    example, position = rows // tokens, rows % tokens
    return (example * layer_tokens + position * layer_tokens // tokens).unique()


def select_rows(feature: torch.Tensor, rows: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """L2-normalised rows of a [batch, tokens, dim] feature picked by flat index (into
    [batch * `tokens`] when given; see `layer_rows`)."""
    rows = layer_rows(rows, tokens, feature.shape[1])
    flat = feature.reshape(-1, feature.shape[-1]).index_select(0, rows).float()
    return nn.functional.normalize(flat, dim=-1)


def md_token_rows(batches: list[dict[str, torch.Tensor]], num_tokens: int, seed: int, tokens_per_example: int | None) -> list[torch.Tensor]:
    """Seeded subset of `num_tokens` real (unpadded) token rows across all batches."""
    valid = []
    for batch in batches:
        if "attention_mask" in batch:
            valid.append(batch["attention_mask"].reshape(-1).bool())
        else:
            valid.append(torch.ones(batch["pixel_values"].shape[0] * tokens_per_example, dtype=torch.bool))
    offsets = torch.tensor([0] + [len(v) for v in valid]).cumsum(0)
    real = torch.cat(valid).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    chosen = real[torch.randperm(len(real), generator=generator)[:num_tokens]].sort().values
    return [chosen[(chosen >= offsets[b]) & (chosen < offsets[b + 1])] - offsets[b] for b in range(len(batches))]


@torch.no_grad()
def capture_dense(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    md_tokens: int,
    seed: int,
    rows: list[torch.Tensor] | None = None,
) -> DenseCapture:
    """The dense run on `batches`. `rows` overrides the MD token subset (an engine that
    re-batches the data passes the same tokens at their new places)."""
    device = next(model.parameters()).device
    tokens = adapter.default_seq_len(model.config, image_size_of(batches))  # at the size the images run
    if rows is None:
        rows = md_token_rows(batches, md_tokens, seed, tokens)
    per_layer: list[list[torch.Tensor]] = [[] for _ in adapter.layers_of(model)]
    outputs = []
    with record_features(model, adapter) as features:
        for batch, batch_rows in zip(batches, rows):
            outputs.append(bounded(adapter.kl_outputs(scoring_forward(model, batch), batch)))
            for z, feature in enumerate(features):
                per_layer[z].append(select_rows(feature, batch_rows.to(device), tokens))
    grams = [torch.cat(parts) @ torch.cat(parts).T for parts in per_layer]
    return DenseCapture(rows, grams, outputs, tokens)
