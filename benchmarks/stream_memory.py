"""Layer-streamed scoring against in-memory scoring on the language-model default (SmolLM2-135M, 30 decoder layers):
peak memory against the model's size, scoring time, and whether the scores are identical.

Each mode runs in a fresh process (so its peak RSS is its own) on the same calibration windows (the recipe's
scoring settings: recipes/smollm2-shakespeare.yaml, without its time budget, with a fixed stack of variants so
both runs stack candidates alike). "memory" loads the model whole; "streamed" loads it with
`optin_hf.engine.streaming.load_streamed`, every decoder layer offloaded to a folder on disk. Reported: the model's
parameter bytes, the peak bytes of parameters holding values (sampled at every call of a decoder layer and of its
attention and MLP), the process's peak RSS (torch itself, the calibration data and activations included; on CPU
the disk-offloaded weights are memory-mapped, so pages read from them count while cached), the peak private
(anonymous) memory sampled at the same calls, which leaves those pages out, the load and scoring times (wall, and
the process's CPU time, steadier on a shared machine), and whether the two runs' scores are equal bit for bit.
One run each, one seed.

    nice -n 10 python benchmarks/stream_memory.py [--variants 8] [--samples 8] [--group 256] [--modes streamed memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAME = "shakespeare-smollm2"


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters if p.device.type != "meta")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _anon_mb() -> float:
    """The process's private (anonymous) resident memory now: RSS without the pages of mapped files (the
    memory-mapped offloaded weights, which the kernel can drop and read again)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no RssAnon line (Linux only)")


def child(mode: str, model_dir: str, work: Path, settings: dict) -> None:
    """One mode's run: load, score (sampling the materialised weights), write scores and figures under `work`."""
    from optin_hf import OptinConfig, OptinPruner
    from optin_hf.arch import get_adapter
    from optin_hf.engine.streaming import load_streamed
    from transformers import AutoModelForCausalLM

    windows = load_file(work / "calibration.safetensors")
    examples = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in windows["input_ids"]]
    rss_before = _rss_mb()
    start = time.perf_counter()
    if mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    else:
        model = load_streamed(model_dir, offload_folder=work / "offload")
    load_s = time.perf_counter() - start
    layers = get_adapter(model).layers_of(model)
    peak = {"bytes": _bytes(model.parameters()), "anon": _anon_mb()}

    def sample(*_):
        peak["bytes"] = max(peak["bytes"], _bytes(model.parameters()))
        peak["anon"] = max(peak["anon"], _anon_mb())

    watched = [m for layer in layers for m in (layer, layer.self_attn, layer.mlp)]
    handles = [h for m in watched for h in (m.register_forward_pre_hook(sample), m.register_forward_hook(sample))]
    pruner = OptinPruner(OptinConfig.from_dict(settings))
    start, cpu = time.perf_counter(), time.process_time()
    scores = pruner.compute_scores(model, examples)
    scoring_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    for handle in handles:
        handle.remove()
    save_file({"head": scores.head_scores.contiguous(), "neuron": scores.neuron_scores.contiguous()}, work / f"{mode}.safetensors")
    config = model.config
    total = sum(p.numel() for p in model.parameters()) * 4  # float32; meta parameters still have their shape
    figures = dict(mode=mode, load_s=load_s, scoring_s=scoring_s, cpu_s=cpu_s, peak_param_bytes=peak["bytes"], model_bytes=total,
                   layers=len(layers), rss_before_load_mb=rss_before, peak_rss_mb=_rss_mb(), peak_anon_mb=peak["anon"],
                   hidden=config.hidden_size, threads=torch.get_num_threads())
    (work / f"{mode}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", type=int, default=8, help="candidates stacked per forward (fixed, the same in both runs)")
    parser.add_argument("--samples", type=int, help="calibration windows (default: the recipe's)")
    parser.add_argument("--group", type=int, help="MLP channels per scored group (default: the recipe's)")
    parser.add_argument("--modes", nargs="+", default=["memory", "streamed"], help="the runs, in this order")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL_DIR", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_dir, work = args.child
        child(mode, model_dir, Path(work), json.loads((Path(work) / "settings.json").read_text()))
        return
    from optin_hf.tasks.defaults import load_default
    from optin_hf.tasks.recipes import default_recipe
    from optin_hf.tasks.windows import calibration_windows

    task = load_default(NAME)  # builds the cached safetensors copy once
    recipe = default_recipe(NAME).optin
    recipe = dataclasses.replace(recipe, num_samples=args.samples or recipe.num_samples,
                                 neuron_group_size=args.group or recipe.neuron_group_size)
    settings = {**recipe.to_dict(), "max_scoring_time": None, "variants_per_batch": args.variants}
    windows = calibration_windows(task.calibration, "text", task.processor, recipe.max_length, recipe.num_samples, recipe.seed)
    model_dir = str(task.model_dir)
    del task
    with tempfile.TemporaryDirectory(prefix="stream-memory-") as folder:
        work = Path(folder)
        save_file({"input_ids": torch.stack([w["input_ids"] for w in windows])}, work / "calibration.safetensors")
        (work / "settings.json").write_text(json.dumps(settings))
        env = {**os.environ, "TQDM_DISABLE": "1"}
        figures = {}
        for mode in args.modes:
            subprocess.run([sys.executable, __file__, "--child", mode, model_dir, folder], check=True, env=env)
            figures[mode] = json.loads((work / f"{mode}.json").read_text())
        scores = {mode: load_file(work / f"{mode}.safetensors") for mode in figures}
        same = all(torch.equal(scores["memory"][k], scores["streamed"][k]) for k in ("head", "neuron"))
        largest = max((scores["memory"][k] - scores["streamed"][k]).abs().max().item() for k in ("head", "neuron"))
    mb = 1024**2
    model_mb = figures["memory"]["model_bytes"] / mb
    print(f"{NAME}: {figures['memory']['layers']} decoder layers, {model_mb:.0f} MiB of float32 parameters; "
          f"{recipe.num_samples} windows of {recipe.max_length} tokens, neurons in groups of {recipe.neuron_group_size}, "
          f"{args.variants} variants per forward; {figures['memory']['threads']} torch threads")
    print("| run | peak parameters held (MiB) | share of the model | peak private memory (MiB) | peak RSS (MiB) | "
          "load (s) | scoring (s, wall) | scoring (s, process CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, f in figures.items():
        print(f"| {mode} | {f['peak_param_bytes'] / mb:.0f} | {f['peak_param_bytes'] / f['model_bytes']:.2f} | "
              f"{f['peak_anon_mb']:.0f} | {f['peak_rss_mb']:.0f} | {f['load_s']:.1f} | {f['scoring_s']:.0f} | {f['cpu_s']:.0f} |")
    print(f"scores identical bit for bit: {same} (largest difference {largest:.3g}); streamed / in-memory scoring time "
          f"{figures['streamed']['scoring_s'] / figures['memory']['scoring_s']:.2f}x wall, "
          f"{figures['streamed']['cpu_s'] / figures['memory']['cpu_s']:.2f}x process CPU")


if __name__ == "__main__":
    main()
