"""``load_default``: a ready model plus its calibration and held-out test data, trained once and cached."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ...checkpoint import atomic_directory
from ..names import CAUSAL_LM, TEXT_TASKS, model_class
from ..report import mean_iou_on, split_accuracy
from .cache import cache_key, cache_root, package_versions
from .corpora import CORPORA, Corpus
from .registry import RECIPES, Recipe
from .splits import Splits, make_splits
from .train import TRAINERS

SUMMARY_FILE = "training_summary.json"


@dataclass
class DefaultTask:
    """A model ready for pruning, with the data to calibrate it on and the held-out data to judge it by
    (a language model's: `eval_window`-token windows, at most `max_eval_samples` of them; `tasks.windows`)."""

    name: str
    task: str
    model: PreTrainedModel
    processor: PreTrainedTokenizerBase | None
    calibration: Dataset
    test: Dataset
    label_names: list[str]
    model_dir: Path
    eval_window: int | None = None
    max_eval_samples: int | None = None


def load_default(name: str, cache_dir: str | os.PathLike | None = None) -> DefaultTask:
    """Load a named default, training it first if no cached copy matches its recipe and package versions."""
    if name not in RECIPES:
        raise KeyError(f"unknown default {name!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[name]
    corpus = CORPORA[recipe.corpus](**recipe.corpus_options)
    splits = make_splits(corpus, recipe.split)
    versions = package_versions(recipe.packages)
    model_dir = cache_root(cache_dir) / f"{name}-{cache_key(recipe, versions)}"
    if not model_dir.is_dir():
        with atomic_directory(model_dir) as tmp:
            _build(name, recipe, corpus, splits, versions, tmp)
    model = model_class(recipe.task).from_pretrained(model_dir).eval()
    processor = AutoTokenizer.from_pretrained(model_dir) if recipe.task in TEXT_TASKS else None
    return DefaultTask(
        name=name,
        task=recipe.task,
        model=model,
        processor=processor,
        calibration=splits.calibration,
        test=splits.test,
        label_names=list(corpus.label_names),
        model_dir=model_dir,
        eval_window=recipe.evaluation.get("window"),
        max_eval_samples=recipe.evaluation.get("max_windows"),
    )


def _build(
    name: str, recipe: Recipe, corpus: Corpus, splits: Splits, versions: dict[str, str], out: Path
) -> None:
    """Train, measure test accuracy, and save model, processor and a model card into ``out``. A pretrained
    language model is only loaded (its perplexity is measured by the pruning report, on its `evaluation` windows)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    model, processor = TRAINERS[type(recipe.hparams)](recipe.hparams, splits.train, corpus.label_names)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    summary = {
        "name": name,
        "description": recipe.description,
        **_test_metric(recipe, model, splits, processor),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "split_sizes": {part: len(getattr(splits, part)) for part in ("train", "calibration", "test")},
        "corpus": {
            "raw_examples": corpus.raw_size,
            "duplicates_removed": corpus.duplicates_removed,
            "conflicting_labels_removed": corpus.conflicts_removed,
        },
        "recipe": asdict(recipe),
        "versions": versions,
    }
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    (out / "README.md").write_text(_model_card(summary))


def _test_metric(recipe: Recipe, model: PreTrainedModel, splits: Splits, processor) -> dict[str, float]:
    if recipe.task == CAUSAL_LM:
        return {}
    if recipe.task == "semantic-segmentation":
        return {"test_mean_iou": round(mean_iou_on(model, splits.test), 4)}
    return {"test_accuracy": round(split_accuracy(model, splits.test, processor), 4)}


def _model_card(summary: dict) -> str:
    held_out = ", ".join(f"held-out {k.removeprefix('test_').replace('_', ' ')} {v}" for k, v in summary.items() if k.startswith("test_"))
    return (
        f"# optin-hf default: {summary['name']}\n\n"
        f"{summary['description']}\n\n"
        f"{'Loaded' if summary['recipe']['task'] == CAUSAL_LM else 'Trained locally'} by `optin_hf.tasks.defaults` in "
        f"{summary['train_seconds']} s ({summary['train_cpu_seconds']} CPU s)"
        + (f"; {held_out}" if held_out else "")
        + ".\n\n"
        f"```json\n{json.dumps(summary, indent=2, default=str)}\n```\n"
    )
