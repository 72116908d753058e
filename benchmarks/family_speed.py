"""Do the CNN, Swin and segmentation families' slim models run as much faster as their MACs say?

Each family is built at the real architecture of its reference checkpoint (the configs below
equal microsoft/resnet-50, facebook/convnext-tiny-224, microsoft/swin-tiny-patch4-window7-224,
nvidia/segformer-b0-finetuned-ade-512-512 and facebook/mask2former-swin-tiny-ade-semantic),
written out here because the Hub is unreachable. Weights are random: speed depends only on
the shapes, and magnitude and random masks (which read no activations) give the slim shapes.
Each model is slimmed at the MAC constraints with both criteria and timed against its dense
model as `slim_speed.py` times MiniLM: all models of a family in turns on one fixed batch, one
torch thread, medians of wall clock and of process CPU time (both read around the same runs:
batch 32 of ResNet-50 alone is about 130 GMACs, so the default of 3 runs after 1 warm-up is
meant to keep the script near 10 minutes on an idle 2-core machine, an estimate from the CPU
times; it took 27 minutes at load 3-9).

`count_macs` counts the encoder only where a segmentation model runs more (SegFormer's all-MLP
decode head, Mask2Former's pixel decoder and transformer decoder stay dense and are not
counted), so those families are timed twice: the whole model, and the counted part alone
(`part`), whose speed-up is the one the MAC ratio predicts.

    PYTHONPATH=. python benchmarks/family_speed.py [--quick] [--write-results]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    ResNetForImageClassification,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    SwinForImageClassification,
)

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import get_submodule
from optin_hf.tasks.latency import median, time_models_by_clocks
from optin_hf.tasks.report import kept_per_layer
from results import RESULTS, write_section

SECTION = "Slim speed of the CNN, Swin and segmentation families (issue 14)"
TARGET = 0.9

SWIN_TINY = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=1e-5)


@dataclass(frozen=True)
class Family:
    """A reference checkpoint's architecture: how to build it, the image side it runs at, and the
    submodule `count_macs` counts where the model runs more than that (None: the whole model)."""

    checkpoint: str
    build: Callable[[], nn.Module]
    image_size: int
    part: str | None = None


FAMILIES = {
    "resnet": Family("microsoft/resnet-50", lambda: ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck",
        hidden_act="relu", downsample_in_first_stage=False, downsample_in_bottleneck=False, num_labels=1000)), 224),
    "convnext": Family("facebook/convnext-tiny-224", lambda: ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, patch_size=4, num_stages=4, hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], hidden_act="gelu",
        layer_norm_eps=1e-12, layer_scale_init_value=1e-6, drop_path_rate=0.0, image_size=224, num_labels=1000)), 224),
    "swin": Family("microsoft/swin-tiny-patch4-window7-224", lambda: SwinForImageClassification(SwinConfig(
        **SWIN_TINY, num_labels=1000)), 224),
    "segformer": Family("nvidia/segformer-b0-finetuned-ade-512-512", lambda: SegformerForSemanticSegmentation(SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], hidden_sizes=[32, 64, 160, 256],
        patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4],
        hidden_act="gelu", decoder_hidden_size=256, num_labels=150, image_size=512)), 512, part="segformer"),
    # The backbone config's image_size (224) is what count_macs counts at, so the model is timed at it too
    # (the checkpoint's processor feeds 512-pixel crops; at 512 the window-attention share grows).
    "mask2former": Family("facebook/mask2former-swin-tiny-ade-semantic", lambda: Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=SwinConfig(**SWIN_TINY, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=150, num_queries=100, hidden_dim=256, mask_feature_size=256, feature_size=256, encoder_layers=6,
        decoder_layers=10, encoder_feedforward_dim=1024, dim_feedforward=2048, num_attention_heads=8, common_stride=4)),
        224, part="model.pixel_level_module.encoder"),
}


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] images; synthetic_inputs would read config.image_size, which a Mask2Former config lacks."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def slim_models(dense: nn.Module, image_size: int, constraints: list[float], criteria: list[str]) -> dict[str, nn.Module]:
    """The dense model and, per criterion and constraint, its slim copy as allocated by default."""
    calibration = [{"pixel_values": pixels(1, image_size)[0]}]  # magnitude and random read no activations
    models = {"dense": dense}
    for importance in criteria:
        for constraint in constraints:
            pruner = OptinPruner(OptinConfig(mac_constraint=constraint, importance=importance, reconstruct="none"))
            models[f"{importance} {constraint}"] = pruner.prune_model(copy.deepcopy(dense), calibration)
    return models


def rows(family: str, models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], runs: int, warmup: int) -> list[str]:
    """Table rows of one family: each slim model against dense, whole and (where it differs) the counted part."""
    spec = FAMILIES[family]
    dense_macs = count_macs(models["dense"])
    timed = {"whole": models}
    if spec.part:
        timed["part"] = {name: get_submodule(model, spec.part) for name, model in models.items()}
    out = []
    for scope, group in timed.items():
        times = time_models_by_clocks(group, inputs, {"wall": time.perf_counter, "cpu": time.process_time}, runs, warmup)
        wall, cpu = times["wall"], times["cpu"]
        label = "whole model" if scope == "whole" or not spec.part else f"`{spec.part.rsplit('.', 1)[-1]}` alone"
        for name, model in models.items():
            ratio = count_macs(model) / dense_macs
            speed_wall = median(wall["dense"]) / median(wall[name])
            speed_cpu = median(cpu["dense"]) / median(cpu[name])
            heads, neurons = (sum(kept) for kept in kept_per_layer(model))
            out.append(
                f"| {family} | {name} | {label} | {heads} / {neurons} | {ratio:.3f} | {1000 * median(wall[name]):.0f} "
                f"({1000 * min(wall[name]):.0f}-{1000 * max(wall[name]):.0f}) | {speed_wall:.2f} | {1000 * median(cpu[name]):.0f} "
                f"| {speed_cpu:.2f} | {speed_wall * ratio:.2f} | {speed_cpu * ratio:.2f} |"
            )
            print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.6])
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "random"], help="which masks to slim by (only their shapes matter)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="interleaved timed runs per clock (each family's models take turns)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 2, one run per clock, no warm-up")
    parser.add_argument("--write-results", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.runs, args.warmup = 2, 1, 0

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    load, start = os.getloadavg()[0], time.perf_counter()
    table = []
    for family in args.families:
        spec = FAMILIES[family]
        dense = spec.build().eval()
        models = slim_models(dense, spec.image_size, args.constraints, args.criteria)
        table += rows(family, models, {"pixel_values": pixels(args.batch_size, spec.image_size)}, args.runs, args.warmup)
    minutes = (time.perf_counter() - start) / 60
    lines = [
        f"Reference architectures with random weights ({', '.join(FAMILIES[f].checkpoint for f in args.families)}), "
        f"batch {args.batch_size}, {args.threads} torch thread(s), medians of {args.runs} interleaved runs "
        f"after {args.warmup} warm-up, torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPU cores, "
        f"load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, {minutes:.0f} min in all.",
        "",
        "| family | masks | timed | heads / neurons kept | MAC ratio | wall ms (min-max) | wall speed-up | CPU ms | CPU speed-up "
        "| wall speed-up x MAC ratio | CPU speed-up x MAC ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *table,
    ]
    print("\n".join(lines))
    if args.write_results:
        write_section(SECTION, f"Measured by `benchmarks/family_speed.py`. Target: speed-up x MAC ratio >= {TARGET} "
                      f"(the last two columns).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
