"""Latency of a dense and a slim model in ONNX Runtime and in PyTorch, set beside the speed-up their MACs promise.

ORT is compared with ORT and PyTorch with PyTorch: the four runners (dense and slim, each in both) are timed in
turns on the same inputs and thread count, so a slow spell of a shared machine hits all of them alike, and each
speed-up is a ratio of medians. Each forward is read by the wall clock and by the process's CPU time: on one thread
the CPU time is what the forward costs on an idle machine, which other processes on a shared one hardly move. `ideal_speedup` is 1 / (slim MACs / dense MACs); `share_of_ideal` is the measured
speed-up over it (1.0: the slim model runs as much faster as its MAC count says).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import check_model
from ..macs import CostModel
from ..modeling import model_class
from .settings import LATENCY_BATCH_SIZES
from .to_onnx import ONNX_MODEL_NAME, GraphInputs, export_graph, forward_options, mac_length, session


def dense_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """A dense model of `model`'s architecture and config, with random weights: a latency reference that needs no
    base model, since a float32 forward takes as long whatever its weights' values."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "optin"):
        delattr(config, "optin")
    torch.manual_seed(seed)
    return model_class(config)(config).eval()


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def compare_latency(
    dense: nn.Module,
    slim: nn.Module,
    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    *,
    threads: int | None = None,
    seq_len: int | None = None,
    runs: int = 7,
    warmup: int = 2,
) -> dict[str, Any]:
    """Milliseconds per forward of `dense` and `slim`, each in PyTorch and in ONNX Runtime (exported and validated
    here), at each batch size, on `threads` threads for both (default: torch's count); text runs `seq_len` tokens
    (default: the slim model's MAC length), unpadded, so the timed work is what the MAC count counts."""
    if runs < 1 or (threads is not None and threads < 1) or any(batch < 1 for batch in batch_sizes):
        raise ValueError(f"runs={runs}, threads={threads}, batch_sizes={list(batch_sizes)}: each must be at least 1.")
    threads = threads or torch.get_num_threads()
    adapter = check_model(slim)
    length = None if adapter.is_vision else int(seq_len or mac_length(slim, adapter))
    spec = GraphInputs.of(slim, adapter)  # the dense model runs the slim one's inputs
    size = spec.image_size
    ratio = CostModel.of(slim, adapter, size).model_macs(length) / CostModel.of(dense, None, size).model_macs(length)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="optin-onnx-latency-") as folder:
            runners: dict[tuple[str, str], Callable[[dict[str, torch.Tensor]], Any]] = {}
            for name, model in (("dense", dense), ("slim", slim)):
                path = Path(folder) / name / ONNX_MODEL_NAME
                path.parent.mkdir()
                export_graph(model, path, image_size=size)
                graph = session(path, threads)
                options = forward_options(model)
                runners[("pytorch", name)] = lambda inputs, model=model, options=options: model(**inputs, **options)
                runners[("onnxruntime", name)] = lambda inputs, graph=graph: graph.run(
                    None, {k: v.numpy() for k, v in inputs.items()})
            batches = {}
            for batch in batch_sizes:
                inputs = spec.synthetic(slim, batch, length, padded=False)
                times = _time_in_turns(runners, inputs, runs, warmup)
                batches[str(batch)] = _speedups(times, ratio)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "seq_len": length,
        "runs": runs,
        "mac_ratio": ratio,
        "ideal_speedup": 1 / ratio,
        "batches": batches,
        "method": "median ms of interleaved runs, by the wall clock and (cpu_*) by the process's CPU time; ORT: "
        "CPUExecutionProvider, ORT_ENABLE_ALL, inter-op threads 1",
    }


CLOCKS = {"": time.perf_counter, "cpu_": time.process_time}  # key prefix -> clock


@torch.no_grad()
def _time_in_turns(runners: dict[tuple[str, str], Callable], inputs: dict[str, torch.Tensor], runs: int,
                   warmup: int) -> dict[tuple[str, str, str], list[float]]:
    """Seconds of each runner's forwards by each clock: {(clock, runtime, model): [seconds]}."""
    for run in runners.values():
        for _ in range(warmup):
            run(inputs)
    times: dict[tuple[str, str, str], list[float]] = {(clock, *key): [] for clock in CLOCKS for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            start = {clock: read() for clock, read in CLOCKS.items()}
            run(inputs)
            for clock, read in CLOCKS.items():
                times[(clock, *key)].append(read() - start[clock])
    return times


def _speedups(times: dict[tuple[str, str, str], list[float]], ratio: float) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for runtime in ("onnxruntime", "pytorch"):
        row[runtime] = {}
        for clock in CLOCKS:
            dense, slim = _median_ms(times[(clock, runtime, "dense")]), _median_ms(times[(clock, runtime, "slim")])
            row[runtime].update({f"{clock}dense_ms": dense, f"{clock}slim_ms": slim, f"{clock}speedup": dense / slim,
                                 f"{clock}share_of_ideal": dense / slim * ratio})
    return row
