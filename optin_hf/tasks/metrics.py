"""Task metrics: `evaluate`'s modules when they load, the same formulas locally when they don't.

`evaluate.load` fetches its metric scripts from the Hub (or its cache), so offline it fails
for every metric. The local formulas give the same keys and values as `evaluate`'s
`accuracy`, `glue` and `mean_iou` modules; `Metric.source` says which one computed a report's numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
# Their F1 is the binary F1 of class 1, as GLUE scores MRPC and QQP: with more classes it counts the
# others as one negative class and reports a number that means nothing (0.5 on a 3-class model).
BINARY_METRICS = ("glue/mrpc", "glue/qqp")
DEFAULT_METRIC = "accuracy"
SEGMENTATION_METRIC = "mean_iou"
PERPLEXITY = "perplexity"  # a causal language model's, and only its (lower is better)
IGNORE_INDEX = 255  # pixels labelled so count for no class (transformers' semantic_loss_ignore_index)


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float((predictions == references).mean())


def f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    tp = float(((predictions == 1) & (references == 1)).sum())
    wrong = float((predictions != references).sum())
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    labels = np.union1d(predictions, references)
    confusion = (references[:, None] == labels)[:, :, None] & (predictions[:, None] == labels)[:, None, :]
    c = confusion.sum(0).astype(np.float64)  # [true, predicted]
    t, p, n, correct = c.sum(1), c.sum(0), c.sum(), np.trace(c)
    denominator = np.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    return float((correct * n - (t * p).sum()) / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.corrcoef(predictions.astype(np.float64), references.astype(np.float64))[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (as scipy's rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def spearmanr(predictions: np.ndarray, references: np.ndarray) -> float:
    return pearson(_average_ranks(predictions), _average_ranks(references))


def _num_labels(predictions, references, ignore_index: int = IGNORE_INDEX) -> int:
    """One more than the largest class id in the maps (`mean_iou`'s default)."""
    seen = [int(a.max()) for p, r in zip(predictions, references) for a in (p, r[r != ignore_index]) if a.size]
    return max(seen, default=0) + 1


def mean_iou(predictions, references, num_labels: int | None = None, ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """`evaluate`'s mean_iou: per class, intersection and union areas summed over all images
    (pixels labelled `ignore_index` left out); IoU = intersection / union, accuracy = intersection
    / label area, each averaged over the classes whose denominator is not 0.

    predictions, references: [H, W] class-id maps, one per image (sizes may differ between images).
    `num_labels` None: one more than the largest id seen; a class absent from both predictions and
    labels has no union and takes no part in the means, so this gives evaluate's values.
    """
    pairs = [(np.asarray(p).reshape(-1), np.asarray(r).reshape(-1)) for p, r in zip(predictions, references)]
    if num_labels is None:
        num_labels = _num_labels([p for p, _ in pairs], [r for _, r in pairs], ignore_index)
    intersect, area_pred, area_label = (np.zeros(num_labels, dtype=np.float64) for _ in range(3))
    for pred, label in pairs:
        valid = label != ignore_index
        pred, label = pred[valid], label[valid]
        intersect += np.bincount(pred[pred == label], minlength=num_labels)[:num_labels]
        area_pred += np.bincount(pred[pred < num_labels], minlength=num_labels)[:num_labels]
        area_label += np.bincount(label, minlength=num_labels)[:num_labels]
    union = area_pred + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, class_accuracy = intersect / union, intersect / area_label
    return {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "mean_accuracy": float(np.nanmean(class_accuracy)) if np.isfinite(class_accuracy).any() else 0.0,
        "overall_accuracy": float(intersect.sum() / area_label.sum()) if area_label.sum() else 0.0,
    }


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """exp of the mean negative log-likelihood per predicted token, from summed NLLs (nats) and the
    tokens they predict (one entry per chunk of text: the chunks' totals are added first)."""
    mean = float(np.sum(nll, dtype=np.float64) / np.sum(tokens))
    return {"perplexity": math.exp(mean), "nll_per_token": mean}


def _local_formulas(name: str) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    task = name.partition("/")[2]
    if task == "cola":
        return {"matthews_correlation": matthews_correlation}
    if task == "stsb":
        return {"pearson": pearson, "spearmanr": spearmanr}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": f1}
    return {"accuracy": accuracy}


@dataclass
class Metric:
    """A named metric: `compute(predictions, references)` -> {key: value in [0, 1] or [-1, 1]}
    (perplexity: `compute(summed NLLs, predicted tokens)` -> {perplexity >= 1, nll_per_token}).

    `main` is the key a report plots (Spearman for STS-B, Matthews for CoLA, mean IoU, perplexity,
    else accuracy); `regression` says the predictions are scores, not class ids; `per_pixel` that they
    are one class map per image (a list of [H, W] arrays), not one value per example; `binary` that
    it needs a model with two classes.
    """

    name: str
    source: str
    main: str
    regression: bool
    _compute: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    per_pixel: bool = False

    @property
    def lower_is_better(self) -> bool:
        """Whether a smaller value is the better model (perplexity), so a report shows its rise."""
        return self.name == PERPLEXITY

    @property
    def binary(self) -> bool:
        """Whether its values hold only for a model with two classes (see BINARY_METRICS)."""
        return self.name in BINARY_METRICS

    def compute(self, predictions, references) -> dict[str, float]:
        if self.per_pixel:
            values = self._compute([np.asarray(p) for p in predictions], [np.asarray(r) for r in references])
        else:
            values = self._compute(np.asarray(predictions), np.asarray(references))
        return {key: float(value) for key, value in values.items()}


def metric_names() -> list[str]:
    return ["accuracy", SEGMENTATION_METRIC, PERPLEXITY] + [f"glue/{task}" for task in GLUE_TASKS]


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES)


def load_metric(name: str, offline: bool | None = None) -> Metric:
    """The metric `name` ("accuracy", "mean_iou" or "glue/<task>"), from `evaluate` if it loads, else local.

    `offline`: True takes the local formulas without asking the Hub (a page that must answer
    fast); None follows HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE.
    """
    if name not in metric_names():
        raise ValueError(f"Unknown metric {name!r}; choose one of {metric_names()}.")
    if name == PERPLEXITY:  # evaluate's perplexity module loads a model of its own by name: not this one
        return Metric(name, "optin_hf.tasks.metrics, local", "perplexity", False, perplexity)
    formulas = _local_formulas(name)
    main = {"glue/cola": "matthews_correlation", "glue/stsb": "spearmanr", SEGMENTATION_METRIC: "mean_iou"}.get(name, "accuracy")
    per_pixel = name == SEGMENTATION_METRIC
    regression = name == "glue/stsb"
    path, _, config = name.partition("/")
    reason = "offline mode"
    if not (_offline() if offline is None else offline):
        try:
            import evaluate

            module = evaluate.load(path, config or None)
            if per_pixel:  # evaluate's mean_iou also returns per-class arrays: keep its scalars
                hub_compute = lambda p, r: {  # noqa: E731
                    k: v for k, v in module.compute(predictions=p, references=r, num_labels=_num_labels(p, r),
                                                    ignore_index=IGNORE_INDEX).items() if np.ndim(v) == 0}
            else:
                hub_compute = lambda p, r: module.compute(predictions=p, references=r)  # noqa: E731
            return Metric(name, f"evaluate ({name})", main, regression, hub_compute, per_pixel)
        except Exception as err:  # evaluate raises many kinds when it cannot fetch its script
            reason = f"evaluate.load failed: {type(err).__name__}"

    def local(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        if per_pixel:
            return mean_iou(predictions, references)
        return {key: formula(predictions, references) for key, formula in formulas.items()}

    return Metric(name, f"optin_hf.tasks.metrics, local ({reason})", main, regression, local, per_pixel)

