"""What goes on a model card is checked before anything is written or pushed: a card must not publish
a negative speedup, a NaN score or an accuracy of 1.7."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from tiny import ARCHS, calibration, tiny_cnn, tiny_mask2former, tiny_model, tiny_segformer, tiny_swin

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import get_adapter
from optin_hf.hub import card, model_card, push_to_hub, write_repo_folder
from optin_hf.result import pruning_result

METRICS = {"task_type": "text-classification", "dataset_type": "SetFit/bbc-news", "pruned": {"accuracy": 0.8}, "dense": {"accuracy": 0.9}}


@pytest.fixture(scope="module")
def pruned() -> torch.nn.Module:
    model = tiny_model("bert")
    OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct="none")).prune_model(model, calibration("bert"))
    return model


BAD = [
    ({"speedup": -1.0}, r"speedup=-1.0 must be > 0"),
    ({"speedup": 0}, r"speedup=0.0 must be > 0"),
    ({"speedup": math.inf}, r"speedup=inf must be a finite number"),
    ({"speedup": "2x"}, r"speedup='2x' is a str; expected a finite number"),
    ({"metrics": {**METRICS, "pruned": {"accuracy": 1.7}}}, r"metrics\['pruned'\]\['accuracy'\]=1.7 is outside \[0, 1\]"),
    ({"metrics": {**METRICS, "dense": {"accuracy": 85.3}}}, r"metrics\['dense'\]\['accuracy'\]=85.3 is outside \[0, 1\]: give scores as fractions"),
    ({"metrics": {**METRICS, "pruned": {"f1": -0.1}}}, r"metrics\['pruned'\]\['f1'\]=-0.1 is outside \[0, 1\]"),
    ({"metrics": {**METRICS, "pruned": {"mean_iou": 2.0}}}, r"metrics\['pruned'\]\['mean_iou'\]=2.0 is outside \[0, 1\]"),
    ({"metrics": {**METRICS, "pruned": {"matthews_correlation": -1.5}}}, r"\['matthews_correlation'\]=-1.5 is outside \[-1, 1\]"),
    ({"metrics": {**METRICS, "pruned": {"accuracy": math.nan}}}, r"metrics\['pruned'\]\['accuracy'\]=nan must be a finite number"),
    ({"metrics": {**METRICS, "pruned": {"loss": math.nan}}}, r"metrics\['pruned'\]\['loss'\]=nan must be a finite number"),
    ({"metrics": {**METRICS, "pruned": {"accuracy": "0.8"}}}, r"metrics\['pruned'\]\['accuracy'\]='0.8' is a str; expected a finite number"),
    ({"metrics": {**METRICS, "pruned": {"accuracy": True}}}, r"metrics\['pruned'\]\['accuracy'\]=True is a bool"),
    ({"metrics": {**METRICS, "pruned": {}}}, r"metrics\['pruned'\] is empty"),
    ({"metrics": {**METRICS, "pruned": [0.8]}}, r"metrics\['pruned'\]=\[0.8\] is a list; expected a mapping"),
    ({"metrics": {**METRICS, "dataset_spilt": "test"}}, r"metrics has unknown keys \['dataset_spilt'\]"),
    ({"metrics": {**METRICS, "dataset_type": 5}}, r"metrics\['dataset_type'\]=5 is an int; expected a string"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_a_card_refuses_a_value_it_would_publish_wrong(pruned, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_card(pruned, "me/x", masks_only=False, base_model=None, base_revision=None, **kwargs)


@pytest.mark.parametrize("kwargs, message", [BAD[0], BAD[4], BAD[9]])
def test_a_refused_card_writes_no_folder(pruned, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_repo_folder(pruned, tmp_path / "repo", "me/x", masks_only=False, **kwargs)
    assert not (tmp_path / "repo").exists()


def test_a_refused_card_creates_no_repo(pruned, hub_server: FakeHub):
    with pytest.raises(ValueError, match=r"speedup=nan must be a finite number"):
        push_to_hub(pruned, "tiny-optin", masks_only=False, speedup=math.nan)
    assert not hub_server.repos  # refused before anything was created


def test_valid_values_reach_the_card(pruned, tmp_path: Path):
    metrics = {**METRICS, "pruned": {"accuracy": 0.8, "matthews_correlation": -0.2, "loss": 3.5}}
    card = model_card(pruned, "me/x", masks_only=False, base_model=None, base_revision=None, metrics=metrics, speedup=1.5)
    assert "| measured speedup | 1.00x | 1.50x |" in card.text
    assert "| matthews_correlation on SetFit/bbc-news |  | -0.2 |" in card.text


DENSE = {
    **{arch: partial(tiny_model, arch) for arch in ARCHS},
    "swin": tiny_swin,
    "resnet": partial(tiny_cnn, "resnet"),
    "convnext": partial(tiny_cnn, "convnext"),
    "segformer": tiny_segformer,
    "mask2former": tiny_mask2former,
}


@pytest.mark.parametrize("name", DENSE)
def test_the_cards_dense_macs_are_those_of_the_dense_model(name):
    """The card counts the dense base from the slim model: every unit back, and the shared attention of a layer
    that keeps no head (SegFormer's spatial-reduction conv, which the slim model no longer runs)."""
    model = DENSE[name]()
    seq_len = get_adapter(model).default_seq_len(model.config) or 12
    dense = count_macs(model, seq_len)
    full = PruningMasks.full(model.config)
    g = torch.Generator().manual_seed(0)
    heads = full.head_mask & (torch.rand(full.head_mask.shape, generator=g) > 0.4)
    neurons = full.neuron_mask & (torch.rand(full.neuron_mask.shape, generator=g) > 0.5)
    neurons[:, 0] = True
    if name == "segformer":
        heads[0] = False  # its first layer reduces keys and values by a conv that serves every head
    pruner = OptinPruner(OptinConfig(seq_len=seq_len, reconstruct="none"))
    pruner.prune_model(model, masks=full.with_masks(heads, neurons))
    assert card._macs(model, pruning_result(model)) == (dense, count_macs(model, seq_len))
    text = model_card(model, "me/x", masks_only=True, base_model=None, base_revision=None).text
    unit = "images" if get_adapter(model).is_vision else "tokens"  # the model's own terms: 16x16 images, 12.0 tokens
    assert f"{unit}) | {dense:.4g} | {count_macs(model, seq_len):.4g} (" in text
