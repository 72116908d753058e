"""The model card of a pushed repo: what was pruned and how much, the scores, and how to load it."""

from __future__ import annotations

import json
from typing import TypedDict

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..config import checked_type
from ..macs import CostModel, counted_at
from ..reconstruct import RECONSTRUCTION_NAME
from ..search_record import search_record
from ..result import PruningResult, pruning_result

LIBRARY_NAME = "optin-hf"
# Card metrics whose name holds one of these are fractions in [0, 1], or correlations in [-1, 1].
FRACTIONS = ("accuracy", "f1", "precision", "recall", "iou")
CORRELATIONS = ("matthews", "pearson", "spearman")


class CardMetrics(TypedDict, total=False):
    """Dense vs pruned scores on one evaluation set, for the model card (`model-index` and a table).

    Required: `task_type` (e.g. "text-classification"), `dataset_type` (the dataset's Hub id) and `pruned`
    (metric name -> value of the pruned model); `dense` holds the base model's values under the same names.
    """

    task_type: str
    dataset_type: str
    dataset_name: str
    dataset_config: str
    dataset_split: str
    pruned: dict[str, float]
    dense: dict[str, float]


def _costs(model: nn.Module, result: PruningResult) -> CostModel:
    """The slim model's cost model at the image size the result records (a checkpoint saved before the
    size was recorded: the config's), so the card counts where the pruner counted."""
    return CostModel.of(model, image_size=result.config.image_size)


def _macs(model: nn.Module, result: PruningResult) -> tuple[float, float] | None:
    """(dense, pruned) encoder MACs at the result's sequence length and image size; None when that length is unknown.

    Both come from the slim model's `CostModel`: the dense count has every head and neuron, every
    layer at all `seq_len` tokens (a token-merged model's dense base runs no schedule and no
    matching), and the shared attention of layers the slim model emptied."""
    if result.seq_len is None:
        return None
    costs = _costs(model, result)
    return costs.dense(result.seq_len), costs.model_macs(result.seq_len)


def _metric_range(name: str) -> tuple[float, float] | None:
    """The values metric `name` can take, on the 0-1 scale optin-hf's reports use; None: any finite number."""
    lowered = name.lower()
    if any(word in lowered for word in CORRELATIONS):
        return -1.0, 1.0
    if any(word in lowered for word in FRACTIONS):
        return 0.0, 1.0
    return None


def check_card_metrics(metrics: CardMetrics | None, speedup: float | None = None) -> None:
    """Refuse what would publish a wrong number on a card: a speedup that is not a positive finite number, a
    NaN or non-numeric score, a fraction outside [0, 1] (a percentage, or a bug), a correlation outside [-1, 1],
    or a key of `metrics` that is missing, misspelt or of the wrong type. Run before anything is written or created."""
    speedup = checked_type("speedup", speedup, float | None)
    if speedup is not None and speedup <= 0:
        raise ValueError(f"speedup={speedup!r} must be > 0: it is the dense latency over the slim one (1.5 = 1.5x faster).")
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics={metrics!r} must be a mapping; see optin_hf.hub.CardMetrics for its keys.")
    missing = {"task_type", "dataset_type", "pruned"} - set(metrics)
    unknown = set(metrics) - set(CardMetrics.__annotations__)
    if missing or unknown:
        problem = f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(unknown)}"
        raise ValueError(f"metrics {problem}; see optin_hf.hub.CardMetrics for its keys.")
    for key in ("task_type", "dataset_type", "dataset_name", "dataset_config", "dataset_split"):
        if key in metrics and checked_type(f"metrics[{key!r}]", metrics[key], str) == "":
            raise ValueError(f"metrics[{key!r}] is empty.")
    for group in ("pruned", "dense"):
        values = checked_type(f"metrics[{group!r}]", metrics.get(group, {}), dict)
        if group == "pruned" and not values:
            raise ValueError("metrics['pruned'] is empty: give at least one metric name -> value of the pruned model.")
        for name, value in values.items():
            where = f"metrics[{group!r}][{name!r}]"
            value = checked_type(where, value, float)
            bounds = _metric_range(str(name))
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                raise ValueError(
                    f"{where}={value!r} is outside [{bounds[0]:g}, {bounds[1]:g}]: give scores as fractions "
                    "(0.853, not 85.3), as optin-hf's reports do."
                )


def _eval_results(metrics: CardMetrics) -> list[EvalResult]:
    """The pruned scores under their metric type; the dense ones typed `dense_<metric>`, so a leaderboard reading
    this card never credits the pruned model with the base model's score."""
    dataset = dict(
        task_type=metrics["task_type"],
        dataset_type=metrics["dataset_type"],
        dataset_name=metrics.get("dataset_name", metrics["dataset_type"]),
        dataset_config=metrics.get("dataset_config"),
        dataset_split=metrics.get("dataset_split"),
    )
    results = [
        EvalResult(**dataset, metric_type=name, metric_name=f"{name} (pruned)", metric_value=value)
        for name, value in metrics["pruned"].items()
    ]
    results += [
        EvalResult(**dataset, metric_type=f"dense_{name}", metric_name=f"{name} (dense base model)", metric_value=value)
        for name, value in metrics.get("dense", {}).items()
    ]
    return results


def model_card(
    model: nn.Module,
    repo_id: str,
    *,
    masks_only: bool,
    base_model: str | None,
    base_revision: str | None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
) -> ModelCard:
    """The README.md of a pushed repo: what the pruned `model` is (the result it carries), how much was
    pruned, the scores, and how to load it."""
    check_card_metrics(metrics, speedup)
    result = pruning_result(model)
    config, masks = result.config, result.masks
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        tags=["optin", "pruning", model.config.model_type],
        model_name=model_name,
        eval_results=_eval_results(metrics) if metrics else None,
    )
    base = f"`{base_model}` at commit `{base_revision}`" if base_model else "A model that is not on the Hub"
    kind = "only the pruning masks" if masks_only else "the slim weights"
    head_present, neuron_present = masks.present()
    table = [
        "| | dense | pruned |",
        "|---|---|---|",
        f"| attention heads | {int(head_present.sum())} | {int(masks.head_mask.sum())} |",
        f"| FFN neurons | {int(neuron_present.sum())} | {int(masks.neuron_mask.sum())} |",
    ]
    macs = _macs(model, result)
    if macs is not None:
        dense, pruned = macs
        share = f"{pruned:.4g} ({pruned / dense:.1%})"
        at = counted_at(result.seq_len, _costs(model, result).image_size)
        table.append(f"| encoder MACs per example ({at}) | {dense:.4g} | {share} |")
    for name, value in (metrics or {}).get("pruned", {}).items():
        table.append(f"| {name} on {metrics['dataset_type']} | {metrics.get('dense', {}).get(name, '')} | {value} |")
    if speedup is not None:
        table.append(f"| measured speedup | 1.00x | {speedup:.2f}x |")
    per_layer = ["| layer | heads | FFN neurons |", "|---|---|---|"]
    per_layer += [
        f"| {i} | {h} / {dense_h} | {n} / {dense_n} |"
        for i, (h, n, dense_h, dense_n) in enumerate(
            zip(masks.heads_per_layer(), masks.neurons_per_layer(), head_present.sum(1).tolist(), neuron_present.sum(1).tolist())
        )
    ]
    if masks_only:
        how = f"The loader downloads `{base_model}` at commit `{base_revision}` and removes the pruned structures."
    else:
        how = (
            "Plain `transformers` refuses this repo with a message pointing to optin-hf: its layers have per-layer "
            "sizes that only optin-hf builds."
        )
    if result.reconstruction is not None:
        size = sum(t.numel() * t.element_size() for t in result.reconstruction.tensors.values())
        what, differ = (
            ("the running means of its BatchNorms were re-estimated", "BatchNorm statistics") if config.reconstruct == "batchnorm"
            else ("each sublayer's output projection was refit by ridge least squares", "weights")
        )
        how += (
            f" After slimming, {what} on "
            f"{config.reconstruct_samples} calibration examples (`reconstruct=\"{config.reconstruct}\"`), so the kept "
            f"{differ} differ from the base model's"
            + (f"; this repo carries them in `{RECONSTRUCTION_NAME}` ({size / 1e6:.2f} MB)." if masks_only else ".")
        )
    if base_model:
        how += f" The tokenizer (or image processor) is the base model's: load it from `{base_model}`."
    settings = {k: v for k, v in config.to_dict().items() if not k.startswith("base_model") and v not in ({}, None)}
    searched = search_record(settings)
    # the task loss on the held-out labels, where the examples had labels (lower is better)
    losses = searched is not None and any(c.loss is not None for c in searched.candidates)
    chosen = [] if searched is None else [
        "## How the recipe was chosen", "", searched.lines()[0] + ". Distance from the dense model on those examples "
        "(lower is closer)" + (" and task loss on their labels" if losses else "") + ":", "",
        "| recipe | held-out distance | KL | MD |" + (" held-out loss |" if losses else ""), "|---|---|---|---|" + ("---|" if losses else ""),
        *(f"| {c.label}{' (chosen)' if i == searched.chosen else ''} | "
          + (f"{c.distance:.5g} | {c.kl:.5g} | {c.md:.5g} |" if c.distance is not None else f"{c.skipped} | | |")
          + ((" |" if c.loss is None else f" {c.loss:.5g} |") if losses else "")
          for i, c in enumerate(searched.candidates)), "",
    ]
    body = [
        f"# {model_name}",
        "",
        f"{base}, pruned with [OPTIN](https://arxiv.org/abs/2403.17921) (ICLR 2024): one-shot, retraining-free "
        f"structured pruning of attention heads and FFN neurons (importance `{config.importance}`) down to at most "
        f"{config.mac_constraint:.0%} of the encoder MACs. This repo holds {kind}.",
        "",
        *table,
        "",
        "Kept per layer:",
        "",
        *per_layer,
        "",
        "## How to load",
        "",
        "```python",
        "from optin_hf import AutoOptinModel  # pip install optin-hf",
        "",
        f'model = AutoOptinModel.from_pretrained("{repo_id}")',
        "```",
        "",
        how,
        "",
        *chosen,
        "## Pruning settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))
