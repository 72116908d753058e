"""CNNs (optin_hf/arch/resnet.py, convnext.py): what is their own (the bottleneck's pair cost, the repairs they take,
the layouts refused, the digits-resnet default). What every family does (geometry, MACs, slim == masked, save and
reload, the fast engine's fallback) is tests/test_conformance.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetConfig, ResNetForImageClassification

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.allocate import allocate
from optin_hf.arch import check_model
from optin_hf.macs import MacCosts
from tiny import FAMILIES, flop_macs, tiny_cnn
from tiny import random_images as images

SETTINGS = FAMILIES["resnet"].settings
CNNS = ["resnet", "convnext"]


@pytest.mark.parametrize("family", CNNS)
def test_a_seq_len_other_than_its_image_size_is_refused(family):
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(tiny_cnn(family), seq_len=50)


def test_a_bottleneck_pair_cost_makes_the_budget_exact():
    """Kept heads x kept neurons of a layer pay the 3x3 conv: the search costs each split exactly."""
    heads, neurons = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    one, pair = torch.tensor([1.0]), torch.tensor([10.0])
    masks = allocate(heads, neurons, MacCosts(one, one, pair=pair), budget=26.0)
    kept_heads, kept_neurons = int(masks.head_mask.sum()), int(masks.neuron_mask.sum())
    assert kept_heads + kept_neurons + 10 * kept_heads * kept_neurons <= 26
    assert (kept_heads, kept_neurons) in ((2, 1), (1, 2))  # 25 MACs; without the pair cost all six fit


def test_basic_blocks_are_refused_with_the_fix():
    """Named by the config field, before the layout check (which blamed the transformers version) and any scoring."""
    model = ResNetForImageClassification(ResNetConfig(layer_type="basic", embedding_size=8, hidden_sizes=[16], depths=[1]))
    with pytest.raises(ValueError, match="layer_type='basic'.*bottleneck"):
        PruningMasks.full(model.config)
    pruner = OptinPruner(OptinConfig(**SETTINGS))
    with pytest.raises(ValueError, match=r"^ResNet layer_type='basic' \(resnet-18/34 style\) is not supported.*layer_type='bottleneck'"):
        pruner.prune_model(model.eval(), images(2, 1))
    assert pruner.scores is None


def test_convnext_stage_lists_that_disagree_with_num_stages_are_refused_naming_the_fields():
    """The encoder builds num_stages stages and its last LayerNorm reads hidden_sizes[-1]: such a model
    cannot run, and the scores would not fit it. Said before scoring, with the fields."""
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_labels=5, image_size=32)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "importance": "magnitude"}))
    with pytest.raises(ValueError, match=r"num_stages=2 but 3 hidden_sizes and 3 depths: give hidden_sizes and depths one entry per stage"):
        pruner.prune_model(ConvNextForImageClassification(config).eval(), images(2, 1))
    assert pruner.scores is None


def test_digits_resnet_default_is_wired_to_32x32_digits_and_a_bottleneck_resnet(monkeypatch):
    """The registry, corpus and trainer of the digits-resnet default, without training for a minute."""
    from optin_hf.tasks.defaults import train
    from optin_hf.tasks.defaults.corpora import CORPORA
    from optin_hf.tasks.defaults.registry import RECIPES
    from optin_hf.tasks.defaults.splits import make_splits
    from optin_hf.tasks.recipes import load_recipe

    recipe = RECIPES["digits-resnet"]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    pixels = splits.test.with_format("torch")[:4]["pixel_values"]
    assert pixels.shape == (4, 1, 32, 32) and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    small = CORPORA[recipe.corpus]()  # the same digits at 8x8: upsampling keeps the split
    assert make_splits(small, recipe.split).test["label"] == splits.test["label"]

    monkeypatch.setattr(train, "_train_loop", lambda model, *args: model.eval())
    model, processor = train.TRAINERS[type(recipe.hparams)](recipe.hparams, splits.train.select(range(8)), corpus.label_names)
    assert processor is None and model.config.layer_type == "bottleneck" and model.config.image_size == 32
    assert check_model(model).default_seq_len(model.config) == 64  # 32x32 -> stem and pooling -> 8x8
    assert count_macs(model) == flop_macs(model.base_model, pixels[:1])
    assert load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "digits-resnet.yaml").default == "digits-resnet"


def test_cli_prunes_digits_resnet_with_its_recipe_settings(monkeypatch):
    """`prune --default digits-resnet` scores, allocates and repairs as its recipe says."""
    from optin_hf.commands import jobs
    from optin_hf.commands.args import build_parser
    from optin_hf.tasks.recipes import load_recipe

    ran = []
    monkeypatch.setattr(jobs, "_finish", ran.append)
    args = build_parser("optin-hf").parse_args(["prune", "--default", "digits-resnet", "--neurons-multiple-of", "1"])
    jobs.RUNNERS["prune"](args)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "digits-resnet.yaml")
    assert ran[0].default == recipe.default == "digits-resnet"
    assert ran[0].optin.to_dict() == recipe.optin.to_dict()
