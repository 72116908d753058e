"""`importance="auto"`: the pruner tries candidate recipes and keeps the one whose pruned model stays closest
to the dense model on calibration examples it held out.

No single recipe wins everywhere once the refit repairs the slim model (issue 25: magnitude + refit beats
OPTIN + refit on a ViT at 0.5 of the MACs, Fisher without refit beats both on a text classifier at 0.8), and a
user cannot know which one fits their model. So the search holds out a seeded share of the calibration
examples (the data passed to the pruner, never a test split), scores each criterion once on the rest, prunes a
copy of the dense model with each criterion x repair (the one naming that criterion resolves, `candidates`: the
family's refit, or on a ResNet the BatchNorm repair where the residual widths stay, with the units chosen by the scores
or by the refit's own error, `selection`; and none), and measures how far each copy's outputs are from the
dense model's on the held-out examples: the KL of the task's logits plus OPTIN's manifold distance (MD) of every
layer's features. Neither needs a label; where the held-out examples have labels (the CLI passes them), each
copy's task loss on them is measured too, and the closest of the candidates within a tolerance of the lowest loss
is kept (`rank`; the tolerance may add standard errors of the paired per-example loss differences). With `folds`
the examples are split several times (disjoint held-out shares), a later fold measuring only the candidates still in
contention, and the means over the folds rank them; with `reprune` the chosen recipe then prunes the model on every
calibration example, as naming it would. The best-ranked candidate's recipe is kept, the model pruned with it, and
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
from .auto_settings import resolve_defaults
from .capture import md_token_rows, scoring_forward, select_rows
from .config import OptinConfig
from .criteria import CRITERIA
from .data import image_size_of, prepare_calibration
from .hooks import record_features
from .importance.fisher import example_losses
from .losses import bounded, kl_loss, md_loss
from .search_record import RANKS, Candidate

SEARCHED_CRITERIA = ("optin", "magnitude", "fisher")  # in the order tried: the first is the one a budget of 0 keeps
MIN_HELD_OUT = 4  # fewer held-out examples than this would rank candidates by noise
# A later fold measures only the candidates whose held-out loss is within this many paired standard errors (or the
# rank's own screen, if wider) of the lowest: one further behind is not expected to catch up on 64 more examples.
CONTENTION = 2.0


@dataclass
class RecipeSearch:
    """The settings of `importance="auto"` (its `OptinConfig.importance_options`).

    held_out: the share of the calibration examples kept apart to measure the candidates on (at least
    MIN_HELD_OUT of them); the others are scored and refit on. max_search_time (seconds): no candidate is
    started once this much time has passed since the search began (the first always runs, so 0 keeps
    OPTIN with its repair, validated); None tries every candidate. refit_selection: also try each criterion
    with the refit choosing the units (`selection="refit"`, a few seconds more per candidate on MiniLM). Asked for, not
    tried by default: each criterion's refit-selected copy kept more development examples on the text defaults, but
    among them the search kept a worse copy at two of 13 budgets (a low loss on the held-out examples that did not
    carry over; benchmarks/RESULTS.md, s45). folds: the most
    disjoint held-out shares a candidate is measured on (fold k holds out the k-th share of one seeded permutation; each
    fold re-scores and re-prunes, so a fold costs about one search of the candidates it measures). Every candidate is
    measured on the first; a later fold measures only the candidates still in contention (`contenders`: under a
    label-aware rank those within `CONTENTION` paired standard errors of the lowest held-out loss, or the rank's screen
    if wider; under the distance, all), and none once one is left; the candidates measured on the most folds are ranked
    by their means over them. One fold is the default: on the text defaults' development splits four folds (every
    calibration example held out once) changed no choice of the default rank at six budgets, for about 2.7 times the
    candidate runs (benchmarks/RESULTS.md). reprune: prune the kept model with the chosen recipe on every
    calibration example (those held out too), as naming that recipe would, rather than keep the copy pruned on the
    first fold's fit examples: one more scoring and prune, the refit sees a third more examples, and the kept model is
    exactly what naming the chosen recipe gives. Off by default: on the text defaults' development splits the chosen
    model's accuracy moved by -0.5 to +0.6 points against the fold's copy (six budgets, mean +0.04): no gain for its cost.
    rank: what orders the candidates (`search_record.RANKS`) where every held-out example has a label: "screened" (the
    default): the smallest distance among the candidates whose task loss on the held-out labels (the loss Fisher
    scores with: cross-entropy for a classifier, per pixel for a segmenter) is within `loss_tolerance` (nats) of the
    lowest plus `standard_errors` paired standard errors of its difference from the lowest (the spread of the per-example
    differences over the examples both were measured on, over the square root of their number); "loss": the lowest such
    loss; "distance": KL + MD alone. Without labels, or for a regressor (its squared error has the labels' scale, which
    no tolerance fits), the distance ranks. The distance asks only how close a copy stays to the dense model, so it
    cannot find a copy that is farther but better on the task; the loss of 64 examples alone is too noisy to rank by.
    Chosen on the text defaults' development splits (two seeded draws of the calibration examples, 14 budgets):
    "screened" with 0.02 lost 1.79 points against the best candidate in all, "distance" 3.51, "loss" 3.86 (worst
    budget: -0.47, -1.10, -1.20); it changed two of the distance's 14 choices. `standard_errors` is 0 by default: a
    screen of one standard error alone, on four folds, lost more on the development splits than the fixed 0.02 (RESULTS):
    between refit candidates the per-example differences agree so closely (a standard error of 0.002 nats on bbc-news
    at 0.8) that a loss difference too small to move accuracy passes for a real one.
    """

    held_out: float = 0.25
    max_search_time: float | None = None
    refit_selection: bool = False
    folds: int = 1
    reprune: bool = False
    rank: str = "screened"
    loss_tolerance: float = 0.02
    standard_errors: float = 0.0
    # Fisher (a candidate) and the held-out loss (`rank`) read labels where the data has them: the CLI then passes them.
    needs_labels = True

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"importance_options held_out={self.held_out}: the share of calibration examples held out must be in (0, 1).")
        if self.max_search_time is not None and self.max_search_time < 0:
            raise ValueError(f"importance_options max_search_time={self.max_search_time}: give seconds >= 0, or None for no limit.")
        if self.rank not in RANKS:
            raise ValueError(f"importance_options rank={self.rank!r}: give one of {', '.join(map(repr, RANKS))}.")
        if self.loss_tolerance < 0:
            raise ValueError(f"importance_options loss_tolerance={self.loss_tolerance}: give a loss difference >= 0.")
        if self.standard_errors < 0:
            raise ValueError(f"importance_options standard_errors={self.standard_errors}: give a number of standard errors >= 0.")
        if self.folds < 1 or self.folds * self.held_out > 1.0 + 1e-9:
            raise ValueError(f"importance_options folds={self.folds}: give 1 to {int(1 / self.held_out + 1e-9)} folds "
                             f"(disjoint held-out shares of {self.held_out:g} of the calibration examples).")

    @classmethod
    def from_config(cls, config: OptinConfig) -> "RecipeSearch":
        return cls(**config.importance_options)


@dataclass
class HeldOut:
    """The dense model's outputs on the held-out batches, what each candidate is compared with: the KL's
    outputs per batch, the MD token rows per batch and each layer's [K, K] cosine Gram and token count; and, where
    every held-out example has a label the task's loss reads, each batch's labels and the dense model's loss."""

    batches: list[dict[str, torch.Tensor]]  # the model's inputs only: the labels are kept apart in `labels`
    rows: list[torch.Tensor]
    tokens: int | None
    outputs: list
    grams: list[torch.Tensor]
    layer_tokens: list[int]
    labels: list[torch.Tensor] | None = None
    loss: float | None = None

    @property
    def examples(self) -> int:
        return sum(len(next(iter(batch.values()))) for batch in self.batches)


def _task_losses(model: nn.Module, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """Each example's task loss ([batch], float64) of `logits` against `labels`, as Fisher scores with it
    (`importance.fisher.example_losses`: cross-entropy for a classifier, the mean binary cross-entropy for
    multi-label, the per-pixel cross-entropy of a segmenter); None for a regressor (a squared error in the labels'
    units, which no tolerance fits) and where the outputs are no such head's (a bare encoder, a language model's
    per-token logits)."""
    if logits is None or not ((logits.dim() == 2 and logits.shape[-1] > 1) or (logits.dim() == 4 and labels.dim() == 3)):
        return None
    return example_losses(logits, labels, model.config).double().cpu()


@torch.no_grad()
def _run(
    model: nn.Module, adapter: ArchAdapter, batches, rows, tokens, labels: list[torch.Tensor] | None = None,
) -> tuple[list, list[torch.Tensor], list[int], torch.Tensor | None]:
    """(outputs the KL compares, each layer's normalised MD rows, each layer's tokens per example, each example's task
    loss on `labels`, or None without them or where the head has no such loss) of `model`."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in adapter.layers_of(model)]
    layer_tokens = [0] * len(per_layer)
    outputs, losses = [], []
    with record_features(model, adapter) as features:
        for b, (batch, batch_rows) in enumerate(zip(batches, rows)):
            output = scoring_forward(model, batch)
            outputs.append(adapter.kl_outputs(output, batch))
            if labels is not None:
                losses.append(_task_losses(model, adapter.logits_of(output), labels[b]))
            for z, feature in enumerate(features):
                per_layer[z].append(select_rows(feature, batch_rows.to(device), tokens))
                layer_tokens[z] = feature.shape[1]
    loss = torch.cat(losses) if losses and all(part is not None for part in losses) else None
    return outputs, [torch.cat(parts) for parts in per_layer], layer_tokens, loss


def held_out_run(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config: OptinConfig) -> HeldOut:
    """The dense `model` on the held-out `batches`, as OPTIN's scoring captures it (`capture.capture_dense`). Their
    labels (where every batch has them) are set apart from the inputs: the candidates' task loss reads them, and
    only them."""
    labels = [batch["labels"] for batch in batches] if all("labels" in batch for batch in batches) else None
    inputs = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    tokens = adapter.default_seq_len(model.config, image_size_of(inputs))
    rows = md_token_rows(inputs, config.md_tokens, config.seed, tokens)
    outputs, features, layer_tokens, losses = _run(model, adapter, inputs, rows, tokens, labels)
    return HeldOut(inputs, rows, tokens, [bounded(o) for o in outputs], [f @ f.T for f in features], layer_tokens,
                   labels if losses is not None else None, None if losses is None else float(losses.mean()))


def distance(pruned: nn.Module, adapter: ArchAdapter, dense: HeldOut) -> tuple[float, float, torch.Tensor | None]:
    """(kl, md, losses) of the `pruned` model on the held-out examples: the mean over examples of KL(dense || pruned)
    of the task's logits (0 for a bare encoder), the mean over layers of the mean squared difference of the cosine
    Grams of their MD token rows (a layer whose tokens the pruned model dropped, vision token mode, has other rows:
    it is compared by the KL alone), and each example's task loss on the held-out labels (None without them)."""
    outputs, features, layer_tokens, loss = _run(pruned, adapter, dense.batches, dense.rows, dense.tokens, dense.labels)
    kl = float(kl_loss(dense.outputs, outputs, 1.0)) / dense.examples
    same = [z for z, n in enumerate(layer_tokens) if n == dense.layer_tokens[z]]
    md = sum(float(md_loss(dense.grams[z], features[z])) / dense.grams[z].numel() for z in same) / max(len(same), 1)
    return kl, md, loss


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


def candidates(
    config: OptinConfig, adapter: ArchAdapter, model_config, asked_repair: str, refit_selection: bool = False,
) -> list[Candidate]:
    """The recipes to try, in order: each criterion (those that score tokens, in token mode) with its repair, then, with
    `refit_selection`, with the refit choosing the units (`selection="refit"`, where its repair is a refit and the
    selection was not named), then without a repair (unless the config's selection or allocation is the refit's, which
    needs one); with a named repair, only it. Under "auto" each candidate's repair is the one its own pruner resolves
    (`auto_settings.resolve_defaults` for that criterion and selection on a model of `model_config`): on a ResNet
    OPTIN's candidate cuts the residual channels by default and is refit ("weights"), while Magnitude's and Fisher's
    keep the widths and take the family's first repair ("batchnorm"). The first is the recipe a budget of 0 keeps."""
    criteria = [name for name in SEARCHED_CRITERIA if not config.prune_tokens or getattr(CRITERIA[name], "scores_tokens", False)]

    def recipe(name: str, selection: str, repair: str) -> Candidate:
        asked = dataclasses.replace(config, importance=name, selection=selection, reconstruct=repair)
        return Candidate(name, resolve_defaults(asked, adapter, model_config).reconstruct, selection)

    tried = [recipe(name, config.selection, asked_repair) for name in criteria]
    if refit_selection and config.selection == "scores":
        tried += [c for c in (recipe(name, "refit", asked_repair) for name in criteria) if c.reconstruct in ("weights", "scales")]
    if asked_repair == "auto" and config.selection == "scores" and config.allocation != "refit":
        # a unit choice or per-layer counts by the refit need one: no bare candidate then
        tried += [Candidate(c.importance, "none") for c in tried[:len(criteria)] if c.reconstruct != "none"]
    return tried


def add_fold(candidate: Candidate, part: Candidate) -> None:
    """Fold `part`, `candidate`'s recipe measured on one more fold, into `candidate`: its kl, md, distance and loss
    become their means over the folds measured (each fold's distance in `candidate.folds` from the second on), its
    `losses` run on with the fold's, its seconds add up."""
    n = _folds_of(candidate) if candidate.distance is not None else 0
    def mean(old: float, new: float) -> float:  # over the n folds so far and this one
        return new if n == 0 else (old * n + new) / (n + 1)

    candidate.kl, candidate.md = mean(candidate.kl, part.kl), mean(candidate.md, part.md)
    candidate.folds = None if n == 0 else [*(candidate.folds or [candidate.distance]), part.distance]
    candidate.distance = candidate.kl + candidate.md
    if part.loss is None or (n and candidate.loss is None):
        candidate.loss = candidate.losses = None
    else:
        candidate.loss, candidate.losses = mean(candidate.loss, part.loss), [*(candidate.losses or []), *part.losses]
    candidate.seconds += part.seconds


def paired_se(a: list[float], b: list[float]) -> float:
    """The standard error of the mean of the per-example differences a - b, over the examples both were measured on
    (the first of each: every candidate's losses run fold by fold in the same order). 0 where fewer than two."""
    n = min(len(a), len(b))
    if n < 2:
        return 0.0
    diff = torch.tensor(a[:n], dtype=torch.float64) - torch.tensor(b[:n], dtype=torch.float64)
    return float(diff.std() / math.sqrt(n))


def _folds_of(candidate: Candidate) -> int:
    return len(candidate.folds) if candidate.folds else 1


def rivals(tried: list[Candidate]) -> list[int]:
    """The measured candidates measured on the most folds: the ones still compared (later folds measure only the
    candidates in contention, so one measured on fewer folds was out of it)."""
    measured = [i for i, c in enumerate(tried) if c.distance is not None]
    most = max((_folds_of(tried[i]) for i in measured), default=0)
    return [i for i in measured if _folds_of(tried[i]) == most]


def within(tried: list[Candidate], tolerance: float, standard_errors: float) -> list[int]:
    """The indices of the rival candidates (`rivals`) whose held-out loss is within `tolerance` plus `standard_errors`
    paired standard errors (`paired_se`, against the lowest's losses) of the lowest loss; each candidate's
    `loss_se` becomes that standard error. A difference smaller than its standard error is what another draw of the
    held-out examples could reverse."""
    pool = rivals(tried)
    best = min(pool, key=lambda i: tried[i].loss)
    kept = []
    for i in pool:
        tried[i].loss_se = paired_se(tried[i].losses, tried[best].losses)
        if tried[i].loss <= tried[best].loss + tolerance + standard_errors * tried[i].loss_se:
            kept.append(i)
    return kept


def label_aware(tried: list[Candidate], rank: str) -> bool:
    """Whether `rank` reads the held-out loss: it asks for it and every measured candidate has one."""
    return rank != "distance" and all(c.loss is not None for c in tried if c.distance is not None)


def choose(tried: list[Candidate], rank: str, tolerance: float, standard_errors: float = 0.0) -> int | None:
    """The index of the candidate `rank` keeps among the rival ones of `tried` (`rivals`; None if none was measured;
    the first of equals): "screened": the smallest mean distance among those `within` the tolerance of the lowest
    loss; "loss": the lowest loss; "distance" (and any rank where a candidate has no held-out loss): the smallest
    distance."""
    pool = rivals(tried)
    if not pool:
        return None
    if not label_aware(tried, rank):
        return min(pool, key=lambda i: tried[i].distance)
    if rank == "loss":
        return min(pool, key=lambda i: tried[i].loss)
    return min(within(tried, tolerance, standard_errors), key=lambda i: tried[i].distance)


def contenders(tried: list[Candidate], search: RecipeSearch) -> list[int]:
    """The rival candidates a further fold can still decide between: under a label-aware rank those `within`
    `CONTENTION` standard errors (or the rank's screen, if wider) of the lowest held-out loss; under the distance every
    rival (the distance has no per-example spread to judge by)."""
    if not label_aware(tried, search.rank):
        return rivals(tried)
    return within(tried, search.loss_tolerance, max(search.standard_errors, CONTENTION))


def search_base(config: OptinConfig) -> OptinConfig:
    """The config each candidate varies: `config` with a named criterion in place of "auto"."""
    return dataclasses.replace(config, importance="optin", importance_options={})
