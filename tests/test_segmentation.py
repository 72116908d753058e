"""Semantic segmentation as a task: the per-pixel KL, mean IoU, the CLI's `--task
semantic-segmentation` with its report panel, and the digit-scenes default's scenes."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch

from optin_hf import AutoOptinModel
from optin_hf.commands.__main__ import main
from optin_hf.losses import KLOutputs, kl_loss
from optin_hf.tasks.metrics import load_metric, mean_iou
from optin_hf.tasks.task_data import MaskEncoder
from tiny import tiny_segformer


def test_kl_of_segmentation_logits_is_the_per_pixel_kl_averaged_over_pixels():
    g = torch.Generator().manual_seed(0)
    dense, masked = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    expected = 0.0
    for n in range(2):
        per_pixel = []
        for y in range(2):
            for x in range(4):
                p, q = dense[n, :, y, x].double().softmax(0), masked[n, :, y, x].double().softmax(0)
                per_pixel.append(float((p * (p / q).log()).sum()))
        expected += sum(per_pixel) / len(per_pixel)
    kl = lambda d, m, t: kl_loss([KLOutputs.of(d)], [KLOutputs.of(m)], t)  # noqa: E731
    assert math.isclose(float(kl(dense, masked, 4.0)), 16 * expected, rel_tol=1e-12)
    # a one-pixel map is a classification example: the same number as [examples, classes] logits
    flat = kl(dense[:, :, 0, 0], masked[:, :, 0, 0], 2.0)
    assert math.isclose(float(kl(dense[:, :, :1, :1], masked[:, :, :1, :1], 2.0)), float(flat), rel_tol=1e-12)
    assert float(kl(dense, dense, 4.0)) == pytest.approx(0.0, abs=1e-12)


def test_mean_iou_on_a_hand_example():
    prediction = [np.array([[0, 0, 1], [1, 2, 2]]), np.array([[3, 3]])]
    label = [np.array([[0, 1, 1], [1, 2, 255]]), np.array([[3, 0]])]
    # class 0: pred {a00, a01, b01? no: b = [3, 3]} -> pred 0 at a00, a01; label 0 at a00, b01 -> I 1, U 3
    # class 1: pred a02, a10; label a01, a02, a10 -> I 2, U 3; class 2: pred a11 (a12 ignored); label a11 -> I 1, U 1
    # class 3: pred b00, b01; label b00 -> I 1, U 2
    values = mean_iou(prediction, label)
    assert values["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 2) / 4)
    assert values["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 1) / 4)
    assert values["overall_accuracy"] == pytest.approx(5 / 7)
    # a class in neither prediction nor label takes no part; a class only predicted counts as IoU 0
    assert mean_iou(prediction, label, num_labels=9)["mean_iou"] == values["mean_iou"]
    assert mean_iou([np.array([[4]])], [np.array([[0]])])["mean_iou"] == 0.0
    metric = load_metric("mean_iou", offline=True)
    assert metric.per_pixel and metric.main == "mean_iou" and "local" in metric.source
    assert metric.compute(prediction, label) == values


def test_mask_encoder_reduces_labels_as_the_processor_does():
    class Reducing:
        do_reduce_labels = True

    mask = np.array([[0, 1], [150, 255]])
    assert MaskEncoder(Reducing())([mask])[0].tolist() == [[255, 0], [149, 255]]
    assert MaskEncoder()([mask])[0].tolist() == mask.tolist()
    with pytest.raises(ValueError, match="2-D class map"):
        MaskEncoder()([np.zeros((2, 2, 3))])


@pytest.fixture(scope="module")
def segmentation_workspace(tmp_path_factory):
    """A tiny SegFormer whose decode head is set to predict 'bright pixel = class 1', and a
    save_to_disk dataset of images with their masks."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seg")
    model = tiny_segformer()
    model.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(3)
    images = torch.rand(24, 3, 32, 32, generator=g)
    masks = (images.mean(0).mean(0) > 0.5).long()[None].expand(24, -1, -1).clone()
    masks[:, :2] = 255  # ignored rows
    masks[::3, 5:9, 5:9] = 2
    datasets.Dataset.from_dict({"pixel_values": images.numpy(), "label": masks.numpy()}).save_to_disk(root / "data")
    return root


def test_the_cli_prunes_and_evaluates_a_segmentation_model(segmentation_workspace, tmp_path, capsys):
    root, out = segmentation_workspace, tmp_path / "out"
    args = ["prune", "--model", str(root / "model"), "--dataset", str(root / "data"), "--task", "semantic-segmentation",
            "--calibration-split", "train[:8]", "--eval-split", "train[8:]", "--num-samples", "4", "--importance", "magnitude",
            "--reconstruct", "none", "--neurons-multiple-of", "1", "--mac-constraint", "0.6", "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "optin_report.json").read_text())
    assert report["task"] == "semantic-segmentation" and report["metric"] == "mean_iou" and report["eval_samples"] == 16
    dense, pruned = report["stats"]["dense"]["metrics"], report["stats"]["pruned"]["metrics"]
    assert set(dense) == {"mean_iou", "mean_accuracy", "overall_accuracy"} and 0 < dense["mean_iou"] <= 1
    assert dense != pruned
    assert 0.55 <= report["ratios"]["macs"] <= 0.6
    assert (out / "optin_segmentation.png").stat().st_size > 10_000 and (out / "optin_report.png").is_file()
    loaded = AutoOptinModel.from_pretrained(out)
    assert type(loaded).__name__ == "SegformerForSemanticSegmentation"

    capsys.readouterr()
    assert main(["evaluate", "--model", str(out)]) == 0
    assert "mean_iou (x100)" in capsys.readouterr().out
    assert main(["prune", *args[1:-2], "--metric", "accuracy", "--output", str(tmp_path / "other")]) == 1
    assert "does not fit the task semantic-segmentation" in capsys.readouterr().err


def test_digit_scenes_hold_2_to_4_labelled_digits_and_test_digits_are_held_out():
    from optin_hf.tasks.defaults.scenes import CANVAS, INK, read_digit_scenes
    from optin_hf.tasks.defaults.splits import SplitSpec

    corpus = read_digit_scenes(train=40, calibration=8, test=20)
    spec = SplitSpec(test_size=300, calibration_size=100)
    splits = corpus.splits(spec)
    assert [len(splits.train), len(splits.calibration), len(splits.test)] == [40, 8, 20]
    test = splits.test.with_format("numpy")[:]
    assert test["pixel_values"].shape == (20, 1, CANVAS, CANVAS) and test["label"].shape == (20, CANVAS, CANVAS)
    for image, label in zip(test["pixel_values"][:, 0], test["label"]):
        assert set(np.unique(label)) <= set(range(11)) and (label > 0).any()
        assert ((label > 0) == (image >= INK)).all()  # every ink pixel labelled, background elsewhere
    pools = corpus.pools(spec)
    images = {part: {corpus.images[i].tobytes() for i in index} for part, index in pools.items()}
    assert not images["test"] & (images["train"] | images["calibration"])  # distinct images (duplicates were removed)
    for part, split in (("test", splits.test), ("train", splits.train)):
        for ids, image in zip(split["digit_ids"], split.with_format("numpy")[:]["pixel_values"][:, 0]):
            assert 2 <= len(ids) <= 4 and set(ids) <= set(pools[part])  # each scene's digits from its split's own pool
            assert int((image > 0).sum()) == sum(int((corpus.images[i] > 0).sum()) * 4 for i in ids)  # all drawn, none overlap
