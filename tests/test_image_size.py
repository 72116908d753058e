"""MACs from the data: an image model's MACs, tokens and budget follow the size of the images it is calibrated on
(or `count_macs`'s `image_size`), never a config field the user must set (optin_hf/macs.py, the adapters' MAC
methods); the result records that size, so a reload, the model card and the report count where the pruner did."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, count_macs
from optin_hf.hub import card
from optin_hf.result import pruning_result
from optin_hf.tasks.metrics import load_metric
from optin_hf.tasks.report import measure
from optin_hf.tasks.task_data import TaskData, resolve_columns
from tiny import FAMILIES, flop_macs, mask2former_backbone, random_images, tiny_model, tiny_segformer

pytestmark = pytest.mark.usefixtures("one_thread")

# Families whose models run images of any size (ViT and DeiT need their config's: their position embeddings are fixed).
ANY_SIZE = ["swin", "resnet", "convnext", "segformer", "dinov2", "mask2former"]


def encoder(name: str, model):
    """What `count_macs` counts of a family's model (its encoder; Mask2Former's Swin backbone)."""
    return mask2former_backbone(model) if name == "mask2former" else model.base_model


def calibration_side(name: str) -> int:
    return FAMILIES[name].inputs["pixel_values"].shape[-1]


def set_config_size(name: str, model, size) -> None:
    """Make the config state another size than the images (as DINOv2's Hub configs say 518 where 224 is run)."""
    (model.config.backbone_config if name == "mask2former" else model.config).image_size = size


def magnitude_pruner(name: str) -> OptinPruner:
    """The family's test settings, scored by weight magnitude: the size plumbing is what is tested, not scoring."""
    return OptinPruner(OptinConfig(**{**FAMILIES[name].settings, "importance": "magnitude"}))


@pytest.mark.parametrize("name", ANY_SIZE)
def test_count_macs_counts_at_the_image_size_it_is_given(name):
    """At a size other than the config's, and not square, `count_macs` equals torch's FLOP counter on such an image."""
    model = FAMILIES[name].build()
    height, width = (48, 64) if name == "mask2former" else (40, 48)
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    assert count_macs(model, image_size=(height, width)) == flop_macs(encoder(name, model), pixels)
    assert count_macs(model, image_size=(height, width)) != count_macs(model)  # the config's size counts other MACs


@pytest.mark.parametrize("name", ANY_SIZE)
def test_the_budget_is_met_at_the_calibration_images_size_not_the_configs(name):
    """A config that states another size than the images (here twice theirs) no longer moves the budget: the pruned
    model keeps 0.6 of the MACs that the calibration images cost, and records that size."""
    model = FAMILIES[name].build()
    side = calibration_side(name)
    set_config_size(name, model, 2 * side)
    dense = count_macs(model, image_size=side)
    magnitude_pruner(name).prune_model(model, random_images(4, 1, side))
    assert pruning_result(model).config.image_size == [side, side]
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    assert count_macs(model) == flop_macs(encoder(name, model), pixels) <= 0.6 * dense


def test_a_segformer_whose_config_states_no_size_is_counted_and_pruned_from_its_images(tmp_path):
    """Hub SegFormer configs have no image_size: count_macs asks for one, naming how; the pruner takes it from the
    calibration images, and the saved checkpoint (which states none either) reloads counting at that size."""
    model = tiny_segformer()
    del model.config.image_size
    with pytest.raises(ValueError, match=r"states none: pass count_macs\(model, image_size=\(height, width\)\)"):
        count_macs(model)
    pixels = torch.randn(1, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    dense = count_macs(model, image_size=(32, 24))
    assert dense == flop_macs(model.segformer, pixels)
    pruner = magnitude_pruner("segformer")
    pruner.prune_model(model, [{"pixel_values": torch.randn(3, 32, 24, generator=torch.Generator().manual_seed(s))} for s in range(4)])
    pruned = count_macs(model)
    assert pruned == flop_macs(model.segformer, pixels) <= 0.6 * dense
    pruner.save(model, tmp_path)
    assert "image_size" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoOptinModel.from_pretrained(tmp_path)
    loaded.config._attn_implementation = "eager"
    assert count_macs(loaded) == pruned
    assert card._macs(loaded, pruning_result(loaded)) == (dense, pruned)
    text = card.model_card(loaded, "me/x", masks_only=False, base_model=None, base_revision=None).text
    assert f"| encoder MACs per example (32x24 images) | {dense:.4g} | {pruned:.4g} (" in text


def test_a_checkpoint_saved_before_the_size_was_recorded_counts_at_its_configs_size(tmp_path):
    """An optin_config.json without image_size (older checkpoints) still loads; its MACs are the config's size's."""
    name = "swin"
    model, pruner = FAMILIES[name].build(), magnitude_pruner(name)
    pruner.prune_model(model, random_images(4, 1, 32))
    pruned = count_macs(model)
    pruner.save(model, tmp_path)
    saved = tmp_path / "optin_config.json"
    values = json.loads(saved.read_text())
    assert values.pop("image_size") == [32, 32]
    saved.write_text(json.dumps(values))
    loaded = AutoOptinModel.from_pretrained(tmp_path)
    assert pruning_result(loaded).config.image_size is None
    assert count_macs(loaded) == pruned  # the config says 32, as the images did


@pytest.mark.parametrize(("size", "message"), [(0, "not an image size"), ((32,) * 3, "not an image size"),
                                                ("32", "not an image size"), ((32, True), "not an image size")])
def test_a_bad_image_size_is_refused(size, message):
    with pytest.raises(ValueError, match=message):
        count_macs(FAMILIES["resnet"].build(), image_size=size)


def test_a_text_model_takes_no_image_size():
    with pytest.raises(ValueError, match="is for image models: a bert model's MACs follow seq_len"):
        count_macs(tiny_model("bert"), 10, image_size=32)


@pytest.mark.parametrize("size", [[0, 3], [32], [2.0, 3]])
def test_the_config_refuses_a_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        OptinConfig(image_size=size)
    assert OptinConfig(image_size=(24, 32)).image_size == [24, 32] == OptinConfig.from_dict({"image_size": [24, 32]}).image_size


def test_an_image_size_set_in_the_config_is_the_one_counted():
    """OptinConfig(image_size=...) counts there whatever the images' size (as seq_len does for text)."""
    model = FAMILIES["resnet"].build()
    dense = count_macs(model, image_size=64)
    OptinPruner(OptinConfig(**{**FAMILIES["resnet"].settings, "importance": "magnitude", "image_size": [64, 64]})).prune_model(
        model, random_images(4, 1, 32))
    assert pruning_result(model).config.image_size == [64, 64]
    assert count_macs(model) == flop_macs(model.base_model, torch.randn(1, 3, 64, 64)) <= 0.6 * dense


def test_the_report_speaks_of_images(tmp_path):
    """An image model's report says what its MACs were counted at in its own terms, "32x32 images", not a token
    count, and times images of that size: a ResNet config states none, the pruned model's record gives it."""
    model = FAMILIES["resnet"].build()
    del model.config.image_size
    dense = copy.deepcopy(model)
    magnitude_pruner("resnet").prune_model(model, random_images(4, 1, 32))
    data = TaskData("image-classification", None, None, resolve_columns(["image", "label"], "image-classification"), {})
    report = measure({"dense": dense, "pruned": model}, name="tiny", data=data, encoder=None, labels=None,
                     metric=load_metric("accuracy", offline=True), runs=1)
    assert report.image_size == [32, 32] and report.stats["pruned"].macs == count_macs(model)
    assert report.stats["dense"].macs == count_macs(dense, image_size=32)
    assert "MACs at 32x32 images" in report.table() and "tokens" not in report.table()
    report.save(tmp_path)
    assert json.loads((tmp_path / "optin_report.json").read_text())["image_size"] == [32, 32]
