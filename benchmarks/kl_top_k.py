"""What keeping only the dense model's top-k next-token classes (`losses.TopKOutputs`) changes in OPTIN's scores,
against the full-vocabulary KL, on the language-model default (SmolLM2-135M, 49,152-token vocabulary).

Every candidate (each KV group; the MLP channels in groups of like output energy, as scoring groups them) is
masked once and run over the calibration windows (the reference engine's masked run); its KL is taken against
the dense outputs kept whole and in top-k form for each k, its MD once (top-k does not touch it). The table gives,
per k, the dense outputs' memory, the median ratio of the top-k KL to the full one, and Spearman's rank
correlation with the full-KL values of the raw KL and of the balanced OPTIN score (MD + scaled KL), over all
candidates and per kind. One seed; windows drawn from the default's calibration plays.

    nice -n 10 python benchmarks/kl_top_k.py [--windows 4] [--window 64] [--group 512] [--k 1024 256 64 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import optin_hf.losses as losses
from optin_hf import OptinConfig
from optin_hf.arch import get_adapter
from optin_hf.capture import capture_dense, scoring_forward, select_rows
from optin_hf.data import prepare_calibration
from optin_hf.hooks import apply_masks, record_features
from optin_hf.importance.optin import neuron_energy_order
from optin_hf.losses import TopKOutputs, balance, kl_loss, later_layers, md_loss
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.metrics import spearmanr
from optin_hf.tasks.windows import calibration_windows


@torch.no_grad()
def masked_outputs(model, adapter, batches, capture, layer: int, **masks) -> tuple[float, list]:
    """(MD over the later layers, the masked outputs per batch) of one masked run."""
    judged = later_layers(layer, len(capture.grams))
    rows = {z: [] for z in judged}
    outputs = []
    with apply_masks(model, adapter, **masks), record_features(model, adapter) as features:
        for batch, batch_rows in zip(batches, capture.rows):
            outputs.append(adapter.kl_outputs(scoring_forward(model, batch), batch))
            for z in judged:
                rows[z].append(select_rows(features[z], batch_rows, capture.tokens))
    return sum(float(md_loss(capture.grams[z], torch.cat(rows[z]))) for z in judged), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--group", type=int, default=512)
    parser.add_argument("--k", nargs="+", type=int, default=[1024, 256, 64, 16])
    args = parser.parse_args()
    task = load_default("shakespeare-smollm2")
    model, adapter = task.model, get_adapter(task.model.config)
    config = OptinConfig()
    examples = calibration_windows(task.calibration, "text", task.processor, args.window, args.windows, config.seed)
    batches = prepare_calibration(examples, num_samples=args.windows, batch_size=config.batch_size, max_length=args.window,
                                  config=model.config)
    vocabulary = model.config.vocab_size
    losses.KL_FULL_CLASSES = vocabulary  # the capture keeps the whole distributions; the top-k forms are cut from them
    capture = capture_dense(model, adapter, batches, config.md_tokens, config.seed)
    dense = {None: capture.outputs, **{k: [TopKOutputs.of(o, k) for o in capture.outputs] for k in args.k}}
    layers, heads = len(adapter.layers_of(model)), adapter.num_heads(model.config)
    width = adapter.intermediate_size(model.config)
    orders = neuron_energy_order(model, adapter, batches)
    md, kl = {"head": [], "neuron": []}, {k: {"head": [], "neuron": []} for k in dense}
    start = time.perf_counter()
    for layer in range(layers):
        candidates = [("head", unit) for unit in range(heads)] + [("neuron", g) for g in range(0, width, args.group)]
        for kind, unit in candidates:
            if kind == "head":
                mask = torch.ones(layers, heads)
                mask[layer, unit] = 0
                masks = {"head_mask": mask}
            else:
                mask = torch.ones(layers, width)
                mask[layer, orders[layer, unit : unit + args.group]] = 0
                masks = {"neuron_mask": mask}
            value, outputs = masked_outputs(model, adapter, batches, capture, layer, **masks)
            md[kind].append(value)
            for k, target in dense.items():
                kl[k][kind].append(float(kl_loss(target, outputs, config.temperature)))
        print(f"layer {layer}: {time.perf_counter() - start:.0f} s", flush=True)

    def scores(k) -> dict[str, np.ndarray]:
        return {kind: balance(torch.tensor([md[kind]]), torch.tensor([kl[k][kind]]), config.lambda_contribution).numpy()[0]
                for kind in md}

    full_kl = np.concatenate([kl[None]["head"], kl[None]["neuron"]])
    full_scores = scores(None)
    positions = args.windows * args.window
    print(f"\n{positions} positions ({args.windows} windows of {args.window} tokens), {len(full_kl)} candidates "
          f"({layers} x {heads} KV groups, MLP channels in groups of {args.group}); temperature {config.temperature}")
    print("| k | dense outputs | top-k KL / full KL, median (min) | Spearman: KL | score | score, KV groups | score, MLP groups |")
    print("|---|---|---|---|---|---|---|")
    for k in dense:
        memory = positions * (vocabulary * 4 if k is None else k * 16 + 8)
        values = np.concatenate([kl[k]["head"], kl[k]["neuron"]])
        s = scores(k)
        ratio = values / full_kl
        print(f"| {k or f'full ({vocabulary})'} | {memory / 2**20:.2f} MiB | {np.median(ratio):.4f} ({ratio.min():.4f}) | "
              f"{spearmanr(values, full_kl):.4f} | {spearmanr(np.concatenate([s['head'], s['neuron']]), np.concatenate([full_scores['head'], full_scores['neuron']])):.4f} | "
              f"{spearmanr(s['head'], full_scores['head']):.4f} | {spearmanr(s['neuron'], full_scores['neuron']):.4f} |")


if __name__ == "__main__":
    main()
