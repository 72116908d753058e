"""optin_hf/dense_calls.py: the dense run over the refit's batches, recorded once for the refit selection and the refit.

Checked on a tiny grouped-query Llama: the recorded layer inputs are the model's own hidden states (its logits skipped);
the refit reads the selection's recording for a deep copy of the model and gives exactly the refit of a fresh one; a
changed weight is recorded anew; an observer sees every batch of a new run; and the pruner records the dense run
once for selection and refit together."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from tiny import FAMILIES

import optin_hf.dense_calls as dense_calls_module
from optin_hf import OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.dense_calls import CalibrationBatches, dense_calls
from optin_hf.reconstruct import reconstruct
from optin_hf.refit_selection import select_by_refit
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")


def llama_batches() -> CalibrationBatches:
    return CalibrationBatches(prepare_calibration(FAMILIES["llama"].examples(12, 1), num_samples=12, batch_size=4, max_length=64))


def half_neurons(model) -> PruningMasks:
    full = PruningMasks.full(model.config)
    neurons = full.neuron_mask.clone()
    neurons[:, neurons.shape[1] // 2:] = False
    return full.with_masks(full.head_mask, neurons)


def test_the_recorded_layer_inputs_are_the_models_hidden_states() -> None:
    model = FAMILIES["llama"].build()
    batches = llama_batches()
    runs = dense_calls(model, check_model(model), batches)
    assert len(runs) == len(batches)
    for run, batch in zip(runs, batches):
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        assert len(run.calls) == model.config.num_hidden_layers
        for i, call in enumerate(run.calls):
            torch.testing.assert_close(call.hidden, hidden[i], rtol=0, atol=0)
        assert torch.equal(run.real, batch["attention_mask"].reshape(-1).bool())


def test_the_refit_reads_the_selections_recording_and_refits_as_from_a_fresh_one() -> None:
    model = FAMILIES["llama"].build()
    adapter = check_model(model)
    batches = llama_batches()
    masks = select_by_refit(model, half_neurons(model), batches, 1e-3, adapter)
    recorded = batches.recorded[1]
    dense = copy.deepcopy(model)
    assert dense_calls(dense, adapter, batches) is recorded  # the same weights: not run again
    shared = slim_model(copy.deepcopy(dense), masks)
    fresh = slim_model(copy.deepcopy(dense), masks)
    kept = reconstruct(shared, dense, batches, inputs=True, masks=masks, progress=False)
    again = reconstruct(fresh, dense, list(batches), inputs=True, masks=masks, progress=False)
    assert kept.tensors.keys() == again.tensors.keys()
    for key, value in kept.tensors.items():
        assert torch.equal(value, again.tensors[key]), key


def test_a_changed_weight_is_recorded_anew() -> None:
    model = FAMILIES["llama"].build()
    adapter = check_model(model)
    batches = llama_batches()
    first = dense_calls(model, adapter, batches)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    second = dense_calls(model, adapter, batches)
    assert second is not first and batches.recorded[1] is second
    plain = dense_calls(model, adapter, list(batches))
    assert torch.equal(second[0].calls[1].hidden, plain[0].calls[1].hidden)
    assert not torch.equal(second[0].calls[1].hidden, first[0].calls[1].hidden)


def test_the_pruner_runs_the_dense_model_once_for_selection_and_refit(count_calls) -> None:
    recordings = count_calls(dense_calls_module, "record_layer_calls")
    model = FAMILIES["llama"].build()
    config = OptinConfig(importance="magnitude", mac_constraint=0.7, selection="refit", reconstruct="weights",
                         num_samples=8, reconstruct_samples=8, batch_size=4)
    pruner = OptinPruner(config)
    pruner.prune_model(model, FAMILIES["llama"].examples(8, 1))
    assert pruner.reconstruction.mode == "weights"
    assert len(recordings) == 2  # 8 examples in batches of 4, each run once


def test_an_observer_sees_every_batch_of_a_new_run_and_the_run_is_kept() -> None:
    """`observe` is entered around each batch's forward with its real-token rows; a recording already kept for the
    same weights is not read then (the observer would miss it), and the new one is kept for the refit."""
    model = FAMILIES["llama"].build()
    adapter = check_model(model)
    batches = llama_batches()
    first = dense_calls(model, adapter, batches)
    down = model.model.layers[1].mlp.down_proj
    seen, inputs = [], []

    @contextmanager
    def observe(real):
        seen.append(real)
        handle = down.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        try:
            yield
        finally:
            handle.remove()

    again = dense_calls(model, adapter, batches, observe=observe)
    assert again is not first and batches.recorded[1] is again
    assert len(seen) == len(inputs) == len(batches)
    for real, run in zip(seen, again):
        assert torch.equal(real, run.real)
    for batch, observed in zip(batches, inputs):  # what the hook saw is the input of a plain forward
        plain = []
        handle = down.register_forward_pre_hook(lambda m, args: plain.append(args[0]))
        with torch.no_grad():
            model(**batch)
        handle.remove()
        assert torch.equal(observed, plain[0])
