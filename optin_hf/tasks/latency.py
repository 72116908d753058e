"""Wall-clock latency of dense and slim models on the same inputs, timed in turns.

The runs of the compared models alternate, so a slow spell of a shared machine hits all of
them alike; the median of several runs then gives a ratio that noise hardly moves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..arch import check_model


def synthetic_inputs(
    model: nn.Module, batch_size: int, seq_len: float, seed: int = 0, image_size: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """A batch shaped like the MAC count assumes: `round(seq_len)` real tokens (text), or `image_size`
    images (None: the config's).

    Text gets no padding, so the timed work is what the MAC formulas count at `seq_len`.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if check_model(model).is_vision:
        # A model around a backbone (Mask2Former) keeps the image geometry in its backbone's config.
        images = config if getattr(config, "backbone_config", None) is None else config.backbone_config
        height, width = check_model(model).image_size(config, image_size)
        shape = (batch_size, images.num_channels, height, width)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    tokens = max(1, round(seq_len))
    ids = torch.randint(min(5, config.vocab_size - 1), config.vocab_size, (batch_size, tokens), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    model(**inputs)
    if inputs and next(iter(inputs.values())).is_cuda:
        torch.cuda.synchronize()  # CUDA runs asynchronously: wait, or only the launch is timed


def time_models(
    models: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    runs: int = 7,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per forward of each model on `inputs` (moved to its device): `runs` each, in turns.

    `clock` is wall time; `time.process_time` gives CPU time instead, which other processes
    on a shared machine hardly disturb (with one torch thread it is the idle-machine latency).
    """
    return time_models_by_clocks(models, inputs, {"clock": clock}, runs, warmup)["clock"]


@torch.no_grad()
def time_models_by_clocks(
    models: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    clocks: Mapping[str, Callable[[], float]],
    runs: int = 7,
    warmup: int = 2,
) -> dict[str, dict[str, list[float]]]:
    """`time_models` read by several clocks around the same forwards ({clock: {model: seconds}}),
    so wall and CPU time of a slow model cost one set of runs, not one per clock."""
    if runs < 1:
        raise ValueError(f"runs={runs} must be at least 1.")
    placed = {}
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        placed[name] = {k: v.to(device) for k, v in inputs.items()}
        for _ in range(warmup):
            _forward(model, placed[name])
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in models} for clock in clocks}
    for _ in range(runs):
        for name, model in models.items():
            start = {clock: read() for clock, read in clocks.items()}
            _forward(model, placed[name])
            for clock, read in clocks.items():
                times[clock][name].append(read() - start[clock])
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
