"""How token candidates (vision "tau" mode) are run: the reference loop, one full forward per
(layer, position) with that token removed from the layer's input onward.

Like `engine.reference_losses` it returns raw per-candidate MD and KL (`RawLosses`, here
[num_layers, tokens]); `losses.token_scores` balances and weights them afterwards, so a faster
engine only has to reproduce these raw losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter
from ..capture import logits_of
from .run import RawLosses
from ..hooks import drop_token, record_features
from ..losses import kl_loss, later_layers, token_gram, token_md_loss


@dataclass
class TokenCapture:
    """Dense reference for token candidates.

    grams[b][z]: [batch_b, batch_b] token-averaged inter-sample Gram of layer z's feature on
    calibration batch b (samples are compared within their batch, as the reference does with
    its one batch). logits: [num_samples, num_labels], or None for a bare encoder.
    """

    grams: list[list[torch.Tensor]]
    logits: torch.Tensor | None


def _run(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], judged: range):
    """Token-averaged Grams of the `judged` layers per batch, and the concatenated logits."""
    device = next(model.parameters()).device
    grams, logits = [], []
    with record_features(model, adapter) as features:
        for batch in batches:
            out = model(**{k: v.to(device) for k, v in batch.items()})
            logits.append(logits_of(out))
            grams.append({z: token_gram(features[z]) for z in judged})
    return grams, (torch.cat(logits).float() if logits[0] is not None else None)


@torch.no_grad()
def capture_token_grams(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]) -> TokenCapture:
    num_layers = len(adapter.layers_of(model))
    grams, logits = _run(model, adapter, batches, range(num_layers))
    return TokenCapture([[g[z] for z in range(num_layers)] for g in grams], logits)


@torch.no_grad()
def reference_token_losses(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    capture: TokenCapture,
    temperature: float,
) -> RawLosses:
    """Raw token MD (over the later layers, as for neurons) and KL of each candidate alone.

    Candidates are the non-prefix positions of layers 1..L-1: layer 0 and the class (and
    distillation) tokens are never removed, so their entries stay 0.
    """
    num_layers = len(capture.grams[0])
    num_tokens = adapter.default_seq_len(model.config)
    md = torch.zeros(num_layers, num_tokens, dtype=torch.float64)
    kl = torch.zeros_like(md)
    positions = range(adapter.num_prefix_tokens, num_tokens)
    bar = tqdm(total=(num_layers - 1) * len(positions), desc="OPTIN tokens", unit="token")
    for layer in range(1, num_layers):
        judged = later_layers(layer, num_layers)
        for position in positions:
            with drop_token(model, adapter, layer, position):
                grams, logits = _run(model, adapter, batches, judged)
            md[layer, position] = sum(
                float(token_md_loss(capture.grams[b][z], grams[b][z])) for b in range(len(batches)) for z in judged
            )
            kl[layer, position] = float(kl_loss(capture.logits, logits, temperature))
            bar.update()
    bar.close()
    return RawLosses(md, kl)
