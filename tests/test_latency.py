import pytest
import torch
from tiny import tiny_model

from optin_hf.tasks.latency import median, synthetic_inputs, time_models, time_models_by_clocks


class Recorder(torch.nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.name, self.log = name, log

    def forward(self, **inputs):
        self.log.append(self.name)


def test_runs_alternate_between_models_after_warmup():
    log = []
    times = time_models({"a": Recorder("a", log), "b": Recorder("b", log)}, {"x": torch.zeros(1)}, runs=3, warmup=1)
    assert log == ["a", "b"] + ["a", "b"] * 3
    assert [len(v) for v in times.values()] == [3, 3]


def test_clock_is_pluggable_and_median():
    ticks = iter(range(100))
    times = time_models({"a": Recorder("a", [])}, {}, runs=2, warmup=0, clock=lambda: next(ticks))
    assert times == {"a": [1, 1]}
    assert median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="runs=0"):
        time_models({"a": Recorder("a", [])}, {}, runs=0)


def test_several_clocks_read_the_same_runs():
    """Wall and CPU time come from one set of forwards: each clock is read around every timed run."""
    log, wall, cpu = [], iter(range(0, 1000, 10)), iter(range(1000))
    times = time_models_by_clocks(
        {"a": Recorder("a", log), "b": Recorder("b", log)}, {}, {"wall": lambda: next(wall), "cpu": lambda: next(cpu)}, runs=2, warmup=1
    )
    assert log == ["a", "b"] * 3
    assert times == {"wall": {"a": [10, 10], "b": [10, 10]}, "cpu": {"a": [1, 1], "b": [1, 1]}}


def test_synthetic_inputs_have_the_mac_count_shape():
    text = synthetic_inputs(tiny_model("bert"), 4, 9.6)
    assert text["input_ids"].shape == (4, 10) and text["attention_mask"].all()
    assert text["input_ids"].max() < 120
    vision = synthetic_inputs(tiny_model("vit"), 2, 17)
    assert vision["pixel_values"].shape == (2, 3, 16, 16)
