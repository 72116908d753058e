"""optin_hf/masks.py: ragged layers (per-layer unit counts) and the files of uniform models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optin_hf import PruningMasks
from optin_hf.allocate import allocate
from optin_hf.macs import MacCosts
from tiny import tiny_model

# Written by main's code (commit d37f4d2) before masks knew per-layer counts: a tiny bert's masks.
UNIFORM_FILE = Path(__file__).parent / "fixtures" / "bert_masks_main_d37f4d2.safetensors"


def same(a: PruningMasks, b: PruningMasks) -> bool:
    fields = ("head_mask", "neuron_mask", "token_schedule", "head_counts", "neuron_counts")
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((getattr(a, f), getattr(b, f)) for f in fields))


def ragged() -> PruningMasks:
    heads = torch.tensor([[True, False, False, False], [True, True, True, False]])
    neurons = torch.zeros(2, 8, dtype=torch.bool)
    neurons[0, :3] = neurons[1, 2:7] = True
    return PruningMasks(heads, neurons, head_counts=torch.tensor([2, 4]), neuron_counts=torch.tensor([4, 8]))


def test_ragged_masks_round_trip(tmp_path):
    masks = ragged()
    masks.save(tmp_path / "m.safetensors")
    loaded = PruningMasks.load(tmp_path / "m.safetensors")
    assert same(loaded, masks)
    assert loaded.head_counts.tolist() == [2, 4] and loaded.neuron_counts.tolist() == [4, 8]
    assert [p.sum(1).tolist() for p in loaded.present()] == [[2, 4], [4, 8]]


def test_padding_cannot_be_kept():
    masks = ragged()
    with pytest.raises(ValueError, match="keeps head 2 of layer 0, which has only 2 heads"):
        PruningMasks(masks.head_mask | torch.tensor([[False, False, True, False]] * 2), masks.neuron_mask,
                     head_counts=masks.head_counts)
    with pytest.raises(ValueError, match="neuron_counts"):
        PruningMasks(masks.head_mask, masks.neuron_mask, neuron_counts=torch.tensor([4, 9]))


def test_uniform_masks_file_of_main_loads_unchanged(tmp_path):
    masks = PruningMasks.load(UNIFORM_FILE)
    assert masks.head_counts is None and masks.neuron_counts is None
    masks.check_fits(tiny_model("bert").config)
    assert masks.heads_per_layer() == [3, 4, 0] and masks.neurons_per_layer() == [48, 32, 48]
    masks.save(tmp_path / "again.safetensors")  # and is written as main wrote it
    again, original = load_file(tmp_path / "again.safetensors"), load_file(UNIFORM_FILE)
    assert again.keys() == original.keys() == {"head_mask", "neuron_mask"}
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_masks_without_the_models_counts_do_not_fit():
    from tiny import tiny_swin

    config = tiny_swin().config
    full = PruningMasks.full(config)
    with pytest.raises(ValueError, match=r"its layers have \[2, 2, 4, 4\] heads"):
        PruningMasks(full.head_mask, full.neuron_mask).check_fits(config)


def test_allocate_never_keeps_or_counts_padding():
    """Padding scored highest and costing nothing would be kept first if the search saw it."""
    heads = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
    neurons = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
    units = PruningMasks(torch.tensor([[True, True, False, False], [True] * 4]), torch.tensor([[True, True, False, False], [True] * 4]),
                         head_counts=torch.tensor([2, 4]), neuron_counts=torch.tensor([2, 4]))
    head_macs, neuron_macs = torch.tensor([10.0, 20.0]), torch.tensor([1.0, 2.0])
    dense = 2 * 10 + 4 * 20 + 2 * 1 + 4 * 2
    masks = allocate(heads, neurons, MacCosts(head_macs, neuron_macs), dense, units=units)
    assert masks.head_mask.tolist() == units.head_mask.tolist()  # the whole budget keeps every real unit, no padding
    masks = allocate(heads, neurons, MacCosts(head_macs, neuron_macs), 0.5 * dense, units=units)
    kept = float((masks.head_mask.sum(1) * head_macs).sum() + (masks.neuron_mask.sum(1) * neuron_macs).sum())
    assert kept <= 0.5 * dense and not masks.head_mask[0, 2:].any() and not masks.neuron_mask[0, 2:].any()
    assert masks.head_counts.tolist() == [2, 4]


@pytest.mark.parametrize("value, dtype", [(0.5, torch.float32), (2, torch.int64), (float("nan"), torch.float32), (255, torch.uint8)])
def test_a_mask_holding_anything_but_0_and_1_is_refused(value, dtype):
    # a cast to bool would read it as "kept": a corrupt masks file would load as another model, silently
    head = torch.ones(3, 4, dtype=dtype)
    head[1, 2] = value
    with pytest.raises(ValueError, match=rf"head_mask holds {value} \({dtype}\); a mask holds only 0 \(pruned\) and 1 \(kept\)"):
        PruningMasks(head, torch.ones(3, 48))
    assert PruningMasks(torch.ones(3, 4, dtype=dtype), torch.zeros(3, 48)).head_mask.all()  # 0/1 of any dtype is fine
