"""Digit scenes: 2 to 4 real scikit-learn digits placed at random on a 64x64 canvas, each pixel
labelled with its digit's class (1-10 for the digits 0-9) or background (0).

The digits are split before any scene is made, so the test scenes hold only digits that no
training (or calibration) scene uses: the model is judged on handwriting it never saw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

from .splits import SplitSpec, Splits

CANVAS = 64
SCALE = 2  # an 8x8 digit is drawn 16x16
INK = 0.25  # a digit pixel at least this bright (of 1) is labelled with the digit, darker ones are background
LABEL_NAMES = ["background"] + [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitScenes:
    """The scikit-learn digits (pixels scaled to [0, 1]) scenes are made of; `scenes` per split."""

    images: np.ndarray  # [N, 8, 8] float32
    digits: np.ndarray  # [N] 0-9
    scenes: dict[str, int]
    label_names: tuple[str, ...] = tuple(LABEL_NAMES)
    duplicates_removed: int = 0
    conflicts_removed: int = 0

    @property
    def raw_size(self) -> int:
        return len(self.images)

    def pools(self, spec: SplitSpec) -> dict[str, list[int]]:
        """Disjoint digits per split: `spec.test_size` and `spec.calibration_size` drawn (seeded)
        for the test and calibration scenes, the rest for training."""
        order = list(range(len(self.images)))
        random.Random(spec.seed).shuffle(order)
        cut = spec.test_size + spec.calibration_size
        return {"test": order[: spec.test_size], "calibration": order[spec.test_size : cut], "train": order[cut:]}

    def splits(self, spec: SplitSpec) -> Splits:
        """Test, calibration and train scenes, each made of its own pool of digits (`pools`)."""
        return Splits(**{
            part: scene_dataset(self.images, self.digits, pool, self.scenes[part], seed=spec.seed * 100 + i)
            for i, (part, pool) in enumerate(self.pools(spec).items())
        })


def read_digit_scenes(train: int = 2000, calibration: int = 128, test: int = 300) -> DigitScenes:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    # One copy of each distinct digit image, so no test digit reappears among the training ones.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return DigitScenes(images[keep], digits.target[keep].astype(np.int64), {"train": train, "calibration": calibration, "test": test},
                       duplicates_removed=len(images) - len(keep))


def free_box(rng: np.random.Generator, taken: np.ndarray, side: int) -> tuple[slice, slice] | None:
    """A `side` x `side` place on the canvas that overlaps nothing `taken`, drawn at random; None after 50 tries (a
    free place is almost always found in a few)."""
    for _ in range(50):
        top, left = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
        box = (slice(top, top + side), slice(left, left + side))
        if not taken[box].any():
            return box
    return None


def make_scene(rng: np.random.Generator, images: np.ndarray, digits: np.ndarray, pool: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One scene: ([CANVAS, CANVAS] image in [0, 1], [CANVAS, CANVAS] int64 labels, the indices of
    the digits drawn) with 2 to 4 digits of `pool` (indices into `images`), placed where they do not overlap."""
    side = 8 * SCALE
    image = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    label = np.zeros((CANVAS, CANVAS), dtype=np.int64)
    taken = np.zeros((CANVAS, CANVAS), dtype=bool)
    drawn = []
    for index in rng.choice(pool, size=int(rng.integers(2, 5)), replace=False):
        box = free_box(rng, taken, side)
        if box is None:
            continue
        digit = np.kron(images[index], np.ones((SCALE, SCALE), dtype=np.float32))
        image[box] = digit
        label[box] = np.where(digit >= INK, digits[index] + 1, 0)
        taken[box] = True
        drawn.append(int(index))
    return image, label, drawn


def scene_dataset(images: np.ndarray, digits: np.ndarray, pool: list[int], count: int, seed: int) -> Dataset:
    """`count` scenes of the digits `pool` as a Dataset: `pixel_values` [1, CANVAS, CANVAS], `label`
    [CANVAS, CANVAS], and `digit_ids`, which digits (indices into `images`) each scene shows."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, images, digits, pool) for _ in range(count)]
    features = Features({"pixel_values": Array3D((1, CANVAS, CANVAS), "float32"), "label": Array2D((CANVAS, CANVAS), "int64"),
                         "digit_ids": Sequence(Value("int64"))})
    columns = {"pixel_values": [s[0][None] for s in scenes], "label": [s[1] for s in scenes], "digit_ids": [s[2] for s in scenes]}
    return Dataset.from_dict(columns, features=features)
