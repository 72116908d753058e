"""Tokens per second of causal language models, dense and slim, at batch 1 and 16.

Two speeds, each timed with the compared models in turns (`latency.time_models`' rule: a slow spell
of a shared machine hits all of them alike) and reported as the median run:

- forward: one forward over windows of the MAC context length (`seq_len` tokens, random ids, no
  padding), tokens/s = batch x seq_len / seconds. Its work is what `count_macs` counts, so its ratio is
  the one to compare with the MAC ratio.
- generate: greedy decoding of GENERATED_TOKENS new tokens (never stopped early) after a prompt of
  PROMPT_TOKENS random tokens, with the key/value cache, tokens/s = batch x new tokens / seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationConfig

from .latency import median, synthetic_inputs, time_models

TOKEN_BATCHES = (1, 16)
PROMPT_TOKENS = 16
GENERATED_TOKENS = 32
RUNS = 3


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    settings = GenerationConfig(max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS, do_sample=False,
                                pad_token_id=pad, eos_token_id=None)
    out = model.generate(**inputs, generation_config=settings)
    if out.shape[1] != inputs["input_ids"].shape[1] + GENERATED_TOKENS:
        raise RuntimeError(f"{type(model).__name__}.generate gave {out.shape[1] - inputs['input_ids'].shape[1]} new tokens, "
                           f"not {GENERATED_TOKENS}.")
    if out.is_cuda:
        torch.cuda.synchronize()


@torch.no_grad()
def _time_generation(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], runs: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of `_generate` per model, `runs` each after one warm-up, in turns."""
    placed = {}
    for name, model in models.items():
        model.eval()
        placed[name] = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
        _generate(model, placed[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = clock()
            _generate(model, placed[name])
            times[name].append(clock() - start)
    return times


def tokens_per_second(models: dict[str, nn.Module], seq_len: float, runs: int = RUNS) -> dict[str, dict[str, float]]:
    """{model: {"forward_batch_1", "forward_batch_16", "generate_batch_1", "generate_batch_16": tokens/s}};
    also {model: {"forward_batch_16_s": seconds}}, the median forward at batch 16 (the report's latency)."""
    reference = next(iter(models.values()))
    tokens = max(1, round(seq_len))
    speeds: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch in TOKEN_BATCHES:
        forward = time_models(models, synthetic_inputs(reference, batch, tokens), runs=runs, warmup=1)
        prompt = synthetic_inputs(reference, batch, PROMPT_TOKENS, seed=1)
        generated = _time_generation(models, prompt, runs)
        for name in models:
            seconds = median(forward[name])
            speeds[name][f"forward_batch_{batch}"] = batch * tokens / seconds
            speeds[name][f"generate_batch_{batch}"] = batch * GENERATED_TOKENS / median(generated[name])
            speeds[name][f"forward_batch_{batch}_s"] = seconds
    return speeds
