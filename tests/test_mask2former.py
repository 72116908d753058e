"""Mask2Former (optin_hf/arch/mask2former.py): what is its own (the Swin backbone's blocks are the layers, the KL's
semantic map, the backbones refused, the CLI's segmentation run); the pixel decoder and the transformer decoder stay
dense. What every family does (geometry, MACs, slim == masked, save and reload, the fast engine's fallback) is
tests/test_conformance.py's."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    ResNetConfig,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks
from optin_hf.arch import check_model
from optin_hf.arch.mask2former import semantic_logits
from optin_hf.commands.__main__ import main
from optin_hf.tasks import workflow
from optin_hf.tasks.metrics import mean_iou
from optin_hf.tasks.report import class_maps, predicted_logits
from tiny import FAMILIES, MASK2FORMER_DECODER as DECODER, MASK2FORMER_PIXELS as PIXELS, flop_macs, tiny_mask2former
from tiny import mask2former_backbone as backbone, mask2former_eager as eager

SETTINGS = FAMILIES["mask2former"].settings
images = FAMILIES["mask2former"].examples


def test_the_backbone_blocks_are_the_layers():
    model = tiny_mask2former()
    blocks = [block for stage in backbone(model).swin.encoder.layers for block in stage.blocks]
    assert list(check_model(model).layers_of(model)) == blocks


def test_the_kl_logits_are_the_semantic_map_of_the_post_processing():
    """The argmax of `semantic_logits` is transformers' semantic segmentation (at 384x384, the size the
    post-processing resizes the masks to, so that it resizes nothing here)."""
    g = torch.Generator().manual_seed(0)
    classes, masks = torch.randn(2, 6, 5 + 1, generator=g) * 3, torch.randn(2, 6, 384, 384, generator=g) * 3
    output = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=classes, masks_queries_logits=masks)
    expected = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(output)
    logits = semantic_logits(classes, masks)
    assert logits.shape == (2, 5, 384, 384)
    assert torch.equal(logits.argmax(1), torch.stack(expected))

    model = tiny_mask2former()
    with torch.no_grad():
        out = model(pixel_values=PIXELS)
    adapter = check_model(model)
    assert torch.equal(adapter.logits_of(out), semantic_logits(out.class_queries_logits, out.masks_queries_logits))
    with torch.no_grad():
        assert adapter.logits_of(model.model(pixel_values=PIXELS)) is None  # the bare model predicts no classes


def test_the_refit_changes_the_backbone_only():
    """The refit fits the backbone blocks' output projections; the pixel decoder and the transformer decoder, which
    the budget does not count, keep their weights."""
    model = tiny_mask2former()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("model.pixel_level_module.encoder.")}
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "importance": "magnitude", "reconstruct": "weights"}))
    pruner.prune_model(model, images(4, 1))
    assert pruner.reconstruction.tensors and all(key.startswith("layers.") for key in pruner.reconstruction.tensors)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_a_backbone_that_is_not_swin_is_refused():
    torch.manual_seed(0)
    config = Mask2FormerConfig(backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]), **DECODER)
    with pytest.raises(ValueError, match="prunes the Swin backbone of a Mask2Former, and this one's backbone is 'resnet'"):
        PruningMasks.full(config)
    with pytest.raises(ValueError, match="backbone is 'resnet'"):
        OptinPruner(OptinConfig(**{**SETTINGS, "importance": "random"})).compute_scores(
            Mask2FormerForUniversalSegmentation(config).eval(), images(2, 1)
        )


def ade_like_split(n: int, seed: int) -> datasets.Dataset:
    """Scenes shaped as scene_parse_150's: RGB images of varied sizes, `annotation` maps of ids 0..5 (0 = unlabelled,
    1..5 = the model's classes 0..4) in blocks of 8 pixels, and a `scene_category`."""
    g = np.random.default_rng(seed)
    images, annotations = [], []
    for _ in range(n):
        height, width = g.integers(40, 80, 2)
        blocks = g.integers(0, 6, (height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
        images.append(PIL.Image.fromarray(g.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        annotations.append(PIL.Image.fromarray(blocks.astype(np.uint8)))
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.ClassLabel(names=["a", "b"])}
    )
    return datasets.Dataset.from_dict({"image": images, "annotation": annotations, "scene_category": [0] * n}, features=features)


def test_the_cli_prunes_a_mask2former_checkpoint_end_to_end(tmp_path, monkeypatch, capsys):
    """A local Mask2Former with its processor (which, as ADE20K's, does not reduce labels) and a local dataset with
    train/validation splits: `optin prune --reduce-labels` -> slim checkpoint, report and panel; the loaded checkpoint
    is the pruned model; `optin evaluate` measures it again from the recorded data."""
    torch.set_num_threads(1)
    model = tiny_mask2former()
    model.save_pretrained(tmp_path / "model")
    processor = Mask2FormerImageProcessorPil(size={"height": 64, "width": 64}, do_reduce_labels=False, ignore_index=255, num_labels=5)
    processor.save_pretrained(tmp_path / "model")
    validation = ade_like_split(5, seed=2)
    datasets.DatasetDict({"train": ade_like_split(6, seed=1), "validation": validation}).save_to_disk(tmp_path / "data")
    measured = {}
    measure = workflow.measure
    monkeypatch.setattr(workflow, "measure", lambda models, **kw: measured.update(models) or measure(models, **kw))

    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--num-samples", "4",
            "--importance", "magnitude", "--reconstruct", "none", "--neurons-multiple-of", "1", "--reduce-labels",
            "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "optin_report.json").read_text())
    assert (report["task"], report["metric"], report["eval_samples"]) == ("semantic-segmentation", "mean_iou", 5)
    assert report["data"]["dataset"]["reduce_labels"] is True
    dense_model, pruned_model = measured["dense"], measured["pruned"]
    assert type(dense_model) is Mask2FormerForUniversalSegmentation  # inferred from its config: universal segmentation

    # mIoU against the reduced maps (0 -> ignored, k -> k - 1), from the semantic map the KL compares
    pixels = processor(images=[row["image"] for row in validation], return_tensors="pt")["pixel_values"]
    references = [np.where(a == 0, 255, a - 1) for a in (np.asarray(row["annotation"], dtype=np.int64) for row in validation)]
    for name, slim in (("dense", dense_model), ("pruned", pruned_model)):
        expected = mean_iou(class_maps(predicted_logits(slim, {"pixel_values": pixels}), references), references)
        assert report["stats"][name]["metrics"] == pytest.approx(expected, abs=1e-12)

    loaded = AutoOptinModel.from_pretrained(out)
    assert type(loaded) is Mask2FormerForUniversalSegmentation
    with torch.no_grad():
        mine, theirs = pruned_model(pixel_values=pixels), loaded(pixel_values=pixels)
    assert torch.equal(mine.class_queries_logits, theirs.class_queries_logits)
    assert torch.equal(mine.masks_queries_logits, theirs.masks_queries_logits)

    # MACs and latency at the processor's 64x64 (the backbone config said 48): the backbone's FLOP count there
    assert report["seq_len"] == (64 // 4) ** 2
    assert dense_model.config.backbone_config.image_size == (64, 64)
    eager(pruned_model)
    assert report["stats"]["pruned"]["macs"] == flop_macs(backbone(pruned_model), torch.zeros(1, 3, 64, 64))
    assert 0.98 * 0.6 <= report["ratios"]["macs"] <= 0.6
    assert (out / "optin_segmentation.png").stat().st_size > 10_000 and (out / "optin_report.png").is_file()

    measured.clear()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out)]) == 0  # the recorded data, reduce_labels included
    assert f"{100 * report['stats']['pruned']['metrics']['mean_iou']:.2f}" in capsys.readouterr().out
