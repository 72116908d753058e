import dataclasses
import subprocess
import sys
from typing import ClassVar

import pytest
import torch
from tiny import calibration, tiny_model

from optin_hf import OptinConfig, OptinPruner, register_criterion
from optin_hf.arch import get_adapter, get_submodule
from optin_hf.criteria import CRITERIA
from optin_hf.data import prepare_calibration
from optin_hf.importance import (
    FisherImportance,
    ImportanceScores,
    MagnitudeImportance,
    OptinImportance,
    RandomImportance,
    criterion_from_config,
)
from optin_hf.importance.base import ConfiguredImportance


@pytest.fixture
def registry(monkeypatch):
    """The criterion registry, restored after the test."""
    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))
    return CRITERIA


def test_config_knows_the_criteria_without_importing_them():
    code = (
        "import sys; from optin_hf.config import OptinConfig; "
        "[OptinConfig(importance=name) for name in ('optin', 'magnitude', 'random', 'fisher')]; "
        "print(sorted(m for m in sys.modules if m.startswith('optin_hf.importance')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_criterion_is_built_from_its_config_settings():
    config = OptinConfig(importance="optin", temperature=2.0, lambda_contribution=3.0, md_tokens=24, neuron_group_size=4, faithful=True,
                         max_patch_envelope=10.0, patch_metric_decay=0.5, seed=7)
    assert criterion_from_config(config) == OptinImportance(
        temperature=2.0, lambda_contribution=3.0, md_tokens=24, neuron_group_size=4, faithful=True,
        max_patch_envelope=10.0, patch_metric_decay=0.5,
    )
    assert criterion_from_config(dataclasses.replace(config, importance="random")) == RandomImportance(seed=7)
    assert criterion_from_config(dataclasses.replace(config, importance="magnitude")) == MagnitudeImportance()
    fisher = criterion_from_config(dataclasses.replace(config, importance="fisher"))
    assert isinstance(fisher, FisherImportance) and fisher.needs_grad and fisher.needs_labels
    assert not (OptinImportance.needs_grad or OptinImportance.needs_labels or RandomImportance.needs_grad)


def test_a_criterion_refuses_bad_settings_as_the_config_does():
    with pytest.raises(ValueError, match="temperature=nan must be a finite number"):
        OptinImportance(temperature=float("nan"))
    with pytest.raises(ValueError, match="neuron_group_size=0 must be a positive integer"):
        OptinImportance(neuron_group_size=0)
    with pytest.raises(ValueError, match="seed='1' is a str; expected an integer"):
        RandomImportance(seed="1")


def test_the_criterion_settings_rule_over_the_run_config():
    model, data = tiny_model("bert"), calibration("bert", n=4)
    adapter = get_adapter(model)
    batches = prepare_calibration(data, None, num_samples=4, batch_size=4, max_length=32)
    run = OptinConfig(importance="optin", md_tokens=16, prune_neurons=False)
    with torch.no_grad():
        own = OptinImportance(temperature=1.0, lambda_contribution=2.0, md_tokens=16)(model, adapter, batches, run)
        configured = criterion_from_config(dataclasses.replace(run, temperature=1.0, lambda_contribution=2.0))
        expected = configured(model, adapter, batches, run)
        default = OptinImportance(md_tokens=16)(model, adapter, batches, run)
    assert torch.equal(own.head_scores, expected.head_scores)
    assert not torch.allclose(own.head_scores, default.head_scores)


def test_random_scores_follow_the_criterion_seed():
    model, adapter, run = tiny_model("bert"), get_adapter(tiny_model("bert")), OptinConfig(seed=0)
    one, again, other = (RandomImportance(seed=s)(model, adapter, [], run) for s in (1, 1, 2))
    assert torch.equal(one.head_scores, again.head_scores) and not torch.equal(one.head_scores, other.head_scores)
    assert torch.equal(one.neuron_scores, RandomImportance(seed=1)(model, adapter, [], OptinConfig(seed=5)).neuron_scores)


def test_a_registered_criterion_is_accepted_by_name_and_scores_the_run(registry, tmp_path):
    with pytest.raises(ValueError, match="importance='width' is unknown.*register_criterion"):
        OptinConfig(importance="width")

    @register_criterion("width")
    @dataclasses.dataclass(frozen=True)
    class WidthImportance(ConfiguredImportance):
        """Keeps the last layers: a score that is easy to check in the masks."""

        name: ClassVar[str] = "width"

        def __call__(self, model, adapter, batches, config) -> ImportanceScores:
            layers = len(adapter.layers_of(model))
            rows = torch.arange(1, layers + 1, dtype=torch.float64)[:, None]
            heads, neurons = adapter.num_heads(model.config), adapter.intermediate_size(model.config)
            return ImportanceScores(rows.expand(layers, heads), rows.expand(layers, neurons), self.name)

    config = OptinConfig(importance="width", mac_constraint=0.5, reconstruct="none")
    pruner = OptinPruner(config)
    model = tiny_model("bert")
    masks = pruner.compute_masks(model, calibration("bert", n=4))
    assert pruner.scores.criterion == "width"
    assert masks.neuron_mask[-1].all() and not masks.neuron_mask[0].all()  # the first layer gives way first
    config.save_pretrained(tmp_path)
    assert OptinConfig.from_pretrained(tmp_path).importance == "width"


def test_registering_a_taken_name_or_a_class_without_from_config_is_refused(registry):
    with pytest.raises(ValueError, match="'magnitude' is already registered"):
        register_criterion("magnitude", MagnitudeImportance)
    with pytest.raises(TypeError, match="no from_config"):
        register_criterion("plain", type("Plain", (), {"__call__": lambda self, *args: None}))
    assert "plain" not in registry


@dataclasses.dataclass(frozen=True)
class LayerTiltImportance(ConfiguredImportance):
    """A third-party criterion with a setting of its own (`tilt`) beside a shared one (`seed`): later layers
    score `tilt` times more per layer, so the setting shows in the scores."""

    tilt: float = 1.0
    seed: int = 0

    name: ClassVar[str] = "tilt"

    def __call__(self, model, adapter, batches, config) -> ImportanceScores:
        layers = len(adapter.layers_of(model))
        rows = self.tilt ** torch.arange(layers, dtype=torch.float64)[:, None]
        heads, neurons = adapter.num_heads(model.config), adapter.intermediate_size(model.config)
        return ImportanceScores(rows.expand(layers, heads), rows.expand(layers, neurons), self.name)


def test_a_registered_criterion_takes_its_own_setting_from_importance_options(registry, tmp_path):
    """Its setting needs no OptinConfig field: importance_options carries it (int given for a float is
    normalised), shared settings still come from the config, and optin_config.json keeps it."""
    register_criterion("tilt", LayerTiltImportance)
    config = OptinConfig(importance="tilt", importance_options={"tilt": 3}, seed=5, mac_constraint=0.5, reconstruct="none")
    assert criterion_from_config(config) == LayerTiltImportance(tilt=3.0, seed=5)
    assert isinstance(config.importance_options["tilt"], float)
    pruner = OptinPruner(config)
    pruner.compute_masks(tiny_model("bert"), calibration("bert", n=4))
    assert pruner.scores.head_scores[1, 0] == 3.0 * pruner.scores.head_scores[0, 0]
    config.save_pretrained(tmp_path)
    assert OptinConfig.from_pretrained(tmp_path).importance_options == {"tilt": 3.0}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tlit": 2.0}, "importance='tilt' has no setting 'tlit'; its settings are ['tilt']"),
        ({"seed": 1}, "importance='tilt' has no setting 'seed' (an OptinConfig setting: set it there); its settings are ['tilt']"),
        ({"tilt": "2"}, "importance_options of importance='tilt': tilt='2' is a str; expected a finite number"),
        ({"tilt": True}, "importance_options of importance='tilt': tilt=True is a bool; expected a finite number"),
    ],
)
def test_an_unknown_or_mistyped_importance_option_is_refused_naming_the_criterion(registry, options, message):
    register_criterion("tilt", LayerTiltImportance)
    with pytest.raises(ValueError) as err:
        OptinConfig(importance="tilt", importance_options=options)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="importance='optin' has no setting 'tilt'; its settings are none"):
        OptinConfig(importance="optin", importance_options={"tilt": 2.0})  # options belong to the criterion named
    with pytest.raises(ValueError, match="tilt='2' is a str"):
        LayerTiltImportance(tilt="2")  # built directly, the same check


def scale_layer(model, layer: int, factor: float) -> None:
    """Multiply every weight magnitude scores in one layer (q, k, v, attention out, FFN up and down)."""
    adapter = get_adapter(model)
    block = adapter.layers_of(model)[layer]
    with torch.no_grad():
        for path in (adapter.query, adapter.key, adapter.value, adapter.attn_out, adapter.ffn_up, adapter.ffn_down):
            get_submodule(block, path).weight.mul_(factor)


@pytest.mark.parametrize("importance", ["fisher", "magnitude"])
def test_token_mode_refuses_a_criterion_without_token_scores_before_scoring(importance):
    """prune_tokens=True needs token scores: a criterion that gives none is refused before any forward pass,
    naming the criteria that do."""
    model, forwards = tiny_model("vit"), []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    pruner = OptinPruner(OptinConfig(importance=importance, prune_tokens=True))
    with pytest.raises(ValueError, match=rf"prune_tokens=True needs token scores, and importance='{importance}' gives none: "
                                         r"use importance='optin' or 'random'"):
        pruner.prune_model(model, calibration("vit"))
    assert not forwards and pruner.scores is None


def test_magnitude_scores_are_shares_of_their_layer():
    model = tiny_model("bert")
    scores = MagnitudeImportance()(model, get_adapter(model), [], OptinConfig())
    assert torch.allclose(scores.head_scores.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(scores.neuron_scores.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_scaling_one_layer_does_not_move_the_magnitude_budget():
    # A layer's weight scale is arbitrary (a LayerNorm after it undoes it), so it must not buy that layer units.
    dense, scaled = tiny_model("bert"), tiny_model("bert")
    scale_layer(scaled, 1, 10.0)
    config = OptinConfig(importance="magnitude", mac_constraint=0.5, seq_len=16.0, reconstruct="none")
    before = OptinPruner(config).compute_masks(dense, calibration("bert", n=4))
    after = OptinPruner(config).compute_masks(scaled, calibration("bert", n=4))
    assert not before.head_mask[1].all() or not before.neuron_mask[1].all()  # the cut does reach layer 1
    assert torch.equal(before.head_mask, after.head_mask) and torch.equal(before.neuron_mask, after.neuron_mask)
