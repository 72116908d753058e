"""`release_freed_memory`: the C heap's free pages go back to the system, live tensors stay."""

import psutil
import pytest
import torch
from tiny import FAMILIES

import optin_hf.dense_calls
import optin_hf.pruner
import optin_hf.reconstruct
import optin_hf.refit_selection
from optin_hf import OptinConfig, OptinPruner, memory
from optin_hf.memory import release_freed_memory


def test_release_freed_memory_returns_what_glibc_kept_and_leaves_live_tensors():
    if memory._malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim")
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    first = torch.ones(2_000_000)
    del first  # a mapped 8 MB block freed: glibc's threshold rises past it, so the next ones come from its heap
    blocks = [torch.full((2_000_000,), float(i)) for i in range(60)]  # 480 MB, touched
    live = blocks[::2]  # every other block stays: the freed ones lie between live ones, not at the heap's top,
    del blocks  # where glibc would give them back by itself
    kept = rss()
    assert release_freed_memory()
    assert kept - rss() > 180e6  # most of the 240 MB freed stayed resident until trimmed, and is returned by it
    assert all(bool((t == 2 * i).all()) for i, t in enumerate(live))


def test_the_pruner_hands_memory_back_after_scoring_each_dense_batch_each_selection_group_and_each_refit_layer(count_calls):
    owners = (optin_hf.pruner, optin_hf.dense_calls, optin_hf.refit_selection, optin_hf.reconstruct)
    trims = {owner.__name__.split(".")[-1]: count_calls(owner, "release_freed_memory") for owner in owners}
    model = FAMILIES["llama"].build()
    config = OptinConfig(importance="magnitude", mac_constraint=0.7, selection="refit", reconstruct="weights",
                         num_samples=8, reconstruct_samples=8, batch_size=4)
    OptinPruner(config).prune_model(model, FAMILIES["llama"].examples(8, 1))
    layers = model.config.num_hidden_layers
    assert {name: len(calls) for name, calls in trims.items()} == {
        "pruner": 1, "dense_calls": 2, "refit_selection": 1, "reconstruct": layers}  # 8 examples in batches of 4
