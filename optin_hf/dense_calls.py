"""The dense model's layer calls over the refit's calibration batches, recorded once for the selection and the refit.

The refit selection (`optin_hf.refit_selection`) and the refit (`optin_hf.reconstruct`) both start from every layer's
call in a dense run over the same calibration batches. `CalibrationBatches` keeps that recording, so a pruner that
selects units by the refit and then refits runs the dense model over them once: on the language-model default a whole
forward over 49k tokens, about a minute on 2 cores. The recording is reused only for a model with the same weights (a
float64 sum per tensor; the refit's dense model is the selection's, deep-copied before slimming); any other model is
recorded anew. The forward skips what no layer call needs: a causal LM's logits are computed for one position only.
A caller that reads more of the run than the layer calls (the selection's Grams of its projections' inputs) observes
the recording as it is made (`observe`), instead of running the layers again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter
from .capture import scoring_forward
from .engine.prefix import LayerCall, record_layer_calls
from .memory import release_freed_memory


@dataclass
class DenseCalls:
    """One calibration batch's dense run: the batch, each layer's call in it, and the real-token rows (bool
    [batch * tokens]; None: every row is real)."""

    batch: dict[str, torch.Tensor]
    calls: list[LayerCall]
    real: torch.Tensor | None


class CalibrationBatches(list):
    """Padded calibration batches (`data.prepare_calibration`) that keep the dense run `dense_calls` recorded on them."""

    recorded: tuple[tuple[float, ...], list[DenseCalls]] | None = None


def weights_sum(model: nn.Module) -> tuple[float, ...]:
    """A float64 sum of each parameter and buffer: equal for a deep copy, different once a weight changes."""
    return tuple(float(t.detach().sum(dtype=torch.float64)) for t in itertools.chain(model.parameters(), model.buffers()))


def dense_calls(
    model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], progress: bool = True,
    observe: Callable[[torch.Tensor | None], AbstractContextManager] | None = None,
) -> list[DenseCalls]:
    """Every layer's call in `model`'s run over each batch (no KV cache: the calls are replayed many times); kept on
    `batches` when they are `CalibrationBatches`, and read from there for a model with the same weights. `progress`:
    a bar over the batches. `observe(real)`, where given, is entered around each batch's forward (its real-token rows
    as the argument), so its hooks see the run; the run is then made anew, never read from `batches`."""
    key = None
    if isinstance(batches, CalibrationBatches):
        key = weights_sum(model)
        if observe is None and batches.recorded is not None and batches.recorded[0] == key:
            return batches.recorded[1]
        batches.recorded = None  # another model's (or an observed) run: freed before this one is made
    device = next(model.parameters()).device
    runs = []
    for batch in tqdm(batches, desc="Dense run", unit="batch", disable=not progress):
        real = batch["attention_mask"].reshape(-1).bool() if "attention_mask" in batch else None
        real = None if real is None or real.all() else real.to(device)  # no padding: the refits' sums read every row
        with record_layer_calls(model, adapter, heads=False) as calls, observe(real) if observe else nullcontext():
            scoring_forward(model, batch, logits=False)
        [layer_calls] = calls
        runs.append(DenseCalls(batch, layer_calls, real))
        release_freed_memory()  # the forward's activations that the recording does not keep, before the next batch's
    if key is not None:
        batches.recorded = (key, runs)
    return runs
