"""ResNet repairs with the 3x3 conv refit on digits-resnet's development folds (no test image is read).

The last 1x1 conv's refit rebuilds each bottleneck block's pre-activation sum. A cut of the block's 1x1-reduce
channels ("heads") reaches that sum only through the 3x3 conv, its BatchNorm and ReLU, which the 1x1 refit cannot
undo. The 3x3 conv is refit too, by ridge least squares (toward its own weights) from the slim model's input to it
onto the dense model's 3x3 output at the kept channels, with a bias folded into its BatchNorm's running mean.
Repairs (`--repairs`): `library`, the recipe's `reconstruct="weights"` with `reconstruct_readers` (per block in forward
order: the reduce conv and projection shortcut, the 3x3 conv, the last 1x1 conv; then the classifier on the pooled
features); `convs`, the same without the readers (the recipe before); `projections`, the last 1x1 convs alone
(`refit_convs=False`, the library's refit before the 3x3 refit); `wide`, the prototype that chose the 3x3 refit (the
1x1 refit, the 3x3 convs block by block, the 1x1 refit again); `inner-bn`. The refit allocation's cuts are measured
with any of them (`--allocation-repair`; the library measures them with `projections`); `--masks-dir` keeps each
allocation so every repair is judged on the same one. `--extra-train N` also refits (and measures the cuts) on N
training images. `--judge train` also judges on the 1,181 training images, as they are and moved by one pixel each
way (5,905 images, which no pruning step reads): disagreements with the dense model's top-1, mean KL from it,
accuracy. `--split cli` runs the CLI's own pipeline (the recipe on its seeded draw of all 256 calibration images) and
judges its masks with each repair on those training images only. `--split test` reads the test split (once per
setting chosen here on the development folds).

    PYTHONPATH=.:benchmarks nice -n 10 python benchmarks/resnet_block_refit.py [--budgets 0.6 0.5] [--rounds 1] [--scores-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import concatenate_datasets
from torch import nn

from optin_hf import OptinConfig, OptinPruner
from optin_hf import refit_allocation
from optin_hf.arch import check_model
from optin_hf.capture import scoring_forward
from optin_hf.data import prepare_calibration
from optin_hf.importance import ImportanceScores
from optin_hf.masks import PruningMasks
from optin_hf.macs import CostModel
from optin_hf.refit_allocation import allocate_by_refit
from optin_hf.slim import slim_model
from optin_hf.tasks.defaults import load_default
from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES
from optin_hf.tasks.defaults.splits import make_splits
from optin_hf.tasks.recipes import default_recipe
from optin_hf.tasks.task_data import calibration_rows
from optin_hf.tasks.report import split_accuracy

from cnn_repair_dev import dev_losses

LIBRARY = refit_allocation.reconstruct

# Each repair below has `reconstruct`'s signature and ignores the allocation's own `refit_convs`: it names its repair.


def library(model: nn.Module, dense: nn.Module, batches: list[dict], mode: str = "weights", ridge: float = 1e-3,
            adapter=None, progress: bool = True, **_):
    """The recipe's refit (`reconstruct_readers`): each block's reduce conv and shortcut, its 3x3 conv, then its last
    1x1 conv; the classifier last."""
    return LIBRARY(model, dense, batches, mode, ridge, adapter, progress=False, readers=True)


def convs(model: nn.Module, dense: nn.Module, batches: list[dict], mode: str = "weights", ridge: float = 1e-3,
          adapter=None, progress: bool = True, **_):
    """The library's refit without `readers` (the recipe before): each block's 3x3 conv, then its last 1x1 conv."""
    return LIBRARY(model, dense, batches, mode, ridge, adapter, progress=False)


def projections(model: nn.Module, dense: nn.Module, batches: list[dict], mode: str = "weights", ridge: float = 1e-3,
                adapter=None, progress: bool = True, **_):
    """The library's refit without the 3x3 convs (`refit_convs=False`): the last 1x1 convs alone, as before."""
    return LIBRARY(model, dense, batches, mode, ridge, adapter, progress=False, refit_convs=False)


def _seen(model: nn.Module, module: nn.Module, batches: list[dict], side: str) -> list[torch.Tensor]:
    """`module`'s input (side "in") or output ("out") on each batch of a full forward of `model`."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, out: seen.append((a[0] if side == "in" else out).detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                scoring_forward(model, batch)
    finally:
        hook.remove()
    return seen


def _kept(slim_norm: nn.BatchNorm2d, dense_norm: nn.BatchNorm2d) -> torch.Tensor:
    """Indices of the dense BatchNorm's channels the slim one kept (matched by their untouched parameters)."""
    keys = torch.stack([dense_norm.weight, dense_norm.bias, dense_norm.running_var], 1)
    slim = torch.stack([slim_norm.weight, slim_norm.bias, slim_norm.running_var], 1)
    return torch.tensor([int((keys == row).all(1).nonzero()[0]) for row in slim], dtype=torch.long)


@torch.no_grad()
def refit_3x3(model: nn.Module, dense: nn.Module, batches: list[dict], ridge: float) -> None:
    """Each block's 3x3 conv (and its BatchNorm's mean) refit to the dense 3x3 output, block by block, in place."""
    adapter = check_model(model)
    for slim_layer, dense_layer in zip(adapter.layers_of(model), adapter.layers_of(dense)):
        conv_layer, dense_conv_layer = slim_layer.layer[1], dense_layer.layer[1]
        conv = conv_layer.convolution
        if not conv.in_channels or not conv.out_channels:
            continue
        keep = _kept(conv_layer.normalization, dense_conv_layer.normalization)
        inputs = _seen(model, conv, batches, "in")
        targets = _seen(dense, dense_conv_layer.convolution, batches, "out")
        width = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, conv.out_channels, dtype=torch.float64)
        for x, y in zip(inputs, targets):
            cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, in*k*k, L]
            rows = torch.cat([cols.transpose(1, 2).reshape(-1, width - 1), torch.ones(cols.shape[0] * cols.shape[2], 1, dtype=torch.float64)], 1)
            gram += rows.T @ rows
            cross += rows.T @ y.double()[:, keep].permute(0, 2, 3, 1).reshape(-1, len(keep))
        theta0 = torch.cat([conv.weight.double().reshape(conv.out_channels, -1).T, torch.zeros(1, conv.out_channels, dtype=torch.float64)])
        lam = ridge * gram.diagonal().mean()
        theta = torch.linalg.solve(gram + lam * torch.eye(width, dtype=torch.float64), cross + lam * theta0)
        conv.weight.copy_(theta[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
        conv_layer.normalization.running_mean.sub_(theta[-1].to(conv_layer.normalization.running_mean.dtype))


@torch.no_grad()
def recentre_inner(model: nn.Module, dense: nn.Module, batches: list[dict], ridge: float) -> None:
    """Each block's first two BatchNorms (after the 1x1 reduce and the 3x3 conv) re-centred, in forward order: the
    running mean shifted by the slim model's calibration mean minus the dense model's at the kept channels."""
    adapter = check_model(model)
    for slim_layer, dense_layer in zip(adapter.layers_of(model), adapter.layers_of(dense)):
        for index in (0, 1):
            norm, dense_norm = slim_layer.layer[index].normalization, dense_layer.layer[index].normalization
            if not norm.num_features:
                continue
            keep = _kept(norm, dense_norm)
            slim_mean = torch.cat([x.double().mean((0, 2, 3))[None] for x in _seen(model, norm, batches, "in")]).mean(0)
            dense_mean = torch.cat([x.double().mean((0, 2, 3))[None] for x in _seen(dense, dense_norm, batches, "in")]).mean(0)[keep]
            norm.running_mean.add_((slim_mean - dense_mean).to(norm.running_mean.dtype))


def bn_repair(model: nn.Module, dense: nn.Module, batches: list[dict], mode: str = "weights", ridge: float = 1e-3,
              adapter=None, progress: bool = True, **_):
    """The 1x1 refit, the inner BatchNorms re-centred, the 1x1 refit again."""
    projections(model, dense, batches, mode, ridge, adapter)
    recentre_inner(model, dense, batches, ridge)
    return projections(model, dense, batches, mode, ridge, adapter)


def wide_repair(model: nn.Module, dense: nn.Module, batches: list[dict], mode: str = "weights", ridge: float = 1e-3,
                adapter=None, progress: bool = True, **_):
    """The prototype: the 1x1 refit, the 3x3 convs, the 1x1 refit again (the signature of `reconstruct`)."""
    projections(model, dense, batches, mode, ridge, adapter)
    refit_3x3(model, dense, batches, ridge)
    return projections(model, dense, batches, mode, ridge, adapter)


REPAIRS = {"library": library, "convs": convs, "projections": projections, "wide": wide_repair, "inner-bn": bn_repair}


SHIFTS = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]  # the training images as is and one pixel (down, right) each way


def shifted(pixels: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """The images [batch, channels, height, width] moved by (down, right) pixels, zeros (the background) moved in: the
    dense model, trained on the images unmoved, is 0.94 right on them, so a pruned model's slips show (the unmoved
    training images, which it learnt, are 1.000 dense and leave one disagreement per fold at 0.6)."""
    padded = F.pad(pixels, (max(right, 0), max(-right, 0), max(down, 0), max(-down, 0)))
    height, width = pixels.shape[-2:]
    top, left = max(-down, 0), max(-right, 0)
    return padded[..., top: top + height, left: left + width]


@torch.no_grad()
def train_judge(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """On the training images (which neither scoring, the allocation nor the refit reads): [disagreements with the
    dense model's top-1, summed KL(dense || model), images right]."""
    logits = torch.cat([model.eval()(pixel_values=chunk).logits for chunk in pixels.split(256)])
    log_p, log_q = logits.log_softmax(-1), reference.log_softmax(-1)
    top = logits.argmax(-1)
    return [float((top != reference.argmax(-1)).sum()), float((log_q.exp() * (log_q - log_p)).sum()), float((top == labels).sum())]


def training_images(count: int | None):
    """The first `count` images (all when None) of digits-resnet's training split (never a calibration or test image):
    more images for the refit and the allocation's cuts, or a judge that no pruning step reads."""
    recipe = RECIPES["digits-resnet"]
    train = make_splits(CORPORA[recipe.corpus](**recipe.corpus_options), recipe.split).train
    return train if count is None else train.select(range(count))


def cli_masks(task, budget: float, rounds: int) -> tuple[PruningMasks, list[dict], nn.Module]:
    """What `optimum-cli optin prune --default digits-resnet --mac-constraint budget` computes before its repair: the
    recipe's config on the CLI's seeded draw of the calibration images; its masks, its refit batches and its model."""
    config = dataclasses.replace(default_recipe("digits-resnet").optin, mac_constraint=budget, allocation_rounds=rounds)
    rows = calibration_rows(task.calibration, max(config.num_samples, config.reconstruct_samples), config.seed)
    examples = [{"pixel_values": torch.as_tensor(row["pixel_values"], dtype=torch.float32)} for row in rows]
    pruner, model = OptinPruner(config), copy.deepcopy(task.model)
    pruner.prune_model(model, examples)
    return pruner.masks, pruner._reconstruction_batches(model, check_model(model), examples, None), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.5])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scored-images", type=int, default=128)
    parser.add_argument("--allocation-repair", nargs="+", choices=["library", "projections", "wide"], default=["projections"])
    parser.add_argument("--repairs", nargs="+", choices=list(REPAIRS), default=["projections", "library", "wide"],
                        help="library: the recipe's refit (reduce conv and shortcut, 3x3 conv, 1x1 conv per block, "
                             "then the classifier: reconstruct_readers); convs: without the readers (3x3 then 1x1 conv "
                             "per block: the recipe before); projections: the 1x1 convs "
                             "alone; wide: the prototype (1x1, 3x3, 1x1); inner-bn: the 1x1 refit, each block's first "
                             "two BatchNorms re-centred, the 1x1 refit again")
    parser.add_argument("--scores-dir", help="cnn_repair_dev.py's --scores-dir (the same fold scores)")
    parser.add_argument("--masks-dir", help="keep each fold's allocation here and reuse it (the same allocation for every repair)")
    parser.add_argument("--extra-train", type=int, default=0,
                        help="also refit (and measure the allocation's cuts) on this many training images; scoring "
                             "stays on the fold's calibration images")
    parser.add_argument("--judge", choices=["dev", "train"], default="dev",
                        help="train: also judge on the training images (disagreements with the dense model, KL, "
                             "accuracy), which nothing here reads unless --extra-train is given")
    parser.add_argument("--split", choices=["development", "cli", "test"], default="development",
                        help="cli: the CLI's pipeline (the recipe on its seeded draw of all 256 calibration images; the "
                             "library's repair is its model) judged on the training images only; test: scored and "
                             "repaired on all 256 calibration images (the recipe's), judged on the test split")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_default("digits-resnet")
    calibration = task.calibration
    halves = [calibration.select(range(128)), calibration.select(range(128, 256))]
    folds = [(halves[0], halves[1]), (halves[1], halves[0])]
    if args.split == "test":
        folds, args.scored_images = [(calibration, task.test)], len(calibration)
    if args.split == "cli":
        folds, args.allocation_repair = [(calibration, None)], ["cli"]
    judged = sum(len(dev) for _, dev in folds if dev is not None)
    if args.judge == "train" or args.split == "cli":
        if args.extra_train:
            parser.error("--judge train needs training images no refit reads: leave --extra-train 0")
        train = training_images(None)
        pixels = torch.cat([shifted(torch.tensor(train["pixel_values"]), *shift) for shift in SHIFTS])
        labels = torch.tensor(train["label"]).repeat(len(SHIFTS))
        with torch.no_grad():
            reference = torch.cat([task.model.eval()(pixel_values=chunk).logits for chunk in pixels.split(256)])
        print(f"dense on the {len(train)} training images as they are and moved: accuracy {float((reference.argmax(-1) == labels).float().mean()):.4f}", flush=True)
    correct: dict = {}
    on_train: dict = {}
    for fold, (fit, dev) in enumerate(folds):
        if args.split != "cli":
            refit_on = fit if not args.extra_train else concatenate_datasets([fit, training_images(args.extra_train)])
            batches = prepare_calibration(refit_on, None, num_samples=len(refit_on), batch_size=32, max_length=128)
            pruner = OptinPruner(OptinConfig(num_samples=args.scored_images, neuron_group_size=1, neurons_multiple_of=1,
                                             importance="optin", reconstruct="none", seed=0,
                                             prune_channels=False))  # the recipe keeps the widths
            cached = args.scores_dir and Path(args.scores_dir) / f"optin-{args.scored_images}{'-test' if args.split == 'test' else ''}-fold{fold}.safetensors"
            if cached and cached.is_file():
                scores = ImportanceScores.load(cached)
                pruner.compute_masks(task.model, fit, scores=dataclasses.replace(scores, channel_scores=None))
            else:
                scores = pruner.compute_scores(task.model, fit.select(range(args.scored_images)))
                if cached:
                    scores.save(cached)
            adapter = check_model(task.model)
            costs = CostModel.of(task.model, adapter, pruner.image_size)
            at, dense_macs = costs.at(costs.uniform(pruner.seq_len)), costs.dense(pruner.seq_len)
        for allocation in args.allocation_repair:
            for budget in args.budgets:
                kept = args.masks_dir and Path(args.masks_dir) / (
                    f"{args.split}-{allocation}-r{args.rounds}-s{args.scored_images}-x{args.extra_train}-fold{fold}-{budget}.safetensors")
                if args.split == "cli":
                    masks, batches, cli_model = cli_masks(task, budget, args.rounds)
                elif kept and kept.is_file():
                    masks = PruningMasks.load(kept)
                else:
                    refit_allocation.reconstruct = REPAIRS[allocation]
                    try:
                        masks = allocate_by_refit(task.model, adapter, scores.head_scores, scores.neuron_scores, at, costs.units,
                                                  budget * dense_macs, batches, "weights", 1e-3, neurons_multiple_of=1,
                                                  rounds=args.rounds)
                    finally:
                        refit_allocation.reconstruct = LIBRARY
                    if kept:
                        masks.save(kept)
                for repair in args.repairs:
                    model = slim_model(copy.deepcopy(task.model), masks).eval()
                    start = time.perf_counter()
                    REPAIRS[repair](model, task.model, batches, "weights", 1e-3, progress=False)
                    seconds = time.perf_counter() - start
                    key = (allocation, repair, budget)
                    if args.split == "cli" and repair == "library":  # the CLI's own model: the same repair reproduces it
                        with torch.no_grad():
                            gap = (model(pixel_values=pixels[:64]).logits - cli_model(pixel_values=pixels[:64]).logits).abs().max()
                        print(f"  library repair vs the CLI's model: max logit gap {float(gap):.2e}", flush=True)
                    if dev is not None:
                        ce, kl = dev_losses(model, task.model, dev)
                        correct[key] = [a + b for a, b in zip(correct.get(key, [0, 0, 0]), [split_accuracy(model, dev, None) * len(dev), ce, kl])]
                    judged_train = train_judge(model, pixels, labels, reference) if args.judge == "train" or args.split == "cli" else None
                    if judged_train:
                        on_train[key] = [a + b for a, b in zip(on_train.get(key, [0, 0, 0]), judged_train)]
                    print(f"  fold {fold} cuts by {allocation}, repair {repair} ({seconds:.1f} s) @{budget}: heads "
                          f"{masks.head_mask.sum(1).tolist()} neurons {masks.neuron_mask.sum(1).tolist()}"
                          + (" train: disagree {:.0f}, KL {:.2f}, right {:.0f}".format(*judged_train) if judged_train else ""),
                          flush=True)
    print(f"rounds {args.rounds}, {args.scored_images} scored, split {args.split}")
    if correct:
        print("dev images (accuracy, mean CE, mean KL)\n| cuts measured with | repair | " + " | ".join(f"@{b}" for b in args.budgets) + " |")
        for allocation in args.allocation_repair:
            for repair in args.repairs:
                print(f"| {allocation} | {repair} | " + " | ".join(
                    "{:.3f} (CE {:.4f}, KL {:.4f})".format(*(v / judged for v in correct[allocation, repair, b])) for b in args.budgets) + " |")
    if on_train:
        print(f"training images, summed over the folds (disagreements with dense, mean KL, accuracy; {len(folds)} x {len(labels)} images)\n"
              "| cuts measured with | repair | " + " | ".join(f"@{b}" for b in args.budgets) + " |")
        for allocation in args.allocation_repair:
            for repair in args.repairs:
                print(f"| {allocation} | {repair} | " + " | ".join(
                    "{:.0f} / {:.4f} / {:.4f}".format(v[0], v[1] / (len(folds) * len(labels)), v[2] / (len(folds) * len(labels)))
                    for v in (on_train[allocation, repair, b] for b in args.budgets)) + " |")


if __name__ == "__main__":
    main()
