"""CNNs (optin_hf/arch/resnet.py, convnext.py): channels scored, allocated, slimmed, counted and saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetConfig, ResNetForImageClassification

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.allocate import allocate
from optin_hf.arch import check_model
from optin_hf.engine.run import engine_for
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model
from test_masks import same
from tiny import flop_macs, random_images, scores_by_criterion

SETTINGS = dict(mac_constraint=0.6, reconstruct="none", num_samples=4, batch_size=2, neuron_group_size=8)
FAMILIES = ["resnet", "convnext"]


def tiny_cnn(family: str, seed: int = 0):
    """A tiny trained-looking CNN: random BatchNorm statistics, so eval-mode BatchNorm is not the identity.
    The ResNet's stem is kept narrow so that its fixed MACs leave room for a 0.6 budget."""
    torch.manual_seed(seed)
    if family == "resnet":
        config = ResNetConfig(embedding_size=4, hidden_sizes=[32, 64], depths=[2, 1], num_labels=5, image_size=32)
        model = ResNetForImageClassification(config)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                torch.nn.init.normal_(module.weight, 1.0, 0.2)
                torch.nn.init.normal_(module.bias, 0.0, 0.2)
    else:
        config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], num_labels=5, image_size=32,
                                layer_scale_init_value=0.5)
        model = ConvNextForImageClassification(config)
    return model.eval()


images = random_images


PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def encoder_macs(model) -> float:
    """Torch's count of the encoder's convs and matmuls, in MACs (FLOPs / 2), for one image."""
    return flop_macs(model.base_model, PIXELS[:1])


@pytest.fixture(scope="module")
def scored():
    """Each family's scores by each criterion (optin on the reference engine)."""
    return {
        (family, importance): scores
        for family in FAMILIES
        for importance, scores in scores_by_criterion(tiny_cnn(family), images(4, 1), SETTINGS).items()
    }


def test_blocks_have_their_channel_geometry():
    resnet, convnext = tiny_cnn("resnet"), tiny_cnn("convnext")
    geometry = check_model(resnet).layer_geometry(resnet.config)
    assert [(g.heads, g.head_dim, g.hidden, g.neurons) for g in geometry] == [(8, 1, 32, 8)] * 2 + [(16, 1, 64, 16)]
    assert PruningMasks.full(resnet.config).head_counts.tolist() == [8, 8, 16]
    geometry = check_model(convnext).layer_geometry(convnext.config)
    assert [(g.heads, g.hidden, g.neurons) for g in geometry] == [(0, 8, 32)] * 2 + [(0, 16, 64)]
    assert PruningMasks.full(convnext.config).head_mask.shape == (3, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_count_macs_equals_the_flop_counter_dense_and_slim(family):
    model = tiny_cnn(family)
    assert count_macs(model) == encoder_macs(model)
    masks = PruningMasks.full(model.config)
    if family == "resnet":
        masks.head_mask[0] = False  # a block whose 3x3 conv reads no channel
        masks.head_mask[2, [1, 4, 5]] = False
        masks.neuron_mask[1, 1:] = False
    masks.neuron_mask[0, 3:] = False
    masks.neuron_mask[2] = False  # and one that keeps no mid channel
    slim_model(model, masks)
    assert count_macs(model) == encoder_macs(model)
    with pytest.raises(ValueError, match="follow its image size"):
        count_macs(model, seq_len=50)


def test_a_bottleneck_pair_cost_makes_the_budget_exact():
    """Kept heads x kept neurons of a layer pay the 3x3 conv: the search costs each split exactly."""
    heads, neurons = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    one, pair = torch.tensor([1.0]), torch.tensor([10.0])
    masks = allocate(heads, neurons, one, one, budget=26.0, pair_macs=pair)
    kept_heads, kept_neurons = int(masks.head_mask.sum()), int(masks.neuron_mask.sum())
    assert kept_heads + kept_neurons + 10 * kept_heads * kept_neurons <= 26
    assert (kept_heads, kept_neurons) in ((2, 1), (1, 2))  # 25 MACs; without the pair cost all six fit


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fast_engine_falls_back_to_the_reference_one(family):
    model = tiny_cnn(family)
    assert engine_for(model, check_model(model), OptinConfig(engine="fast")) == "reference"


@pytest.mark.parametrize("importance", ["optin", "magnitude", "random"])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_allocate_slim_save_load(family, importance, scored, tmp_path):
    model = tiny_cnn(family)
    scores = scored[family, importance]
    full = PruningMasks.full(model.config)
    assert scores.head_scores.shape == full.head_mask.shape and scores.neuron_scores.shape == full.neuron_mask.shape
    heads_present, neurons_present = full.present()
    assert scores.neuron_scores[neurons_present].all() and not scores.neuron_scores[~neurons_present].any()
    assert scores.head_scores[heads_present].all()
    pruner = OptinPruner(OptinConfig(importance=importance, neurons_multiple_of=1, **SETTINGS))
    masks = pruner.compute_masks(model, scores=scores)
    assert (masks.heads_per_layer(), masks.neurons_per_layer()) != (full.heads_per_layer(), full.neurons_per_layer())

    dense = count_macs(model)
    with apply_masks(model, check_model(model), masks.head_mask.float(), masks.neuron_mask.float()), torch.no_grad():
        masked = model(pixel_values=PIXELS).logits
    pruner.prune_model(model, masks=masks)
    with torch.no_grad():
        slim = model(pixel_values=PIXELS).logits
    assert (slim - masked).abs().max() < 1e-4
    macs = count_macs(model)
    assert macs == encoder_macs(model)
    assert 0.98 * 0.6 * dense <= macs <= 0.6 * dense

    pruner.save(model, tmp_path / family)
    loaded = AutoOptinModel.from_pretrained(tmp_path / family)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=PIXELS).logits, slim)
    assert same(PruningMasks.load(tmp_path / family / "optin_masks.safetensors"), masks)


@pytest.mark.parametrize(("family", "fix"), [("resnet", "'batchnorm'"), ("convnext", "'none'")])
def test_reconstruction_is_refused_before_scoring(family, fix):
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, reconstruct="weights"))
    with pytest.raises(ValueError, match=rf"{family} adapter does not give: prune it with OptinConfig\(reconstruct={fix}"):
        pruner.prune_model(tiny_cnn(family), images(2, 1))
    assert pruner.scores is None


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
    """`prune --default digits-resnet` scores and repairs (BatchNorm means) as its recipe does (a refit would be refused)."""
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
