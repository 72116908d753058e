"""The scoring time estimate and budget: `optin_hf/engine/estimate.py`, its use by the pruner and the CLI."""

import argparse

import pytest
import torch
from tiny import calibration, random_images, tiny_model

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import get_adapter
from optin_hf.commands import jobs as commands_jobs
from optin_hf.commands.__main__ import main
from optin_hf.commands.args import parse_duration
from optin_hf.engine.estimate import (
    MAX_NEURON_GROUP, MIN_SAMPLES, DenseTiming, layer_units, pick_setting, scoring_cost, scoring_ladder,
)
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.importance.optin import OptinImportance


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("600", 600), ("2.5", 2.5), (" 10M ", 600)])
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "ten minutes", "0", "-5s", "inf", "nan", "10mm"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a positive duration"):
        parse_duration(text)


def test_cli_gives_one_error_line_for_a_bad_duration(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--max-scoring-time", "10x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--max-scoring-time" in lines[0] and "'10x'" in lines[0]


def test_cli_budget_replaces_the_embedded_sizing(monkeypatch):
    jobs = []
    monkeypatch.setattr(commands_jobs, "_finish", jobs.append)
    assert main(["prune", "--default", "bbc-news", "--max-scoring-time", "1m"]) == 0
    assert main(["prune", "--default", "bbc-news", "--max-scoring-time", "1m", "--num-samples", "40"]) == 0
    assert main(["prune", "--default", "bbc-news"]) == 0
    budget, given, embedded = (job.optin for job in jobs)
    assert (budget.max_scoring_time, budget.num_samples, budget.neuron_group_size) == (60.0, 128, 1)
    assert (given.num_samples, given.neuron_group_size) == (40, 1)
    assert embedded.max_scoring_time is None and embedded.neuron_group_size == 64


@pytest.mark.parametrize("value", [0, -1, "10m", True, float("nan")])
def test_config_refuses_a_budget_that_is_not_positive_seconds(value):
    with pytest.raises(ValueError, match="max_scoring_time"):
        OptinConfig(max_scoring_time=value)
    assert OptinConfig(max_scoring_time=90).max_scoring_time == 90.0


def test_ladder_coarsens_neurons_first_then_drops_examples():
    ladder = scoring_ladder(64, 1, 1536)
    assert ladder[:8] == [(64, 1), (64, 2), (64, 4), (64, 8), (64, 16), (64, 32), (64, 64), (64, 128)]
    assert ladder[8:] == [(n, MAX_NEURON_GROUP) for n in range(63, MIN_SAMPLES - 1, -1)]
    assert scoring_ladder(16, 3, 48) == [(16, 3), (16, 4), (16, 8), (16, 16), (16, 32), (16, 64)] + [(n, 64) for n in range(15, 7, -1)]
    assert scoring_ladder(6, 256, 3072) == [(6, 256)]  # never finer than asked, never more examples
    assert scoring_ladder(10, 1, None) == [(n, 1) for n in range(10, 7, -1)]  # neurons not scored


def fake_seconds(samples: int, group: int) -> float:
    """12 heads and 1536 neurons over 6 layers, 0.01 s a candidate and example."""
    return 0.01 * samples * 6 * (12 + -(-1536 // group))


@pytest.mark.parametrize("budget", [1e6, 600.0, 60.0, 20.0, 10.0, 1.0])
def test_picker_takes_the_finest_setting_of_the_ladder_that_fits(budget):
    ladder = scoring_ladder(128, 1, 1536)
    samples, group, estimate, fits = pick_setting(ladder, fake_seconds, budget)
    assert estimate == fake_seconds(samples, group)
    chosen = ladder.index((samples, group))
    assert all(fake_seconds(*finer) > budget for finer in ladder[:chosen])
    if fits:
        assert estimate <= budget
    else:
        assert (samples, group) == (MIN_SAMPLES, MAX_NEURON_GROUP) and estimate > budget


def test_picker_keeps_all_examples_while_coarser_neurons_fit():
    assert pick_setting(scoring_ladder(128, 1, 1536), fake_seconds, 900.0)[:2] == (128, 16)
    assert pick_setting(scoring_ladder(128, 1, 1536), fake_seconds, 30.0)[:2] == (20, 128)
    assert pick_setting(scoring_ladder(128, 1, 1536), fake_seconds, 1e9)[:2] == (128, 1)


@pytest.mark.parametrize("settings", [{"neuron_group_size": 5}, {"prune_heads": False, "mac_constraint": 0.8}, {"prune_neurons": False},
                                      {"neuron_group_size": 64, "engine": "reference"}])
def test_estimate_counts_the_candidates_the_engine_runs(settings, monkeypatch):
    model, data = tiny_model("bert"), calibration("bert", n=6)
    config = OptinConfig(importance="optin", md_tokens=24, num_samples=6, batch_size=3, **settings)
    ran = []
    for runner in (FastRunner, ReferenceRunner):
        original = runner.run

        def counting(self, kind, layer, unit_mask, original=original):
            ran.append(unit_mask.shape[0])
            return original(self, kind, layer, unit_mask)

        monkeypatch.setattr(runner, "run", counting)
    pruner = OptinPruner(config)
    pruner.compute_scores(model, data)
    adapter = get_adapter(model)
    units = layer_units(OptinImportance.masked_units(model, adapter, config), adapter.layer_geometry(model.config))
    timing = DenseTiming.uniform(1.0, 3, examples=3, tokens=36)
    cost = scoring_cost(timing, pruner._batches(model, adapter, data, None), None, config.batch_size, units, config.engine, [32] * 3,
                        config.md_tokens)
    assert cost.num_candidates(config.neuron_group_size) == sum(ran) == pruner.plan.num_candidates


def _ragged(name: str):
    """A family whose layers differ in width: a Swin's two stages, a ResNet's bottlenecks (8, 8, 16 channels)."""
    from tiny import FAMILIES

    return FAMILIES[name].build(), FAMILIES[name].settings


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["swin", "resnet"])
@pytest.mark.parametrize("neuron_group_size", [1, 16])
def test_estimate_counts_each_layer_own_units_of_a_ragged_family(name, neuron_group_size, monkeypatch):
    """Each layer runs its own heads and (grouped) neurons, not the widest layer's: the estimate and
    the plan count exactly the candidates the engine runs, so max_scoring_time is not misled."""
    model, settings = _ragged(name)
    ran = []
    original = ReferenceRunner.run

    def counting(self, kind, layer, unit_mask):
        ran.append(unit_mask.shape[0])
        return original(self, kind, layer, unit_mask)

    monkeypatch.setattr(ReferenceRunner, "run", counting)
    # residual widths kept: the count with the channels a ResNet's default cuts is tests/test_estimate.py's
    pruner = OptinPruner(OptinConfig(**{**settings, "neuron_group_size": neuron_group_size, "num_samples": 2, "engine": "reference",
                                        "prune_channels": False}))
    pruner.compute_scores(model, random_images(2, 1))
    geometry = get_adapter(model).layer_geometry(model.config)
    own = sum(g.heads + -(-g.neurons // neuron_group_size) for g in geometry)
    assert own < len(geometry) * (max(g.heads for g in geometry) + -(-max(g.neurons for g in geometry) // neuron_group_size))
    assert pruner.plan.num_candidates == sum(ran) == own
    assert f"{own} candidates" in str(pruner.plan)


def test_budgeted_prune_saves_the_settings_it_picked(tmp_path, monkeypatch):
    slow = DenseTiming.uniform(1000.0, 3, examples=4, tokens=64)  # a very slow machine
    monkeypatch.setattr("optin_hf.engine.estimate.time_dense", lambda *args: slow)
    model, data = tiny_model("bert"), calibration("bert", n=12)
    dense = tiny_model("bert")
    pruner = OptinPruner(OptinConfig(importance="optin", md_tokens=24, num_samples=12, batch_size=4, max_scoring_time=60))
    pruner.prune_model(model, data)
    assert not pruner.plan.fits and "does not fit" in str(pruner.plan)
    assert (pruner.plan.num_samples, pruner.plan.neuron_group_size) == (MIN_SAMPLES, 64)  # 48 neurons: one group
    assert pruner.timings["estimated_scoring_s"] == pruner.plan.estimated_s and pruner.timings["max_scoring_time_s"] == 60
    pruner.save(model, tmp_path)
    saved = OptinConfig.from_pretrained(tmp_path)
    assert (saved.num_samples, saved.neuron_group_size, saved.max_scoring_time) == (MIN_SAMPLES, 64, None)
    again = OptinPruner(saved).compute_scores(dense, data)  # the saved settings rerun the same scoring
    assert torch.equal(again.neuron_scores, pruner.scores.neuron_scores)
    assert torch.equal(again.head_scores, pruner.scores.head_scores)


def test_budget_that_fits_keeps_the_asked_settings(monkeypatch):
    monkeypatch.setattr("optin_hf.engine.estimate.time_dense", lambda *args: DenseTiming.uniform(1e-6, 3, examples=4, tokens=64))
    pruner = OptinPruner(OptinConfig(importance="optin", md_tokens=24, num_samples=12, batch_size=4, max_scoring_time=60))
    pruner.compute_scores(tiny_model("bert"), calibration("bert", n=12))
    assert pruner.plan.fits and (pruner.config.num_samples, pruner.config.neuron_group_size) == (12, 1)
    assert "12 of 12 examples" in str(pruner.plan)
