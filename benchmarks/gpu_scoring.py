"""Full OPTIN head + neuron scoring of a BERT-base-sized model on one GPU (issue 4's GPU goal).

Random weights (only the time matters), batch 128 x 40 tokens, bf16 autocast, the fast
engine, every head and every neuron (12 x 12 + 12 x 3072 = 37,008 candidates). The goal is
under 60 s; the peer method PTF takes about 1 to 1.5 minutes. Where no GPU is lent it
refuses, unless `--device cpu` with a smaller `--layers` asks for a smoke run.

    PYTHONPATH=. python benchmarks/gpu_scoring.py [--dtype bfloat16] [--neuron-group-size 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from optin_hf import OptinConfig, OptinPruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=12, help="BERT-base has 12")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--neuron-group-size", type=int, default=1, help="1 scores every neuron alone, as the paper")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU here: this benchmark times GPU scoring (use --device cpu --layers 1 for a smoke run).")

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=args.layers, num_labels=3)  # BERT-base sizes otherwise
    model = BertForSequenceClassification(config).to(device).eval()
    ids = torch.randint(1000, config.vocab_size, (args.samples, args.tokens))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    optin = OptinConfig(
        num_samples=args.samples, batch_size=args.samples, max_length=args.tokens, dtype=args.dtype,
        neuron_group_size=args.neuron_group_size,
    )
    pruner = OptinPruner(optin)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    scores = pruner.compute_scores(model, data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    candidates = scores.head_scores.numel() + scores.neuron_scores.numel() // args.neuron_group_size
    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"model: BERT-base sizes, {args.layers} layers, random weights; calibration {args.samples} x {args.tokens} tokens")
    print(f"scored {candidates} candidates in {seconds:.1f} s ({candidates / seconds:.0f} per second); goal < 60 s")


if __name__ == "__main__":
    main()
