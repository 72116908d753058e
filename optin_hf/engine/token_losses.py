"""How token candidates (vision "tau" mode) are run: the reference loop, one full forward per
(layer, position) with that token removed from the layer's input onward, shared between
processes and checkpointed as it goes, like head and neuron candidates (`engine.run`).

Like `engine.compute_raw_losses` it returns raw per-candidate MD and KL (`RawLosses`, here
[num_layers, tokens]); `losses.token_scores` balances and weights them afterwards, so a faster
engine only has to reproduce these raw losses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter
from ..capture import scoring_forward
from ..hooks import drop_token, record_features
from ..losses import KLOutputs, kl_loss, later_layers, token_gram, token_md_loss
from .resume import FORMAT, LossCheckpoint, fingerprint
from .run import RawLosses, _store, gather, process_state, share

CHECKPOINT_PREFIX = "token_losses"  # beside the head/neuron files of the same checkpoint_dir, never mixed with them


@dataclass
class TokenCapture:
    """Dense reference for token candidates.

    grams[b][z]: [batch_b, batch_b] token-averaged inter-sample Gram of layer z's feature on
    calibration batch b (samples are compared within their batch, as the reference does with
    its one batch). outputs[b]: what the KL compares on batch b (`ArchAdapter.kl_outputs`).
    """

    grams: list[list[torch.Tensor]]
    outputs: list[KLOutputs | None]


def _run(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], judged: range):
    """Token-averaged Grams of the `judged` layers per batch, and what the KL compares per batch."""
    grams, outputs = [], []
    with record_features(model, adapter) as features:
        for batch in batches:
            outputs.append(adapter.kl_outputs(scoring_forward(model, batch), batch))
            grams.append({z: token_gram(features[z]) for z in judged})
    return grams, outputs


@torch.no_grad()
def capture_token_grams(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]) -> TokenCapture:
    num_layers = len(adapter.layers_of(model))
    grams, outputs = _run(model, adapter, batches, range(num_layers))
    return TokenCapture([[g[z] for z in range(num_layers)] for g in grams], outputs)


def _settings(model: nn.Module, adapter: ArchAdapter, temperature: float, num_layers: int, num_tokens: int) -> dict:
    """The settings raw token losses depend on (the fingerprint's readable part)."""
    return {
        "format": FORMAT,
        "kind": "token",
        "temperature": temperature,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "num_layers": num_layers,
        "num_tokens": num_tokens,
        "num_prefix_tokens": adapter.num_prefix_tokens,
    }


@torch.no_grad()
def reference_token_losses(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    capture: TokenCapture,
    temperature: float,
    checkpoint_dir: str | os.PathLike | None = None,
) -> RawLosses:
    """Raw token MD (over the later layers, as for neurons) and KL of each candidate alone.

    Candidates are the non-prefix positions of layers 1..L-1: layer 0 and the class (and
    distillation) tokens are never removed, so their entries stay 0. Under several processes
    each runs its share and all get every loss. With `checkpoint_dir`, each finished candidate
    is saved, and a run given the same folder (for the same model, data and settings) resumes.
    """
    num_layers = len(capture.grams[0])
    num_tokens = adapter.default_seq_len(model.config)
    state = process_state(next(model.parameters()).device)
    tensors = {
        "token.md": torch.zeros(num_layers, num_tokens, dtype=torch.float64),
        "token.kl": torch.zeros(num_layers, num_tokens, dtype=torch.float64),
        "token.done": torch.zeros(num_layers, num_tokens, dtype=torch.bool),
    }
    checkpoint = None
    if checkpoint_dir is not None:
        tag = fingerprint(model, batches, _settings(model, adapter, temperature, num_layers, num_tokens))
        checkpoint = LossCheckpoint(checkpoint_dir, tag, state.process_index, prefix=CHECKPOINT_PREFIX)
        checkpoint.load_into(tensors)
    state.wait_for_everyone()  # every process has read the checkpoint before any writes to it
    positions = range(adapter.num_prefix_tokens, num_tokens)
    todo = [(layer, position) for layer in range(1, num_layers) for position in positions]
    mine = share([c for c in todo if not tensors["token.done"][c]], state)
    desc = "OPTIN tokens" + (f" ({state.num_processes} processes)" if state.num_processes > 1 else "")
    bar = tqdm(total=len(mine), desc=desc, unit="token", disable=not state.is_main_process)
    computed: list[tuple[str, int, int, float, float]] = []
    for layer, position in mine:
        judged = later_layers(layer, num_layers)
        with drop_token(model, adapter, layer, position):
            grams, outputs = _run(model, adapter, batches, judged)
        md = sum(float(token_md_loss(capture.grams[b][z], grams[b][z])) for b in range(len(batches)) for z in judged)
        kl = float(kl_loss(capture.outputs, outputs, temperature))
        _store(tensors, "token", layer, position, md, kl)
        computed.append(("token", layer, position, md, kl))
        if checkpoint is not None:
            checkpoint.save(tensors)
        bar.update()
    bar.close()
    for result in gather(computed):
        _store(tensors, *result)
    missing = sum(int(not tensors["token.done"][c]) for c in todo)
    if missing:  # e.g. processes on several machines that each saw a different checkpoint_dir
        raise RuntimeError(f"{missing} token candidates were scored by no process: did every process see the same checkpoint_dir?")
    return RawLosses(tensors["token.md"], tensors["token.kl"])
