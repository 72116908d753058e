"""The scoring time estimate (optin_hf/engine/estimate.py) on every family: it counts the candidates the engine
runs (never a narrower layer's padding), charges each layer its own measured time, and adds the losses each
candidate pays. Whether it lands within a factor of 2 of the measured time is a timing check, too noisy for a
shared CI machine: benchmarks/estimate_accuracy.py prints that ratio per family."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import check_model
from optin_hf.engine.estimate import THROUGHPUT, DenseTiming, scoring_cost, time_dense
from optin_hf.engine.streaming import load_streamed
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.importance import residual_channels
from tiny import FAMILIES, tiny_llm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_plan_counts_the_candidates_the_engine_runs(name, monkeypatch, count_calls):
    """The printed count is each layer's own heads and neuron groups, as the engine runs them: for a ragged family
    (Swin's, a CNN's, SegFormer's stages) fewer than the widest layer's times the layers; and every residual channel
    a ResNet's default cuts, one masked run each."""
    family = FAMILIES[name]
    ran = count_calls(residual_channels, "masked_run_losses")
    for runner in (FastRunner, ReferenceRunner):
        original = runner.run

        def counting(self, kind, layer, unit_mask, original=original):
            ran.append(unit_mask.shape[0])
            return original(self, kind, layer, unit_mask)

        monkeypatch.setattr(runner, "run", counting)
    model = family.build()
    pruner = OptinPruner(OptinConfig(**{**family.settings, "num_samples": 2, "batch_size": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a family without the fast engine says it falls back
        pruner.compute_scores(model, family.examples(2, 1))
    adapter = check_model(model)
    geometry = adapter.layer_geometry(model.config)
    group = family.settings["neuron_group_size"]
    channels = sum(adapter.channel_widths(model.config)) if pruner.config.prune_channels else 0
    assert pruner.config.prune_channels or name != "resnet"  # the default cuts a ResNet's residual channels
    own = sum(g.heads + math.ceil(g.neurons / group) for g in geometry)
    assert pruner.plan.num_candidates == sum(ran) == own + channels
    padded = len(geometry) * (max(g.heads for g in geometry) + math.ceil(max(g.neurons for g in geometry) / group))
    assert own < padded if len(set(geometry)) > 1 else own == padded


def batch(examples: int) -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": torch.zeros(examples, 3, 8, 8)}]


def test_each_layer_is_charged_its_own_time():
    """A fast-engine candidate reruns the layers from its own on, each at its measured time, then the task head;
    the reference reruns the whole forward. Layer 0 three times as slow as layer 1 (a ragged family's first stage)."""
    timing = DenseTiming(seconds=5.0, layers=[3.0, 1.0], before=0.5, examples=1, tokens=10)  # 0.5 s after: the head
    fast = scoring_cost(timing, batch(1), 10, 1, {"head": [1, 1], "neuron": [2, 0]}, "fast", [8, 8], 16)
    head_0, head_1, neuron_0 = 10 * (0.3 + 0.1) + 0.5, 10 * 0.1 + 0.5, 10 * 0.1 + 0.5  # a neuron's own layer: no rerun
    assert fast.seconds(1, 1) == pytest.approx((head_0 + head_1 + 2 * neuron_0) / THROUGHPUT["fast"])
    assert fast.seconds(1, 2) == pytest.approx((head_0 + head_1 + neuron_0) / THROUGHPUT["fast"])  # one group of 2
    reference = scoring_cost(timing, batch(1), 10, 1, {"head": [1, 1], "neuron": [2, 0]}, "reference", [8, 8], 16)
    assert reference.seconds(1, 1) == pytest.approx(4 * 5.0 / THROUGHPUT["reference"])


def test_each_residual_channel_is_a_whole_masked_run(capsys):
    """A residual channel is one reference run of the whole model whichever the engine, judged by MD from the group's
    first reader on; the printed count includes them (a ResNet's default cuts its channels: 100 on the tiny one)."""
    timing = DenseTiming(seconds=5.0, layers=[3.0, 1.0], before=0.5, examples=1, tokens=10, md_s=2e-3, md_rows=16,
                         md_width=8, kl_s=1e-3)
    plain = scoring_cost(timing, batch(1), 10, 1, {"head": [1, 1]}, "fast", [8, 8], 16)
    cost = scoring_cost(timing, batch(1), 10, 1, {"head": [1, 1]}, "fast", [8, 8], 16, channels=[(0, 3), (1, 2)])
    md = 2e-3 / (16**2 * 8) * 10**2 * 8  # one layer's MD over the example's 10 rows
    whole = 5.0 / THROUGHPUT["reference"] + 1e-3
    assert cost.num_candidates(1) == plain.num_candidates(1) + 5
    assert cost.seconds(1, 1) - plain.seconds(1, 1) == pytest.approx(3 * (whole + 2 * md) + 2 * (whole + md))

    model = FAMILIES["resnet"].build()
    OptinPruner(OptinConfig(**{**FAMILIES["resnet"].settings, "num_samples": 2, "batch_size": 2})).compute_scores(
        model, FAMILIES["resnet"].examples(2, 1))
    geometry = check_model(model).layer_geometry(model.config)
    units = sum(g.heads + math.ceil(g.neurons / FAMILIES["resnet"].settings["neuron_group_size"]) for g in geometry)
    assert f"{units + 100} candidates" in capsys.readouterr().err


def test_each_candidate_pays_its_md_and_kl():
    """MD compares at most md_tokens rows (quadratic in them) of each later layer's features; KL is per example."""
    timing = DenseTiming(seconds=0.0, layers=[0.0, 0.0], before=0.0, examples=2, tokens=20, md_s=2e-3, md_rows=16,
                         md_width=8, kl_s=1e-3)
    cost = scoring_cost(timing, batch(4), 10, 4, {"head": [1, 1]}, "fast", [8, 4], md_tokens=16)
    md = 2e-3 / (16**2 * 8) * 16**2  # 40 real tokens: md_tokens=16 rows
    layer_0, layer_1 = md * 4, md * 4  # judged by layer 1's 4 features; the last layer by its own
    assert cost.seconds(4, 1) == pytest.approx(layer_0 + layer_1 + 2 * 4 * 1e-3 / 2)
    assert cost.seconds(1, 1) == pytest.approx((10 / 16) ** 2 * (layer_0 + layer_1) + 2 * 1e-3 / 2)  # 10 rows
    timing.positions = [10, 2]  # a later stage's map: 2 positions an image, so MD there compares 4 x 2 rows at most
    smaller = scoring_cost(timing, batch(4), 10, 4, {"head": [1, 1]}, "fast", [8, 4], md_tokens=16)
    assert smaller.seconds(4, 1) == pytest.approx((8 / 16) ** 2 * (layer_0 + layer_1) + 2 * 4 * 1e-3 / 2)


@pytest.mark.parametrize("name", ["swin", "segformer"])
def test_time_dense_times_each_layer_and_leaves_no_hook(name):
    model = FAMILIES[name].build()
    adapter = check_model(model)
    layers = adapter.layers_of(model)
    images = torch.stack([example["pixel_values"] for example in FAMILIES[name].examples(4, 1)])
    widths = [g.hidden for g in adapter.layer_geometry(model.config)]
    timing = time_dense(model, adapter, {"pixel_values": images}, 64, md_rows=32, widths=widths, temperature=4.0)
    assert len(timing.layers) == len(layers) and all(s > 0 for s in timing.layers) and timing.before > 0
    assert timing.before + sum(timing.layers) <= timing.seconds and timing.md_s > 0 and timing.kl_s > 0
    assert (timing.examples, timing.tokens, timing.md_rows, timing.md_width) == (4, 4 * 64, 32, max(widths))
    assert timing.positions == ([64, 64, 16, 16] if name == "swin" else [64, 16, 16])  # each stage's map, 8x8 then 4x4
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def test_a_streamed_layer_load_is_paid_once_per_stacked_forward():
    """A streamed layer's weights are read once per forward that runs it, whatever its tokens: a fast-engine stack of
    `variants` candidates of one layer holds that layer (a neuron's twice: its down projection, then its finish) and
    runs each later one, over each batch; a reference candidate runs the whole model over each batch."""
    timing = DenseTiming(seconds=4.0, layers=[1.0, 1.0], before=0.0, examples=2, tokens=20, loads=[0.5, 0.25])
    units = {"head": [5, 5], "neuron": [3, 0]}
    held = scoring_cost(timing, batch(2) * 2, 10, 2, units, "fast", [8, 8], 16)  # two batches of 2
    stacked = scoring_cost(timing, batch(2) * 2, 10, 2, units, "fast", [8, 8], 16, variants=4)
    compute = dataclasses.replace(timing, seconds=3.25, loads=[])  # the same forward held in memory
    free = scoring_cost(compute, batch(2) * 2, 10, 2, units, "fast", [8, 8], 16, variants=4)
    # stacks: heads of layer 0: 2, of layer 1: 2, neurons of layer 0: 1; each over 2 batches
    assert stacked.seconds(4, 1) - free.seconds(4, 1) == pytest.approx(2 * (2 * 0.75 + 2 * 0.25 + 1 * (0.75 + 0.5)))
    assert held.seconds(4, 1) - free.seconds(4, 1) == pytest.approx(2 * (5 * 0.75 + 5 * 0.25 + 3 * (0.75 + 0.5)))
    reference = scoring_cost(timing, batch(2) * 2, 10, 2, units, "reference", [8, 8], 16, variants=4)
    assert reference.seconds(4, 1) - scoring_cost(compute, batch(2) * 2, 10, 2, units, "reference", [8, 8], 16).seconds(4, 1) \
        == pytest.approx(13 * 2 * 0.75)


def test_time_dense_times_a_streamed_layer_load_apart(tmp_path):
    """Each offloaded layer is held for its timed forward and its load timed apart from its compute, then dropped
    again; a model in memory has no loads. The same forward: each layer's load and compute add up to less than it."""
    memory = tiny_llm("llama")
    memory.save_pretrained(tmp_path / "llama")
    streamed = load_streamed(tmp_path / "llama", offload_folder=tmp_path / "offload", attn_implementation="eager")
    adapter = check_model(streamed)
    widths = [g.hidden for g in adapter.layer_geometry(streamed.config)]
    inputs = FAMILIES["llama"].inputs
    timings = {name: time_dense(model, adapter, inputs, None, md_rows=8, widths=widths, temperature=4.0)
               for name, model in (("memory", memory), ("streamed", streamed))}
    assert timings["memory"].loads == []
    timing = timings["streamed"]
    assert len(timing.loads) == len(timing.layers) == len(adapter.layers_of(streamed)) and all(s > 0 for s in timing.loads)
    assert all(s > 0 for s in timing.layers) and timing.before + sum(timing.layers) + sum(timing.loads) <= timing.seconds
    assert all(p.device.type == "meta" for layer in adapter.layers_of(streamed) for p in layer.parameters())
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in adapter.layers_of(streamed))
