"""Issue 7 benchmark: token reduction (OPTIN "tau") vs parameter pruning alone on the digits ViT.

At mac_constraint 0.6 and 0.5 it prunes the digits ViT twice from ONE set of OPTIN scores:
with tokens + heads + neurons (prune_tokens=True) and with heads + neurons only
(prune_tokens=False, the reference's beta_config_only); it reports held-out accuracy, MACs
(count_macs and torch's FLOP counter) and the latency of batch-32 forwards relative to the
dense model (medians). A small sweep of max_patch_envelope backs its default.

The digits ViT is `optin_hf.tasks.defaults.load_default("digits-vit")` when that module exists;
otherwise an equivalent ViT (8x8 images, patch 2, hidden 64, 4 heads, 4 layers, intermediate
128) is trained here from scratch on scikit-learn's load_digits for a fixed 400 steps (about a
minute on two shared CPU cores).

    PYTHONPATH=. python benchmarks/tau.py [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import get_adapter
from optin_hf.losses import token_scores
from optin_hf.engine.token_losses import capture_token_grams, reference_token_losses

COUNTED = re.compile(r"\.layers\.\d+$|patch_embeddings\.projection$")  # encoder layers (merging included) + patch embedding


def own_digits_vit(steps: int, seed: int = 0):
    """Train the small ViT on 80% of load_digits (pixels scaled to [0, 1]); the rest is the test set."""
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(order))
    train, test = order[:split], order[split:]
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config)
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = train[torch.randint(len(train), (64,), generator=g)]
        loss = model(pixel_values=images[idx], labels=labels[idx]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"trained the digits ViT here for {steps} steps in {time.perf_counter() - start:.0f} s")
    model.eval()
    calibration = [{"pixel_values": images[i]} for i in train[:128]]
    return model, calibration, images[test], labels[test]


def digits_vit(steps: int):
    try:
        from optin_hf.tasks.defaults import load_default
    except ImportError:
        print("optin_hf.tasks.defaults is not available here: training the digits ViT in this script")
        return own_digits_vit(steps)
    task = load_default("digits-vit")
    calibration = [{"pixel_values": torch.tensor(x)} for x in task.calibration["pixel_values"]]
    test = task.test.with_format("torch")
    return task.model, calibration, test["pixel_values"], test["label"]


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.cat([model(pixel_values=images[i : i + 256]).logits for i in range(0, len(images), 256)])
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def latencies_ms(models: dict, images: torch.Tensor, repeats: int) -> dict:
    """Median wall time of one batch-32 forward per model, measured round-robin so that load
    from other processes on a shared machine hits every model alike."""
    batch = images[:32]
    times = {name: [] for name in models}
    for round_ in range(repeats + 10):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=batch)
            if round_ >= 10:  # warm-up rounds are not timed
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def flop_counter_macs(model, image: torch.Tensor) -> float:
    """Encoder MACs by torch's FLOP counter (eager attention: CPU sdpa is not counted)."""
    model = copy.deepcopy(model)
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=image[None])
    counted = [ops for name, ops in counter.get_flop_counts().items() if COUNTED.search(name)]
    return sum(sum(ops.values()) for ops in counted) / 2


def vit_tiny_latency(repeats: int) -> None:
    """Latency only, at a realistic size: a ViT-Ti-shaped model (224 px, patch 16, 197 tokens,
    hidden 192, 12 layers) with random weights and random scores, 50% of the MACs kept."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=10)
    dense = ViTForImageClassification(config).eval()
    images = torch.randn(32, 3, 224, 224)
    models = {"dense": dense}
    for tokens in (True, False):
        pruner = OptinPruner(OptinConfig(mac_constraint=0.5, prune_tokens=tokens, importance="random"))
        models["tau" if tokens else "params only"] = pruner.prune_model(copy.deepcopy(dense), [{"pixel_values": images[0]}])
    ms = latencies_ms(models, images, repeats)
    print(f"\nViT-Ti shape, random weights, 0.5 of the MACs: dense {ms['dense']:.0f} ms per batch of 32; "
          f"tau {ms['tau'] / ms['dense']:.3f} x dense; params only {ms['params only'] / ms['dense']:.3f} x dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (latency is measured with these)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the fallback digits ViT")
    parser.add_argument("--repeats", type=int, default=200, help="timed forwards per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, calibration, images, labels = digits_vit(args.steps)
    base, flop_base = count_macs(dense), flop_counter_macs(dense, images[0])
    print(f"dense: accuracy {accuracy(dense, images, labels):.4f}, {base / 1e6:.3f} MMACs per image")

    scoring = OptinPruner(OptinConfig(prune_tokens=True, num_samples=128, batch_size=32))
    start = time.perf_counter()
    scores = scoring.compute_scores(dense, calibration)
    print(f"OPTIN scores (heads, neurons, tokens) in {time.perf_counter() - start:.0f} s")

    models, rows = {"dense": dense}, {}
    for constraint in (0.6, 0.5):
        for tokens in (True, False):
            pruner = OptinPruner(OptinConfig(mac_constraint=constraint, prune_tokens=tokens, reconstruct="none"))
            model = pruner.prune_model(copy.deepcopy(dense), masks=pruner.compute_masks(dense, scores=scores))
            share = pruner.config.resolved_token_cut_share()
            mode = f"tau (tokens + params, share {share:.3f})" if tokens else "params only"
            models[(constraint, mode)] = model
            rows[(constraint, mode)] = (
                f"{accuracy(model, images, labels):.4f} | {count_macs(model) / base:.4f} | "
                f"{flop_counter_macs(model, images[0]) / flop_base:.4f}",
                pruner.masks.tokens_per_layer() or "all",
            )
    ms = latencies_ms(models, images, args.repeats)
    print(f"dense latency: {ms['dense']:.2f} ms per batch of 32 ({args.threads} thread(s))")
    print("\n| MACs kept | mode | accuracy | MACs / dense (count_macs) | MACs / dense (FLOP counter) | latency / dense | tokens per layer |")
    print("|---|---|---|---|---|---|---|")
    for (constraint, mode), (figures, schedule) in rows.items():
        print(f"| {constraint} | {mode} | {figures} | {ms[(constraint, mode)] / ms['dense']:.3f} | {schedule} |")

    print("\nmax_patch_envelope sweep (tau, same raw token losses, accuracy):")
    adapter = get_adapter(dense)
    batches = [
        {"pixel_values": torch.stack([c["pixel_values"] for c in calibration[i : i + 32]])} for i in range(0, 128, 32)
    ]
    with torch.no_grad():
        raw = reference_token_losses(dense, adapter, batches, capture_token_grams(dense, adapter, batches), 4.0)
    print("| max_patch_envelope | 0.6 | 0.5 |\n|---|---|---|")
    for envelope in (1.0, 10.0, 100.0):
        row = []
        for constraint in (0.6, 0.5):
            scores.token_scores = token_scores(raw.md, raw.kl, 10.0, envelope, 1.0)
            pruner = OptinPruner(OptinConfig(mac_constraint=constraint, prune_tokens=True, reconstruct="none"))
            model = pruner.prune_model(copy.deepcopy(dense), masks=pruner.compute_masks(dense, scores=scores))
            row.append(f"{accuracy(model, images, labels):.4f} {pruner.masks.tokens_per_layer()}")
        print(f"| {envelope:g} | " + " | ".join(row) + " |")
    vit_tiny_latency(max(5, args.repeats // 20))


if __name__ == "__main__":
    main()
