"""Task metrics: `evaluate`'s modules when they load, the same formulas locally when they don't.

`evaluate.load` fetches its metric scripts from the Hub (or its cache), so offline it fails
for every metric. The local formulas give the same keys and values as `evaluate`'s
`accuracy` and `glue` modules; `Metric.source` says which one computed a report's numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
DEFAULT_METRIC = "accuracy"


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
    """A named metric: `compute(predictions, references)` -> {key: value in [0, 1] or [-1, 1]}.

    `main` is the key a report plots (Spearman for STS-B, Matthews for CoLA, else accuracy);
    `regression` says the predictions are scores, not class ids.
    """

    name: str
    source: str
    main: str
    regression: bool
    _compute: Callable[[np.ndarray, np.ndarray], dict[str, float]]

    def compute(self, predictions, references) -> dict[str, float]:
        values = self._compute(np.asarray(predictions), np.asarray(references))
        return {key: float(value) for key, value in values.items()}


def metric_names() -> list[str]:
    return ["accuracy"] + [f"glue/{task}" for task in GLUE_TASKS]


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES)


def load_metric(name: str, offline: bool | None = None) -> Metric:
    """The metric `name` ("accuracy" or "glue/<task>"), from `evaluate` if it loads, else local.

    `offline`: True takes the local formulas without asking the Hub (a page that must answer
    fast); None follows HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE.
    """
    if name not in metric_names():
        raise ValueError(f"Unknown metric {name!r}; choose one of {metric_names()}.")
    formulas = _local_formulas(name)
    main = {"glue/cola": "matthews_correlation", "glue/stsb": "spearmanr"}.get(name, "accuracy")
    regression = name == "glue/stsb"
    path, _, config = name.partition("/")
    reason = "offline mode"
    if not (_offline() if offline is None else offline):
        try:
            import evaluate

            module = evaluate.load(path, config or None)
            hub_compute = lambda p, r: module.compute(predictions=p, references=r)  # noqa: E731
            return Metric(name, f"evaluate ({name})", main, regression, hub_compute)
        except Exception as err:  # evaluate raises many kinds when it cannot fetch its script
            reason = f"evaluate.load failed: {type(err).__name__}"

    def local(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {key: formula(predictions, references) for key, formula in formulas.items()}

    return Metric(name, f"optin_hf.tasks.metrics, local ({reason})", main, regression, local)
