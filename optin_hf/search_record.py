"""What `importance="auto"` tried and chose (`optin_hf.recipe_search`), as the saved config, the report and the
model card hold it: plain JSON in `OptinConfig.extra["recipe_search"]`. Torch-free, so the card and the report read it
without importing the search (which imports the pruner)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RECORD_KEY = "recipe_search"  # where the record lives in OptinConfig.extra
# How the search may rank its candidates (`RecipeSearch.rank`), each as the record states it ({tolerance}: the record's).
# The label-aware ones need labels on the held-out examples: without them the search ranks by the distance.
RANKS = {
    "screened": "the smallest held-out distance (KL + MD) among the candidates whose task loss on the held-out labels is "
                "within {tolerance} of the lowest",
    "distance": "the smallest held-out distance (KL + MD)",
    "loss": "the smallest task loss on the held-out examples' labels",
}


@dataclass
class Candidate:
    """One recipe tried: its criterion, repair and unit selection, and its pruned model's distance from the dense model
    on the held-out examples (kl: mean KL per example of the task's logits; md: mean squared difference of the
    layers' cosine Grams; distance = kl + md) and its task loss on their labels (`loss`, where they had labels), or why
    it was not measured (`skipped`)."""

    importance: str
    reconstruct: str
    selection: str = "scores"
    kl: float | None = None
    md: float | None = None
    distance: float | None = None
    seconds: float = 0.0
    skipped: str | None = None
    folds: list[float] | None = None  # each fold's distance, where the search measured several (`distance`: their mean)
    loss: float | None = None  # mean task loss on the held-out labels (a classifier's cross-entropy); None without labels
    # each held-out example's task loss, in the order of the folds' held-out examples: what the rank compares in pairs;
    # the search's working data, not part of the saved record (a number per calibration example)
    losses: list[float] | None = field(default=None, repr=False)
    loss_se: float | None = None  # the standard error of its held-out loss minus the lowest's, over their shared examples

    @property
    def label(self) -> str:
        """"optin + weights (refit selection)": the recipe in a few words."""
        return (self.importance + ("" if self.reconstruct == "none" else f" + {self.reconstruct}")
                + (" (refit selection)" if self.selection == "refit" else ""))


@dataclass
class SearchRecord:
    """What `importance="auto"` tried (`candidates`, in order) and chose (`chosen`: an index into them), on how many
    held-out and fit examples (per fold, over `folds` disjoint folds), under which time budget, in how many seconds,
    and on how many examples the kept model was pruned."""

    held_out_examples: int
    fit_examples: int
    max_search_time: float | None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: int | None = None
    seconds: float = 0.0
    folds: int = 1
    kept_examples: int | None = None  # the examples the kept model was pruned on: the fit ones, or all (re-pruned)
    rank: str = "distance"  # what ranked the candidates (a key of RANKS): a record saved before the label-aware ranks has none
    tolerance: float | None = None  # under rank "screened": how far above the lowest held-out loss a candidate stays in
    standard_errors: float | None = None  # under rank "screened": and how many paired standard errors of its difference

    def screen(self) -> str:
        """The screen's width in words: "0.02", "1 standard error", "0.02 + 1 standard error"."""
        parts = [f"{self.tolerance:g}"] if self.tolerance or not self.standard_errors else []
        if self.standard_errors:
            parts.append(f"{self.standard_errors:g} standard error" + ("" if self.standard_errors == 1 else "s"))
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for candidate in values["candidates"]:
            del candidate["losses"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in fields}
        return cls(**{**kept, "candidates": [Candidate(**c) for c in kept.get("candidates", [])]})

    def fold_counts(self) -> str:
        """How many folds each measured candidate was measured on, in words: "optin + weights 4 folds, optin 1"."""
        counts = [(c.label, len(c.folds) if c.folds else 1) for c in self.candidates if c.distance is not None]
        return ", ".join(f"{label} {n}" + (" folds" if i == 0 else "") for i, (label, n) in enumerate(counts))

    def lines(self) -> list[str]:
        """The record for people: what was chosen and by what, then each candidate's held-out distance and task loss
        (where the held-out examples had labels), or why it has none."""
        chosen = self.candidates[self.chosen]
        where = (f"{self.held_out_examples} held-out calibration examples ({self.fit_examples} scored and refit on)" if self.folds == 1
                 else f"up to {self.folds} disjoint folds of {self.held_out_examples} held-out calibration examples each "
                      f"({self.fit_examples} scored and refit on; a later fold only for the candidates still in contention: "
                      f"{self.fold_counts()}), the mean over the folds measured")
        kept = (f"; the kept model pruned with it on all {self.kept_examples} calibration examples"
                if self.kept_examples is not None and self.kept_examples > self.fit_examples else "")
        head = (f"importance='auto' chose {chosen.label} of {len(self.candidates)} candidate recipes: "
                f"{RANKS[self.rank].format(tolerance=self.screen() if self.rank == 'screened' else '')}, on {where}{kept}, "
                f"in {self.seconds:.0f} s")
        rows = [f"  {'*' if i == self.chosen else ' '} {c.label}: "
                + (c.skipped if c.distance is None else f"{c.distance:.5g} (KL {c.kl:.5g}, MD {c.md:.5g}"
                   + (f"; folds {', '.join(f'{d:.5g}' for d in c.folds)}" if c.folds else "") + ")"
                   + (f", held-out loss {c.loss:.5g}" if c.loss is not None else "")
                   + (f" (standard error of its difference from the lowest {c.loss_se:.2g})" if c.loss_se else "")
                   + f", {c.seconds:.1f} s")
                for i, c in enumerate(self.candidates)]
        return [head, *rows]


def search_record(config_dict: dict[str, Any]) -> SearchRecord | None:
    """The record in a config's dict (`OptinConfig.to_dict()`), or None when the recipe was named, not searched."""
    record = (config_dict.get("extra") or {}).get(RECORD_KEY)
    return SearchRecord.from_dict(record) if isinstance(record, dict) else None
