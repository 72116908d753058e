"""Deterministic, leak-free train / calibration / test splits of a :class:`Corpus`.

`Corpus` is defined here, with what splits it, rather than beside its readers: the readers'
registry (`corpora.CORPORA`) names the digit scenes, whose splits are made with this module.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features, Value


@dataclass(frozen=True)
class Corpus:
    """Deduplicated examples; ``keys`` identify an example so splits can be checked for leakage."""

    column: str
    inputs: list[Any]
    labels: list[int]
    keys: list[str]
    label_names: list[str]
    raw_size: int
    duplicates_removed: int
    conflicts_removed: int

    def __len__(self) -> int:
        return len(self.inputs)

    def to_dataset(self, indices: Sequence[int]) -> Dataset:
        """Build a ``datasets.Dataset`` for ``indices`` with typed features (ClassLabel carries the names)."""
        column_feature = Value("string") if self.column == "text" else Array3D(tuple(np.shape(self.inputs[0])), "float32")
        features = Features({self.column: column_feature, "label": ClassLabel(names=self.label_names)})
        return Dataset.from_dict(
            {self.column: [self.inputs[i] for i in indices], "label": [self.labels[i] for i in indices]},
            features=features,
        )


@dataclass(frozen=True)
class SplitSpec:
    """Split sizes; ``train_size`` caps training so CPU fine-tuning stays within minutes (None: all the rest)."""

    test_size: int
    calibration_size: int = 256
    train_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Splits:
    train: Dataset
    calibration: Dataset
    test: Dataset


def split_indices(corpus: Corpus, spec: SplitSpec) -> dict[str, list[int]]:
    """Shuffle the key-sorted corpus with a fixed seed, then cut test, calibration and train in that order.

    Calibration and train are disjoint too, so calibration data is never seen in training either.
    """
    order = list(range(len(corpus)))
    random.Random(spec.seed).shuffle(order)
    head = spec.test_size + spec.calibration_size
    rest = order[head:]
    if spec.train_size is not None and len(rest) < spec.train_size:
        raise ValueError(f"corpus of {len(corpus)} is too small for {spec}")
    parts = {
        "test": order[: spec.test_size],
        "calibration": order[spec.test_size : head],
        "train": rest if spec.train_size is None else rest[: spec.train_size],
    }
    assert_disjoint(corpus, parts)
    return parts


def assert_disjoint(corpus: Corpus, parts: dict[str, list[int]]) -> None:
    """Fail loudly if any example key is shared between splits (the test set must stay unseen)."""
    names = list(parts)
    keys = {name: {corpus.keys[i] for i in parts[name]} for name in names}
    for a in names:
        for b in names[names.index(a) + 1 :]:
            shared = keys[a] & keys[b]
            if shared:
                raise AssertionError(f"{len(shared)} examples shared between {a} and {b}")


def make_splits(corpus: Corpus, spec: SplitSpec) -> Splits:
    """Datasets for each split; cheap enough to recompute on every load. A corpus that composes
    its examples from parts (digit scenes) splits the parts itself."""
    if hasattr(corpus, "splits"):
        return corpus.splits(spec)
    parts = split_indices(corpus, spec)
    return Splits(**{name: corpus.to_dataset(indices) for name, indices in parts.items()})
