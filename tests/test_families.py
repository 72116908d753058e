"""The whole path of issue 14, for every family it added (resnet, convnext, swin, segformer,
mask2former), on the tiny models their own test modules build: each criterion's MACs meet
budgets of 0.8 / 0.6 / 0.5 within 2%, asking for the fast engine gives the reference scores,
a pruned model pushed to the Hub loads back from a full and from a masks-only repo, and the CLI
prunes and reports an image classifier.

What a family's module already asserts at 0.6 (slim == masked, count_macs == FLOP counter,
save -> load identical) is not repeated here."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import create_repo, list_repo_files, upload_folder
from hub_server import FakeHub
from torch import nn

import test_cnn
import test_mask2former
import test_segformer
import test_swin
from optin_hf import AutoOptinModel, ImportanceScores, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.commands.__main__ import main
from optin_hf.criteria import BUILTIN_CRITERIA
from optin_hf.hooks import apply_masks
from tiny import ARCHS, calibration, tiny_model

CRITERIA = ("optin", "magnitude", "random")
CONSTRAINTS = (0.8, 0.6, 0.5)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run far faster on one thread


def _same_attention(model: nn.Module) -> None:
    """Eager attention wherever the family has it: loads default to sdpa, which rounds differently."""
    model.config._attn_implementation = "eager"


@dataclass(frozen=True)
class Family:
    """A family's tiny model and data, as its own test module builds them."""

    build: Callable[[], nn.Module]
    images: Callable[[int, int], list[dict[str, torch.Tensor]]]
    pixels: torch.Tensor  # [3, channels, height, width]
    settings: dict
    eager: Callable[[nn.Module], None] = _same_attention


FAMILIES = {
    "resnet": Family(lambda: test_cnn.tiny_cnn("resnet"), test_cnn.images, test_cnn.PIXELS, test_cnn.SETTINGS),
    "convnext": Family(lambda: test_cnn.tiny_cnn("convnext"), test_cnn.images, test_cnn.PIXELS, test_cnn.SETTINGS),
    "swin": Family(test_swin.tiny_swin, test_swin.images, test_swin.PIXELS, test_swin.SETTINGS),
    "segformer": Family(test_segformer.tiny_segformer, test_segformer.images, test_segformer.PIXELS, test_segformer.SETTINGS),
    "mask2former": Family(test_mask2former.tiny_mask2former, test_mask2former.images, test_mask2former.PIXELS,
                          test_mask2former.SETTINGS, test_mask2former.eager),
}


def outputs(model: nn.Module, family: Family) -> list[torch.Tensor]:
    """Every tensor of the model's output on the family's pixels (Mask2Former's class and mask logits, and the rest)."""
    with torch.no_grad():
        out = model(pixel_values=family.pixels)
    return [value for value in out.values() if isinstance(value, torch.Tensor)]


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruner_for(name: str, importance: str, **changes) -> OptinPruner:
    return OptinPruner(OptinConfig(**{**FAMILIES[name].settings, "importance": importance, **changes}))


@pytest.fixture(scope="module")
def scored() -> dict[tuple[str, str], ImportanceScores]:
    """Each family's scores by each criterion, on the reference engine."""
    out = {}
    for name, family in FAMILIES.items():
        model = family.build()
        for importance in CRITERIA:
            out[name, importance] = pruner_for(name, importance, engine="reference").compute_scores(model, family.images(4, 1))
    return out


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("importance", CRITERIA)
@pytest.mark.parametrize("name", FAMILIES)
def test_macs_meet_the_budget_within_two_percent(name, importance, constraint, scored):
    family = FAMILIES[name]
    model = family.build()
    dense_model, adapter = copy.deepcopy(model), check_model(model)
    # Exact widths: kept in multiples of 8, a tiny ConvNeXt's FFN channels step by 4% of its MACs.
    pruner = pruner_for(name, importance, mac_constraint=constraint, neurons_multiple_of=1)
    masks = pruner.compute_masks(model, scores=scored[name, importance])
    with apply_masks(model, adapter, masks.head_mask.float(), masks.neuron_mask.float()):
        masked = outputs(model, family)
    pruner.prune_model(model, masks=masks)
    for slim, expected in zip(outputs(model, family), masked, strict=True):
        assert (slim - expected).abs().max() < 1e-4

    dense, macs = count_macs(dense_model), count_macs(model)
    # The budget pays for fixed convs that a layer keeping no head no longer runs (SegFormer's spatial reduction).
    unrun = adapter.fixed_macs(dense_model) - adapter.fixed_macs(model)
    assert 0.98 * constraint * dense - unrun <= macs <= constraint * dense


@pytest.mark.parametrize("name", FAMILIES)
def test_asking_for_the_fast_engine_gives_the_reference_scores(name, scored):
    """No new family can run the fast engine's layer pieces: it falls back, with the same result."""
    family = FAMILIES[name]
    fast = pruner_for(name, "optin", engine="fast").compute_scores(family.build(), family.images(4, 1))
    reference = scored[name, "optin"]
    assert torch.equal(fast.head_scores, reference.head_scores)
    assert torch.equal(fast.neuron_scores, reference.neuron_scores)


@pytest.mark.parametrize("name", FAMILIES)
def test_hub_full_and_masks_only_repos_load_the_slim_model(name, hub_server: FakeHub, tmp_path: Path):
    family = FAMILIES[name]
    dense = family.build()
    dense.save_pretrained(tmp_path / "base")
    base_id = create_repo(f"tiny-{name}").repo_id
    upload_folder(repo_id=base_id, folder_path=tmp_path / "base")
    model = type(dense).from_pretrained(base_id).eval()  # name_or_path is the repo id: masks-only can name its base
    family.eager(model)
    pruner = pruner_for(name, "magnitude")
    pruner.prune_model(model, family.images(4, 1))
    expected, slim_size = outputs(model, family), parameters(model)
    assert slim_size < parameters(dense)

    masks_repo = pruner.push_to_hub(model, f"tiny-{name}-optin").repo_url.repo_id
    full_repo = pruner.push_to_hub(model, f"tiny-{name}-optin-full", masks_only=False).repo_url.repo_id
    assert not [file for file in list_repo_files(masks_repo) if file.startswith("model")]
    assert "model.safetensors" in list_repo_files(full_repo)
    for repo_id in (masks_repo, full_repo):
        loaded = AutoOptinModel.from_pretrained(repo_id)
        family.eager(loaded)
        assert type(loaded) is type(model) and loaded.config.optin == model.config.optin
        assert parameters(loaded) == slim_size
        for got, want in zip(outputs(loaded, family), expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("importance", BUILTIN_CRITERIA)
@pytest.mark.parametrize("name", [*ARCHS, *FAMILIES])
def test_every_criterion_scores_every_family(name, importance):
    """Each built-in criterion on each family (issue 24: Fisher failed on all new ones but ResNet): finite scores,
    zero on a narrower layer's padding, some information in every layer that has units, and masks allocated."""
    if name in FAMILIES:
        model, data, settings = FAMILIES[name].build(), FAMILIES[name].images(2, 1), FAMILIES[name].settings
    else:
        model, data, settings = tiny_model(name), calibration(name, n=2), dict(reconstruct="none", neuron_group_size=16)
    pruner = OptinPruner(OptinConfig(**{**settings, "importance": importance, "num_samples": 2, "engine": "reference"}))
    scores = pruner.compute_scores(model, data)
    assert scores.criterion == importance
    present = PruningMasks.full(model.config).present()
    for values, units in zip((scores.head_scores, scores.neuron_scores), present, strict=True):
        assert values.shape == units.shape and torch.isfinite(values).all()
        assert not values[~units].any()
        assert (values[units.any(1)] != 0).any(1).all()
    masks = pruner.compute_masks(model, scores=scores)
    assert masks.neuron_mask.any() and not (masks.neuron_mask & ~present[1]).any()


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """A save_to_disk dataset of 20 3x32x32 images with labels 0..4 (what the CNN and Swin tiny models take)."""
    g = torch.Generator().manual_seed(7)
    folder = tmp_path_factory.mktemp("images") / "data"
    pixels, labels = torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 5, (20,), generator=g)
    datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.tolist()}).save_to_disk(folder)
    return folder


@pytest.mark.parametrize("name, importance", [("resnet", "magnitude"), ("convnext", "random"), ("swin", "optin")])
def test_the_cli_prunes_and_reports_an_image_classifier(name, importance, image_data, tmp_path, capsys):
    """SegFormer's CLI run is tests/test_segmentation.py's; Mask2Former's belongs with its segmentation workflow.
    One criterion per family: the CLI hands each to the same pruner."""
    FAMILIES[name].build().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "model"), "--dataset", str(image_data), "--calibration-split", "train[:8]",
            "--eval-split", "train[8:]", "--num-samples", "4", "--neuron-group-size", "8", "--importance", importance,
            "--reconstruct", "none", "--neurons-multiple-of", "1", "--mac-constraint", "0.6", "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "optin_report.json").read_text())
    assert (report["task"], report["metric"], report["eval_samples"]) == ("image-classification", "accuracy", 12)
    assert report["optin"]["importance"] == importance and 0.588 <= report["ratios"]["macs"] <= 0.6
    assert (out / "optin_report.png").is_file()

    # The reported accuracy is the saved model's, on rows 8..19.
    slim = AutoOptinModel.from_pretrained(out)
    assert type(slim).__name__.endswith("ForImageClassification")
    evaluation = datasets.load_from_disk(image_data).select(range(8, 20)).with_format("torch")[:]
    with torch.no_grad():
        predicted = slim(pixel_values=evaluation["pixel_values"]).logits.argmax(-1)
    accuracy = float((predicted == evaluation["label"]).float().mean())
    assert report["stats"]["pruned"]["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert report["stats"]["pruned"]["heads_per_layer"] == slim.config.optin["heads_per_layer"]

    capsys.readouterr()
    assert main(["evaluate", "--model", str(out)]) == 0
    assert f"accuracy (x100)       {100 * accuracy:.2f}" in capsys.readouterr().out
