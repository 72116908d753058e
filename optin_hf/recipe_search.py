"""`importance="auto"`: the pruner tries candidate recipes and keeps the one whose pruned model stays closest
to the dense model on calibration examples it held out.

No single recipe wins everywhere once the refit repairs the slim model (issue 25: magnitude + refit beats
OPTIN + refit on a ViT at 0.5 of the MACs, Fisher without refit beats both on a text classifier at 0.8), and a
user cannot know which one fits their model. So the search holds out a seeded share of the calibration
examples (the data passed to the pruner, never a test split), scores each criterion once on the rest, prunes a
copy of the dense model with each criterion x repair (the family's refit, with the units chosen by the scores or by
the refit's own error, `selection`; and none), and measures how far each copy's outputs are from the
dense model's on the held-out examples: the KL of the task's logits plus OPTIN's manifold distance (MD) of every
layer's features. Neither needs a label. With `folds` the examples are split several times (disjoint held-out
shares) and the mean distance ranks the candidates; with `reprune` the chosen recipe then prunes the model on every
calibration example, as naming it would. The closest candidate's recipe is kept, the model pruned with it, and
what was tried is recorded in the config (`extra["recipe_search"]`), and so in `optin_config.json`, the report
and the model card.

This module holds the search's parts: its settings, the candidates, the held-out split and the distance. The
pruner runs the candidates (`optin_hf.pruner.prune_by_search`), since each is a pruning run: so control only
flows down, from the pruner into this module, never back up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import ArchAdapter
from .capture import md_token_rows, scoring_forward, select_rows
from .config import OptinConfig
from .criteria import CRITERIA
from .data import image_size_of, prepare_calibration
from .hooks import record_features
from .losses import bounded, kl_loss, md_loss
from .search_record import Candidate

SEARCHED_CRITERIA = ("optin", "magnitude", "fisher")  # in the order tried: the first is the one a budget of 0 keeps
MIN_HELD_OUT = 4  # fewer held-out examples than this would rank candidates by noise


@dataclass
class RecipeSearch:
    """The settings of `importance="auto"` (its `OptinConfig.importance_options`).

    held_out: the share of the calibration examples kept apart to measure the candidates on (at least
    MIN_HELD_OUT of them); the others are scored and refit on. max_search_time (seconds): no candidate is
    started once this much time has passed since the search began (the first always runs, so 0 keeps
    OPTIN with the family's repair, validated); None tries every candidate. refit_selection: also try each criterion
    with the refit choosing the units (`selection="refit"`): its greedy choice costs minutes per layer on a CPU where
    the FFN is wide (MiniLM's 1,536 neurons), so it is asked for, not tried by default. folds: how many disjoint
    held-out shares each candidate is measured on (fold k holds out the k-th share of one seeded permutation; the mean
    distance ranks the candidates): one share of 64 examples ranks near-equal candidates by noise, and each fold
    re-scores and re-prunes, so k folds cost about k searches; on the text defaults' development splits a second
    fold changed no choice, so one is the default. reprune: prune the kept model with the chosen recipe on every
    calibration example (those held out too), as naming that recipe would, rather than keep the copy pruned on the
    first fold's fit examples: one more scoring and prune, the refit sees a third more examples, and the kept model is
    exactly what naming the chosen recipe gives. Off by default: on the text defaults' development splits the chosen
    model's accuracy moved by -0.5 to +0.6 points against the fold's copy (six budgets, mean +0.04): no gain for its cost.
    """

    held_out: float = 0.25
    max_search_time: float | None = None
    refit_selection: bool = False
    folds: int = 1
    reprune: bool = False
    # One of the candidates (Fisher) reads labels where the data has them: the CLI then passes them.
    needs_labels = True

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"importance_options held_out={self.held_out}: the share of calibration examples held out must be in (0, 1).")
        if self.max_search_time is not None and self.max_search_time < 0:
            raise ValueError(f"importance_options max_search_time={self.max_search_time}: give seconds >= 0, or None for no limit.")
        if self.folds < 1 or self.folds * self.held_out > 1.0 + 1e-9:
            raise ValueError(f"importance_options folds={self.folds}: give 1 to {int(1 / self.held_out + 1e-9)} folds "
                             f"(disjoint held-out shares of {self.held_out:g} of the calibration examples).")

    @classmethod
    def from_config(cls, config: OptinConfig) -> "RecipeSearch":
        return cls(**config.importance_options)


@dataclass
class HeldOut:
    """The dense model's outputs on the held-out batches, what each candidate is compared with: the KL's
    outputs per batch, the MD token rows per batch and each layer's [K, K] cosine Gram and token count."""

    batches: list[dict[str, torch.Tensor]]
    rows: list[torch.Tensor]
    tokens: int | None
    outputs: list
    grams: list[torch.Tensor]
    layer_tokens: list[int]

    @property
    def examples(self) -> int:
        return sum(len(next(iter(batch.values()))) for batch in self.batches)


@torch.no_grad()
def _run(model: nn.Module, adapter: ArchAdapter, batches, rows, tokens) -> tuple[list, list[torch.Tensor], list[int]]:
    """(outputs the KL compares, each layer's normalised MD rows, each layer's tokens per example) of `model`."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in adapter.layers_of(model)]
    layer_tokens = [0] * len(per_layer)
    outputs = []
    with record_features(model, adapter) as features:
        for batch, batch_rows in zip(batches, rows):
            outputs.append(adapter.kl_outputs(scoring_forward(model, batch), batch))
            for z, feature in enumerate(features):
                per_layer[z].append(select_rows(feature, batch_rows.to(device), tokens))
                layer_tokens[z] = feature.shape[1]
    return outputs, [torch.cat(parts) for parts in per_layer], layer_tokens


def held_out_run(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config: OptinConfig) -> HeldOut:
    """The dense `model` on the held-out `batches`, as OPTIN's scoring captures it (`capture.capture_dense`)."""
    tokens = adapter.default_seq_len(model.config, image_size_of(batches))
    rows = md_token_rows(batches, config.md_tokens, config.seed, tokens)
    outputs, features, layer_tokens = _run(model, adapter, batches, rows, tokens)
    return HeldOut(batches, rows, tokens, [bounded(o) for o in outputs], [f @ f.T for f in features], layer_tokens)


def distance(pruned: nn.Module, adapter: ArchAdapter, dense: HeldOut) -> tuple[float, float]:
    """(kl, md) of the `pruned` model from the dense one on the held-out examples: the mean over examples of
    KL(dense || pruned) of the task's logits (0 for a bare encoder), and the mean over layers of the mean
    squared difference of the cosine Grams of their MD token rows. A layer whose tokens the pruned model
    dropped (vision token mode) has other rows: it is compared by the KL alone."""
    outputs, features, layer_tokens = _run(pruned, adapter, dense.batches, dense.rows, dense.tokens)
    kl = float(kl_loss(dense.outputs, outputs, 1.0)) / dense.examples
    same = [z for z, n in enumerate(layer_tokens) if n == dense.layer_tokens[z]]
    md = sum(float(md_loss(dense.grams[z], features[z])) / dense.grams[z].numel() for z in same) / max(len(same), 1)
    return kl, md


def calibration_examples(model: nn.Module, data: Any, tokenizer, config: OptinConfig, held_out: float, wanted: int) -> list[dict[str, torch.Tensor]]:
    """The first examples of `data` (enough that `wanted` remain to fit on once a `held_out` share is set apart, where
    there are), each a one-example batch with its label where it has one."""
    if data is None:
        raise ValueError("importance='auto' measures its candidates on held-out calibration examples: pass data.")
    read = math.ceil(wanted / (1.0 - held_out))
    return prepare_calibration(data, tokenizer, num_samples=read, batch_size=1, max_length=config.max_length,
                               labels=True, config=model.config)


def split_examples(
    examples: list[dict[str, torch.Tensor]], config: OptinConfig, held_out: float, fold: int = 0
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(fit, held): `examples` split at random (seeded by `config.seed`): a `held_out` share (at least MIN_HELD_OUT)
    is held out, the others keep their order for scoring and the refit. Fold k holds out the k-th such share of one
    seeded permutation, so the folds of one seed are disjoint (fold 0: the first share)."""
    count = max(MIN_HELD_OUT, round(held_out * len(examples)))
    if len(examples) <= count:
        raise ValueError(
            f"importance='auto' holds out {count} calibration examples to measure its candidates on and needs at least one "
            f"more to score with; {len(examples)} were given: pass at least {count + 1}, or name a criterion "
            "(importance='optin')."
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    start = min(fold * count, len(examples) - count)  # a last fold that would run past the end takes the last share
    held = set(order[start:start + count])
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


def candidates(config: OptinConfig, adapter: ArchAdapter, asked_repair: str, refit_selection: bool = False) -> list[Candidate]:
    """The recipes to try, in order: each criterion (those that score tokens, in token mode) with the family's repair,
    then, with `refit_selection`, with the refit choosing the units (`selection="refit"`, where the repair is a refit
    and the selection was not named), then without a repair (unless the config's selection or allocation is the
    refit's, which needs one); with a named repair, only it. The first is the recipe a budget of 0 keeps."""
    criteria = [name for name in SEARCHED_CRITERIA if not config.prune_tokens or getattr(CRITERIA[name], "scores_tokens", False)]
    repair = adapter.capabilities.auto_repair(refit=config.prune_steps > 1) if asked_repair == "auto" else asked_repair
    searched = refit_selection and repair in ("weights", "scales") and config.selection == "scores"
    selections = ["scores", "refit"] if searched else [config.selection]
    recipes = [(repair, selection) for selection in selections]
    if asked_repair == "auto" and repair != "none" and config.selection == "scores" and config.allocation == "scores":
        recipes.append(("none", "scores"))  # a unit choice or per-layer counts by the refit need one: no bare candidate
    return [Candidate(name, mode, selection) for mode, selection in recipes for name in criteria]


def search_base(config: OptinConfig) -> OptinConfig:
    """The config each candidate varies: `config` with a named criterion in place of "auto"."""
    return dataclasses.replace(config, importance="optin", importance_options={})
