"""Task data for the CLI and recipes: load a dataset, pick its splits and columns, encode rows.

A dataset is a `datasets.save_to_disk` folder, a csv/json/parquet file, or a Hub name. Splits
take datasets' slicing syntax (`train[:80%]`) in all three cases, so one file can give both
the calibration and the evaluation examples without overlap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import datasets
import numpy as np
import torch
from datasets.arrow_reader import ReadInstruction

from ..config import check_field_types
from ..data import TEXT_COLUMNS, collate, encode_texts, text_columns
from .metrics import IGNORE_INDEX
from .names import CAUSAL_LM, IMAGE_TASKS, TASKS
from .windows import evaluation_windows

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGES = ("pixel_values", "image", "img")
MASKS = ("label", "labels", "annotation", "semantic_map", "segmentation", "mask")  # segmentation targets, as datasets name them
SEGMENTATION = "semantic-segmentation"
SHUFFLE_BUFFER = 10_000

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


@dataclass(frozen=True)
class DataSpec:
    """Where a task's data lives and which columns hold what (None: detected from the names).

    `revision` and `data_dir` reach Hub datasets only: a dataset that still ships a loading script
    (which datasets >= 4 no longer runs) loads from its parquet export, `revision:
    refs/convert/parquet` with `data_dir` its configuration. `reduce_labels` (segmentation): True
    when mask id 0 means "unlabelled" and ids 1..K are the model's classes 0..K-1 (ADE20K's
    `scene_parse_150`); None follows the image processor's `do_reduce_labels`. `eval_window`
    (text-generation): the evaluation windows' length in tokens (`tasks.windows`); None: the run's
    max_length. For a language model `max_eval_samples` caps the evaluation windows (spread evenly
    over the split), not its rows.
    """

    path: str
    config: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    calibration_split: str = "train"
    eval_split: str | None = "validation"
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    label_column: str = "label"
    max_eval_samples: int | None = None
    streaming: bool = False
    reduce_labels: bool | None = None
    eval_window: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)  # a recipe's or a report's `streaming: "false"` must not read as True
        if self.text_pair_column and not self.text_column:
            raise ValueError("text_pair_column needs text_column (the first text of each pair).")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"max_eval_samples={self.max_eval_samples} must be a positive integer.")
        if self.eval_window is not None and self.eval_window < 2:
            raise ValueError(f"eval_window={self.eval_window}: a window predicts its tokens from the ones before it, so it needs at least 2.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataSpec":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown dataset keys {unknown}; valid keys are {known}.")
        if "path" not in values:
            raise ValueError("The dataset needs a path: a save_to_disk folder, a csv/json/parquet file or a Hub name.")
        return cls(**values)


def _split_of_saved(saved: datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    """A split (with slicing) of a `load_from_disk` result; a lone Dataset is the split "train"."""
    splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    parts = ReadInstruction.from_spec(split).to_absolute({name: len(ds) for name, ds in splits.items()})
    selected = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts]
    return selected[0] if len(selected) == 1 else datasets.concatenate_datasets(selected)


def load_split(spec: DataSpec, split: str) -> AnyDataset:
    """One split of the dataset `spec` names; local paths win over Hub names."""
    path = Path(spec.path).expanduser()
    if (path.is_dir() or path.is_file()) and (spec.revision or spec.data_dir):
        raise ValueError(f"revision and data_dir apply to Hub datasets, and {spec.path} is a local path: drop them.")
    if path.is_dir():
        if spec.streaming:
            raise ValueError("streaming applies to data files and Hub datasets, not to a save_to_disk folder.")
        return _split_of_saved(datasets.load_from_disk(str(path)), split)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if path.is_file():
        if builder is None:
            raise ValueError(f"{path} is not a data file optin-hf reads: use {sorted(FILE_BUILDERS)} or a save_to_disk folder.")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split=split, streaming=spec.streaming)
        except ValueError as err:  # a data file has one split, "train"
            raise ValueError(f"{err} Slice it into calibration and evaluation: 'train[:80%]' and 'train[80%:]'.") from err
    if builder is not None or spec.path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset {spec.path} does not exist.")
    return datasets.load_dataset(
        spec.path, spec.config, split=split, streaming=spec.streaming, revision=spec.revision, data_dir=spec.data_dir
    )


def column_names(dataset: AnyDataset) -> list[str]:
    # A streamed dataset may not know its features before the first row.
    return list(dataset.column_names or next(iter(dataset)))


@dataclass(frozen=True)
class Columns:
    """inputs: (text,), (text, text_pair) or (image,); label: the target column."""

    inputs: tuple[str, ...]
    label: str


def resolve_columns(
    names: list[str],
    task: str,
    text: str | None = None,
    text_pair: str | None = None,
    image: str | None = None,
    label: str = "label",
) -> Columns:
    """The named columns, checked to exist, or the usual ones detected from `names` (a
    segmentation split without a `label` column: its mask column, e.g. `annotation`)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")
    if task == SEGMENTATION and label not in names:
        label = next((c for c in MASKS if c in names), label)
    named = [c for c in (text, text_pair, image) if c]
    missing = [c for c in named if c not in names]
    if missing:
        raise ValueError(f"Column(s) {missing} not in the dataset; it has {names}.")
    if task in IMAGE_TASKS:
        inputs = (image,) if image else next(((c,) for c in IMAGES if c in names), ())
    elif task == CAUSAL_LM:  # one stream of text: a pair means nothing here
        if text_pair:
            raise ValueError("A language model reads one text column: drop the text pair column.")
        inputs = (text,) if text else next(((c,) for c in TEXT_COLUMNS if c in names), ())
    elif text:
        inputs = (text, text_pair) if text_pair else (text,)
    else:
        inputs = text_columns(names)
    if not inputs:
        kind = "an image column (--image-column)" if task in IMAGE_TASKS else "a text column (--text-column)"
        raise ValueError(f"Cannot tell which column holds the inputs among {names}: name {kind}.")
    return Columns(tuple(inputs), label)


class Encoder:
    """Rows -> model inputs: text through the tokenizer (pairs as pairs), images through the
    image processor, or a ready `pixel_values` column as is.

    `max_length` None truncates at the tokenizer's own `model_max_length`. A language model's text is
    read as token windows of `max_length` tokens instead (`windows`).
    """

    def __init__(self, task: str, columns: Columns, processor: Any, max_length: int | None):
        self.is_image = task in IMAGE_TASKS
        self.columns = columns
        self.processor = processor
        self.max_length = max_length
        self._windows: tuple[Any, int | None, torch.Tensor] | None = None
        if processor is None and columns.inputs[0] != "pixel_values":
            raise ValueError(f"Column {columns.inputs[0]!r} needs a tokenizer or image processor, and the model has none.")

    def windows(self, dataset: AnyDataset, max_windows: int | None) -> torch.Tensor:
        """[windows, max_length]: a language model's evaluation windows of `dataset` (`tasks.windows`),
        tokenized once for every model a report compares."""
        if self._windows is None or self._windows[0] is not dataset or self._windows[1] != max_windows:
            if self.max_length is None:
                raise ValueError("A language model's evaluation needs a window length: give max_length (--max-length).")
            windows = evaluation_windows(dataset, self.columns.inputs[0], self.processor, self.max_length, max_windows)
            self._windows = (dataset, max_windows, windows)
        return self._windows[2]

    def examples(self, rows: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """One unpadded dict of tensors per row."""
        first = self.columns.inputs[0]
        if first == "pixel_values":
            return [{"pixel_values": torch.as_tensor(np.asarray(row[first]), dtype=torch.float32)} for row in rows]
        if self.is_image:
            images = [row[first] if getattr(row[first], "mode", "RGB") == "RGB" else row[first].convert("RGB") for row in rows]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return [{"pixel_values": p} for p in pixels]
        texts = [row[first] for row in rows]
        pairs = [row[self.columns.inputs[1]] for row in rows] if len(self.columns.inputs) == 2 else None
        return encode_texts(self.processor, texts, pairs, self.max_length, name="A text of the dataset")

    def batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A padded batch (attention_mask marks the real tokens)."""
        return collate(self.examples(rows))


class LabelEncoder:
    """Dataset labels -> what the model predicts: class ids in the model's order, or scores.

    When the dataset's class names and the model's `label2id` name the same classes, ids are
    matched by name (a checkpoint may order them differently from the dataset); string labels
    (e.g. from a csv) must be names in `label2id`.
    """

    def __init__(self, feature: Any, config):
        self.num_labels = config.num_labels
        self.regression = config.num_labels == 1
        model_ids = {str(name).lower(): int(i) for name, i in (config.label2id or {}).items()}
        self.by_name = model_ids if not all(n.startswith("label_") for n in model_ids) else {}
        names = list(getattr(feature, "names", None) or [])
        matched = names and all(n.lower() in self.by_name for n in names)
        self.remap = [self.by_name[n.lower()] for n in names] if matched else None

    def __call__(self, values: list[Any]) -> np.ndarray:
        if self.regression:
            return np.asarray(values, dtype=np.float64)
        if values and isinstance(values[0], str):
            unknown = sorted({v for v in values if v.lower() not in self.by_name})
            if unknown:
                raise ValueError(f"Labels {unknown[:5]} are not classes of the model (its label2id: {sorted(self.by_name)}).")
            return np.asarray([self.by_name[v.lower()] for v in values])
        ids = np.asarray(values, dtype=np.int64)
        if (ids < 0).any():
            raise ValueError("The evaluation split has unlabeled examples (label -1, as in GLUE's test splits): use a labeled split.")
        if (ids >= (len(self.remap) if self.remap else self.num_labels)).any():
            raise ValueError(f"Label {int(ids.max())} is out of range for a model with {self.num_labels} labels.")
        return np.asarray(self.remap)[ids] if self.remap else ids


class MaskEncoder:
    """Segmentation targets -> one [H, W] int64 class map per image, at the mask's own size (the
    predictions are resized to it). Reducing labels (ADE20K's 0 = "other") maps 0 to the ignored
    index 255 and every other id one down, as training did. `reduce` None follows the processor's
    `do_reduce_labels`; Mask2Former's ADE20K processor says False (its training read maps reduced
    beforehand), so a dataset of raw ADE20K maps says True itself (`DataSpec.reduce_labels`)."""

    def __init__(self, processor: Any = None, reduce: bool | None = None):
        self.reduce = bool(getattr(processor, "do_reduce_labels", False)) if reduce is None else reduce

    def __call__(self, values: list[Any]) -> list[np.ndarray]:
        masks = []
        for value in values:
            mask = np.asarray(value.convert("L") if hasattr(value, "convert") else value, dtype=np.int64)
            if mask.ndim != 2:
                raise ValueError(f"A segmentation label must be a 2-D class map (an image or [H, W] ids), not shape {mask.shape}.")
            if self.reduce:
                mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
                mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
            masks.append(mask)
        return masks


def calibration_rows(dataset: AnyDataset, num_samples: int, seed: int) -> list[dict[str, Any]]:
    """`num_samples` shuffled rows (seeded): the reference calibrates on one random training batch."""
    if isinstance(dataset, datasets.IterableDataset):
        rows = list(dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER).take(num_samples))
    else:
        rows = list(dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset)))))
    if not rows:
        raise ValueError("The calibration split is empty.")
    return rows


def eval_rows(dataset: AnyDataset, max_samples: int | None) -> Iterator[dict[str, Any]]:
    """The first `max_samples` rows (all when None), in order."""
    if max_samples is None:
        return iter(dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return iter(dataset.take(max_samples))
    return iter(dataset.select(range(min(max_samples, len(dataset)))))


@dataclass
class TaskData:
    """The calibration and evaluation splits of one task, and how to load them again.

    `record` goes into the report, so that `optin evaluate DIR` finds the same data.
    """

    task: str
    calibration: AnyDataset | None
    evaluation: AnyDataset | None
    columns: Columns
    record: dict[str, Any]
    max_eval_samples: int | None = None
    reduce_labels: bool | None = None  # segmentation masks: see MaskEncoder
    eval_window: int | None = None  # a language model's evaluation windows, in tokens: see DataSpec


def label_encoder(data: TaskData, config, processor: Any = None) -> LabelEncoder | MaskEncoder | None:
    """The evaluation split's labels in the order of the model with `config` (class maps for
    segmentation, see `MaskEncoder`); None without a split."""
    if data.evaluation is None or data.task == CAUSAL_LM:  # a text predicts its own next tokens
        return None
    if data.task == SEGMENTATION:
        return MaskEncoder(processor, data.reduce_labels)
    return LabelEncoder((data.evaluation.features or {}).get(data.columns.label), config)


def in_memory_task_data(
    task: str, calibration: AnyDataset | None, evaluation: AnyDataset | None, record: dict[str, Any] | None = None,
    max_eval_samples: int | None = None,
    eval_window: int | None = None,
) -> TaskData:
    """TaskData of splits already loaded (an embedded default, a Space's model), columns detected."""
    names = column_names(calibration if calibration is not None else evaluation)
    return TaskData(task, calibration, evaluation, resolve_columns(names, task), record or {}, max_eval_samples,
                    eval_window=eval_window)


def load_task_data(spec: DataSpec, task: str, calibration: bool = True) -> TaskData:
    """Load the splits `spec` names (the calibration split only when `calibration`)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")
    if not calibration and spec.eval_split is None:
        raise ValueError("Nothing to evaluate: give an evaluation split.")
    calib = load_split(spec, spec.calibration_split) if calibration else None
    evaluation = load_split(spec, spec.eval_split) if spec.eval_split else None
    names = column_names(calib if calib is not None else evaluation)
    columns = resolve_columns(names, task, spec.text_column, spec.text_pair_column, spec.image_column, spec.label_column)
    if evaluation is not None and task != CAUSAL_LM and columns.label not in column_names(evaluation):  # a detected mask column counts
        raise ValueError(f"The evaluation split has no label column {columns.label!r}; name it with --label-column.")
    return TaskData(task, calib, evaluation, columns, {"dataset": spec.to_dict()}, spec.max_eval_samples, spec.reduce_labels,
                    spec.eval_window)
