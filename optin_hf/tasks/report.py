"""What pruning bought and cost: dense vs pruned metric, MACs, parameters, latency, kept structures.

`measure` evaluates and times the models on this machine; `Report` prints the comparison as a
table and writes it next to the model as `optin_report.json` and `optin_report.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from torch import nn

from ..arch import check_model
from .latency import median, synthetic_inputs, time_models
from ..macs import count_macs, counted_at, recorded_image_size
from ..search_record import RECORD_KEY, search_record
from .generation import GENERATED_TOKENS, PROMPT_TOKENS, TOKEN_BATCHES, tokens_per_second
from .metrics import PERPLEXITY, Metric, load_metric
from .names import CAUSAL_LM
from .task_data import Encoder, LabelEncoder, MaskEncoder, TaskData, eval_rows, in_memory_task_data, label_encoder
from .windows import negative_log_likelihood

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_JSON = "optin_report.json"
REPORT_PNG = "optin_report.png"
SEGMENTATION_PNG = "optin_segmentation.png"
LATENCY_BATCH = 32
LATENCY_RUNS = 7


@dataclass
class ModelStats:
    """One model's numbers. metrics: None when there was no evaluation split. tokens_per_s: a language
    model's speeds (`generation.tokens_per_second`: forward and generate, at batch 1 and 16)."""

    metrics: dict[str, float] | None
    macs: float
    parameters: int
    latency_s: float
    throughput: float
    heads_per_layer: list[int]
    neurons_per_layer: list[int]
    tokens_per_s: dict[str, float] | None = None


@dataclass
class Report:
    """The comparison of `stats` ("dense" and "pruned", or one model for `optin evaluate`)."""

    model: str
    task: str
    metric: str
    metric_source: str
    main_metric: str
    seq_len: float  # text: the average tokens MACs are counted at; images: the tokens of one `image_size` image
    eval_samples: int
    latency: dict[str, Any]
    stats: dict[str, ModelStats]
    num_heads: int
    intermediate_size: int
    unit_names: tuple[str, str] = ("attention heads", "FFN neurons")  # the family's words (ArchAdapter.unit_names)
    optin: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] | None = None  # [height, width] an image model's MACs are counted at
    eval_window: int | None = None  # a language model's evaluation windows, in tokens (`tasks.windows`)

    @property
    def counted_at(self) -> str:
        """What the MACs were counted at, in the model's terms: "64x64 images", or "12.00 tokens"."""
        return counted_at(self.seq_len, self.image_size, digits=2)

    def ratios(self) -> dict[str, float] | None:
        """pruned / dense for MACs, parameters and latency; speedup = dense / pruned latency. A metric
        where lower is better (perplexity) gives `{key}_ratio` = pruned / dense, any other `{key}_drop` =
        dense - pruned; a language model's speeds give `tokens_per_s_{speed}` = pruned / dense."""
        if not {"dense", "pruned"} <= set(self.stats):
            return None
        dense, pruned = self.stats["dense"], self.stats["pruned"]
        ratios = {
            "macs": pruned.macs / dense.macs,
            "parameters": pruned.parameters / dense.parameters,
            "latency": pruned.latency_s / dense.latency_s,
            "speedup": dense.latency_s / pruned.latency_s,
        }
        if dense.metrics and pruned.metrics and self.metric == PERPLEXITY:
            ratios.update({f"{k}_ratio": pruned.metrics[k] / dense.metrics[k] for k in dense.metrics})
        elif dense.metrics and pruned.metrics:
            ratios.update({f"{k}_drop": dense.metrics[k] - pruned.metrics[k] for k in dense.metrics})
        if dense.tokens_per_s and pruned.tokens_per_s:
            ratios.update({f"tokens_per_s_{k}": pruned.tokens_per_s[k] / dense.tokens_per_s[k] for k in _speeds(dense)})
        return ratios

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratios": self.ratios()}

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        (folder / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if self.ratios() is not None:
            self.plot(folder / REPORT_PNG)

    def table(self) -> str:
        names = list(self.stats)
        compare = self.ratios() is not None
        ratios = self.ratios() or {}
        header = ("", *names, *(["pruned vs dense"] if compare else []))
        rows: list[tuple[str, ...]] = []

        def row(label: str, values: list[str], ratio: str = "") -> None:
            rows.append((label, *values, *([ratio] if compare else [])))

        language_model = self.task == CAUSAL_LM
        for key in self.stats[names[0]].metrics or []:
            if self.metric == PERPLEXITY:  # lower is better: its values as they are, and the relative rise
                rise = f"{100 * (ratios[f'{key}_ratio'] - 1) + 0.0:+.1f}%" if f"{key}_ratio" in ratios else ""
                row(key, [_plain(self.stats[n].metrics, key) for n in names], rise)
                continue
            drop = f"{-100 * ratios[f'{key}_drop'] + 0.0:+.2f} pt" if f"{key}_drop" in ratios else ""
            row(f"{key} (x100)", [_points(self.stats[n].metrics, key) for n in names], drop)
        macs = f"MACs per token at a {self.seq_len:.0f}-token context" if language_model else f"MACs at {self.counted_at}"
        row(macs, [format_si(self.stats[n].macs) for n in names], f"{ratios.get('macs', 0):.3f}")
        removed = f" ({100 * (1 - ratios['parameters']):.1f}% removed)" if language_model and "parameters" in ratios else ""
        row("parameters", [format_si(self.stats[n].parameters) for n in names], f"{ratios.get('parameters', 0):.3f}{removed}")
        row(
            f"latency, batch {self.latency['batch_size']}",
            [f"{1000 * self.stats[n].latency_s:.1f} ms" for n in names],
            _speed(ratios.get("speedup", 1.0)),
        )
        row("throughput", [f"{self.stats[n].throughput:.1f} ex/s" for n in names])
        for speed in _speeds(self.stats[names[0]]):
            kind, batch = speed.split("_batch_")
            ratio = f"x{ratios[f'tokens_per_s_{speed}']:.2f}" if f"tokens_per_s_{speed}" in ratios else ""
            row(f"tokens/s, {kind}, batch {batch}", [f"{self.stats[n].tokens_per_s[speed]:.1f}" for n in names], ratio)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"optin-hf report: {self.model} ({self.task})"]
        if self.optin:
            o = self.optin
            lines.append(
                f"OPTIN: mac_constraint={o['mac_constraint']}, importance={o['importance']}, faithful={o['faithful']}, "
                f"num_samples={o['num_samples']}, seed={o['seed']}"
                + (f", reconstruct={o['reconstruct']} on {o['reconstruct_samples']} examples" if o.get("reconstruct", "none") != "none" else "")
                + (f", prune_steps={o['prune_steps']}" if o.get("prune_steps", 1) > 1 else "")
            )
            searched = search_record(o) if RECORD_KEY in (o.get("extra") or {}) else None  # importance="auto" chose it
            lines += searched.lines() if searched is not None else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        for n in [n for n in names if not (compare and n == "dense")]:  # dense keeps everything
            stats = self.stats[n]
            heads, neurons = " ".join(map(str, stats.heads_per_layer)), " ".join(map(str, stats.neurons_per_layer))
            if self.num_heads:
                lines.append(f"{self.unit_names[0]} kept per layer, {n} (of {self.num_heads}): {heads}")
            lines.append(f"{self.unit_names[1]} kept per layer, {n} (of {self.intermediate_size}): {neurons}")
        if self.timings:
            lines.append("pruning took " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in self.timings.items()))
        lat = self.latency
        inputs = f"on {self.counted_at}" if self.image_size else f"at {lat['tokens']} tokens/example"
        evaluated = (f"{self.eval_samples} windows of {self.eval_window} tokens" if language_model and self.eval_window
                     else f"{self.eval_samples} examples")
        lines.append(
            f"{self.metric} on {evaluated}, computed by {self.metric_source}; latency on {lat['device']}: "
            f"median of {lat['runs']} interleaved runs {inputs}, {lat['threads']} torch threads"
        )
        if language_model and self.stats[names[0]].tokens_per_s:
            lines.append(f"tokens/s: forward over {lat['tokens']}-token windows; generate: {GENERATED_TOKENS} new tokens "
                         f"(greedy, KV cache) after a {PROMPT_TOKENS}-token prompt")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """Write `figure` as the report's PNG."""
        self.figure().savefig(path, dpi=110)

    def figure(self) -> Figure:
        """Heads and neurons kept per layer, and the metric against the MACs kept (dense and pruned).

        One drawing for the saved report and the Space's chart, so a fix to one reaches both.
        """
        # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        dense, pruned = self.stats["dense"], self.stats["pruned"]
        ratios = self.ratios()
        layers = np.arange(len(pruned.heads_per_layer))
        fig = Figure(figsize=(15, 4.8), layout="constrained")
        axes = fig.subplots(1, 3)
        for ax, kept, full, what in (  # the dense model's own counts: layers may differ in width (Swin, CNN stages)
            (axes[0], pruned.heads_per_layer, dense.heads_per_layer, self.unit_names[0]),
            (axes[1], pruned.neurons_per_layer, dense.neurons_per_layer, self.unit_names[1]),
        ):
            if not max(full, default=0):  # a family without heads (ConvNeXt)
                ax.text(0.5, 0.5, f"no {what} in this family", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            ax.bar(layers, full, color="#dddddd", label="dense")
            bars = ax.bar(layers, kept, color="#3b75af", label="kept")
            ax.bar_label(bars, fontsize=7 if max(full) >= 1000 else 8, padding=2)
            ax.set_xticks(layers)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, max(full) * 1.22)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"{what} per layer")
            ax.set_title(f"{what}: {sum(kept)} of {sum(full)} kept")
            ax.legend(loc="upper left", ncols=2, fontsize=8, frameon=False)
        ax = axes[2]
        key = self.main_metric
        scale = 1.0 if self.metric == PERPLEXITY else 100.0  # perplexity is no fraction
        if dense.metrics and pruned.metrics:
            points = [
                (100.0, scale * dense.metrics[key], "dense", "#7f7f7f"),
                (100 * ratios["macs"], scale * pruned.metrics[key], "pruned", "#3b75af"),
            ]
            ax.plot([p[0] for p in points], [p[1] for p in points], color="#bbbbbb", zorder=1)
            for x, y, name, color in points:
                ax.scatter([x], [y], s=80, color=color, zorder=3)
                ax.annotate(f"{name}: {y:.2f}", (x, y), textcoords="offset points", xytext=(0, 10), ha="center", fontsize=9)
            values = [p[1] for p in points]
            spread = max(1.0, max(values) - min(values))
            ax.set_ylim(min(values) - spread, max(values) + spread)
            ax.set_ylabel(key if scale == 1.0 else f"{key} (x100)")
        else:
            ax.text(0.5, 0.5, "no evaluation split", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 120)
        at = f"per token at a {self.seq_len:.0f}-token context" if self.task == CAUSAL_LM else f"at {self.counted_at}"
        ax.set_xlabel(f"MACs, % of dense ({format_si(dense.macs)} {at})")
        batch = self.latency["batch_size"]
        ax.set_title(f"{self.metric} vs MACs; measured {_speed(ratios['speedup'])} at batch {batch}")
        ax.grid(alpha=0.3)
        fig.suptitle(f"OPTIN pruning report: {self.model}")
        return fig


def _speed(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _points(metrics: dict[str, float] | None, key: str) -> str:
    return f"{100 * metrics[key]:.2f}" if metrics else "n/a"


def _plain(metrics: dict[str, float] | None, key: str) -> str:
    return f"{metrics[key]:.3f}" if metrics else "n/a"


def _speeds(stats: ModelStats) -> list[str]:
    """A language model's speeds (`generation.tokens_per_second`'s keys, without the seconds)."""
    return [key for key in stats.tokens_per_s or {} if not key.endswith("_s")]


def format_si(value: float) -> str:
    """A count with an SI prefix and two decimals: 1.23 G, 4.56 M, 7.89 k, 12."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


@torch.no_grad()
def predicted_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on `batch` (moved to its device), as float32 on the CPU: what the adapter's
    `logits_of` reads from the output, so a Mask2Former gives its semantic map [B, classes, h, w]
    exactly as its KL term sees it."""
    device = next(model.parameters()).device
    output = model(**{k: v.to(device) for k, v in batch.items()})
    return check_model(model).logits_of(output).float().cpu()


def class_maps(logits: torch.Tensor, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Per-image predicted class maps ([B, C, h, w] logits, argmax after a bilinear resize to each
    mask's size, as SegFormer's post_process_semantic_segmentation does; Mask2Former's resizes its
    mask logits before building the map, so a few boundary pixels may differ from it)."""
    maps = []
    for image_logits, mask in zip(logits, masks):
        resized = nn.functional.interpolate(image_logits[None], size=mask.shape, mode="bilinear", align_corners=False)
        maps.append(resized[0].argmax(0).numpy())
    return maps


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: TaskData, encoder: Encoder, labels: LabelEncoder | MaskEncoder | None, metric: Metric, batch_size: int = 32
) -> tuple[dict[str, float], int, float | None]:
    """(metric values, examples, average unpadded tokens or None for images) on the evaluation split;
    a language model's: (perplexity, its windows, the window length; `tasks.windows`)."""
    model.eval()
    if data.task == CAUSAL_LM:
        windows = encoder.windows(data.evaluation, data.max_eval_samples)
        nll, tokens = negative_log_likelihood(model, windows)
        return metric.compute([nll], [tokens]), len(windows), float(windows.shape[1])
    rows = eval_rows(data.evaluation, data.max_eval_samples)
    predictions, references, tokens = [], [], []
    while chunk := list(islice(rows, batch_size)):
        batch = encoder.batch(chunk)
        logits = predicted_logits(model, batch)
        targets = labels([row[data.columns.label] for row in chunk])
        if metric.per_pixel:
            predictions += class_maps(logits, targets)
            references += targets
            continue
        predictions.append(logits[:, 0] if metric.regression else logits.argmax(-1))
        references.append(targets)
        if "attention_mask" in batch:
            tokens.append(batch["attention_mask"].sum(-1))
    if not predictions:
        raise ValueError("The evaluation split is empty.")
    if metric.per_pixel:
        return metric.compute(predictions, references), len(references), None
    values = metric.compute(torch.cat(predictions).numpy(), np.concatenate(references))
    average = float(torch.cat(tokens).float().mean()) if tokens else None
    return values, len(np.concatenate(references)), average


def plot_segmentations(
    models: dict[str, nn.Module], data: TaskData, encoder: Encoder, labels: MaskEncoder, path: str | os.PathLike, examples: int = 4
) -> None:
    """Write `segmentation_figure` as the report's segmentation PNG."""
    segmentation_figure(models, data, encoder, labels, examples).savefig(path, dpi=90)


@torch.no_grad()
def segmentation_figure(
    models: dict[str, nn.Module], data: TaskData, encoder: Encoder, labels: MaskEncoder, examples: int = 4
) -> Figure:
    """A panel of the first `examples` evaluation images: the image, its ground truth, and each
    model's prediction (dense and pruned), one row per image; ignored pixels are white. One drawing
    for the CLI's `optin_segmentation.png` and the Space's panel."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rows = list(eval_rows(data.evaluation, examples))
    batch = encoder.batch(rows)
    masks = labels([row[data.columns.label] for row in rows])
    maps = {}
    for name, model in models.items():
        model.eval()
        maps[name] = class_maps(predicted_logits(model, batch), masks)
    num_labels = next(iter(models.values())).config.num_labels
    colors = ListedColormap(np.vstack([[0.0, 0.0, 0.0, 1.0], _palette(num_labels - 1)]))  # class 0 (background) black
    columns = ["image", "ground truth", *maps]
    fig = Figure(figsize=(2.4 * len(columns), 2.4 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i in range(len(rows)):
        image = batch["pixel_values"][i].float()
        image = (image - image.min()) / (image.max() - image.min() + 1e-12)
        shown = [image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy(), masks[i], *(m[i] for m in maps.values())]
        for j, (ax, picture) in enumerate(zip(axes[i], shown)):
            if j == 0:
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            else:
                ax.imshow(np.ma.masked_equal(picture, 255), cmap=colors, vmin=-0.5, vmax=num_labels - 0.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j])
    fig.suptitle("semantic segmentation: dense vs pruned")
    return fig


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["tab20"](np.arange(max(n, 1)) % 20)


def split_accuracy(
    model: nn.Module, dataset: datasets.Dataset | None, processor: Any, max_length: int | None = None, max_examples: int | None = None
) -> float | None:
    """Argmax accuracy on the first `max_examples` rows (all when None) of a labelled in-memory
    split (an embedded default's); None when it has no `label` column, so no page invents one.
    `max_length` None truncates at the tokenizer's own length."""
    if dataset is None or "label" not in dataset.column_names or len(dataset) == 0:
        return None
    task = "image-classification" if check_model(model).is_vision else "text-classification"
    data = in_memory_task_data(task, None, dataset, max_eval_samples=max_examples)
    encoder = Encoder(task, data.columns, processor, max_length)
    values, _, _ = evaluate_model(model, data, encoder, label_encoder(data, model.config), load_metric("accuracy", offline=True))
    return values["accuracy"]


def mean_iou_on(model: nn.Module, dataset: datasets.Dataset, max_examples: int | None = None) -> float:
    """Mean IoU of a segmentation model on an in-memory split with `pixel_values` and `label` maps (an embedded default's)."""
    data = in_memory_task_data("semantic-segmentation", None, dataset, max_eval_samples=max_examples)
    encoder = Encoder(data.task, data.columns, None, None)
    values, _, _ = evaluate_model(model, data, encoder, MaskEncoder(), load_metric("mean_iou", offline=True))
    return values["mean_iou"]


def kept_per_layer(model: nn.Module) -> tuple[list[int], list[int]]:
    adapter = check_model(model)
    layers = adapter.layers_of(model)
    return [adapter.kept_heads(layer, model.config) for layer in layers], [adapter.kept_neurons(layer) for layer in layers]


def measure(
    models: dict[str, nn.Module],
    *,
    name: str,
    data: TaskData,
    encoder: Encoder,
    labels: LabelEncoder | None,
    metric: Metric,
    seq_len: float | None = None,
    image_size: tuple[int, int] | None = None,
    optin: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    runs: int = LATENCY_RUNS,
    known_metrics: dict[str, dict[str, float] | None] | None = None,
) -> Report:
    """Evaluate and time `models` (same base architecture) and gather a `Report`.

    `seq_len` is the length MACs are counted at; None takes the evaluation split's average. An image
    model's are counted (and timed) at `image_size`; None takes the size a pruned model among `models`
    records (its calibration images'), else the config's.
    `known_metrics`: metric values of some models measured before on the same data (a dense
    model compared with one pruned copy after another), not evaluated again. A language model is
    timed in tokens/s instead, forward and generate at batch 1 and 16 (`generation.tokens_per_second`);
    its latency is the forward at batch 16.
    """
    metrics: dict[str, dict[str, float] | None] = dict(known_metrics or {})
    samples, average = 0, None
    language_model = data.task == CAUSAL_LM
    for key, model in models.items():
        if key in metrics:
            continue
        metrics[key] = None
        if data.evaluation is not None and (labels is not None or language_model):
            metrics[key], samples, average = evaluate_model(model, data, encoder, labels, metric)
    reference = next(iter(models.values()))
    adapter = check_model(reference)
    recorded = next((size for size in map(recorded_image_size, models.values()) if size is not None), None)
    image_size = adapter.image_size(reference.config, image_size or recorded)
    seq_len = seq_len or average or adapter.default_seq_len(reference.config, image_size)
    if seq_len is None:
        raise ValueError("The MAC sequence length is unknown: there is no evaluation text to measure it on.")
    batch = TOKEN_BATCHES[-1] if language_model else LATENCY_BATCH
    if language_model:
        speeds = tokens_per_second(models, seq_len, runs=min(runs, 3))  # each run is seconds long on a CPU
        times = {key: [speed.pop(f"forward_batch_{batch}_s")] for key, speed in speeds.items()}
        speeds = {key: {k: v for k, v in speed.items() if not k.endswith("_s")} for key, speed in speeds.items()}
        runs = min(runs, 3)
    else:
        speeds = {key: None for key in models}
        times = time_models(models, synthetic_inputs(reference, batch, seq_len, image_size=image_size), runs=runs)
    stats = {}
    for key, model in models.items():
        latency = median(times[key])
        heads, neurons = kept_per_layer(model)
        stats[key] = ModelStats(
            metrics=metrics[key],
            macs=count_macs(model, seq_len, image_size=image_size),
            parameters=sum(p.numel() for p in model.parameters()),
            latency_s=latency,
            throughput=batch / latency,
            heads_per_layer=heads,
            neurons_per_layer=neurons,
            tokens_per_s=speeds[key],
        )
    return Report(
        model=name,
        task=data.task,
        metric=metric.name,
        metric_source=metric.source,
        main_metric=metric.main,
        seq_len=float(seq_len),
        eval_samples=samples,
        latency={
            "batch_size": batch,
            "tokens": max(1, round(seq_len)),
            "runs": runs,
            "threads": torch.get_num_threads(),
            "device": str(next(reference.parameters()).device),
        },
        stats=stats,
        num_heads=adapter.num_heads(reference.config),
        intermediate_size=adapter.intermediate_size(reference.config),
        unit_names=adapter.unit_names,
        optin=optin,
        timings=timings or {},
        data=data.record,
        image_size=None if image_size is None else list(image_size),
        eval_window=encoder.max_length if language_model else None,
    )
