"""`OptinPruner`: the orchestration of a prune, and only that: check what is asked against the model's adapter,
score (`importance`), choose the masks (`allocate.choose_masks`), slim, repair (`reconstruct`), attach the result;
then save or push. Under `importance="auto"` that run is repeated per candidate recipe (`prune_by_search`), each
measured with `recipe_search`'s parts: the search is pruning runs, so it lives here and calls only downwards."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any

import torch
from huggingface_hub import CommitInfo
from torch import nn

from .allocate import check_budget, choose_masks
from .arch import ArchAdapter, check_model, require
from .auto_settings import resolve_defaults
from .checkpoint import MAX_SHARD_SIZE, save_pruned
from .config import OptinConfig
from .criteria import AUTO_IMPORTANCE
from .data import average_length, check_inputs, image_size_of, prepare_calibration, replayable
from .dense_calls import CalibrationBatches, weights_sum
from .engine.estimate import ScoringPlan, plan_model_scoring
from .engine.streaming import STREAMED_CRITERIA, check_streaming
from .hub import CardMetrics, push_to_hub
from .importance import CRITERIA, ImportanceScores, criterion_from_config
from .macs import CostModel
from .masks import PruningMasks, check_masks
from .memory import release_freed_memory
from .reconstruct import Reconstruction, reconstruct, unslim
from .recipe_search import (
    SEARCHED_CRITERIA, HeldOut, RecipeSearch, add_fold, calibration_examples, candidates, choose, contenders, distance,
    held_out_run, label_aware, search_base, split_examples, within,
)
from .result import PruningResult, attach_result, pruning_result, result_of_pruning
from .search_record import RECORD_KEY, Candidate, SearchRecord
from .slim import slim_model


class OptinPruner:
    """One-shot OPTIN pruning of a trained transformer under a MAC budget.

    Example:
        pruner = OptinPruner(OptinConfig(mac_constraint=0.6))
        model = pruner.prune_model(model, texts, tokenizer=tokenizer)
        pruner.save(model, "pruned")
    """

    def __init__(self, config: OptinConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("Pass either an OptinConfig or keyword settings, not both.")
        self.config = config or OptinConfig(**kwargs)
        self.plan: ScoringPlan | None = None
        self.scores: ImportanceScores | None = None
        self.masks: PruningMasks | None = None
        self.reconstruction: Reconstruction | None = None
        self.seq_len: float | None = self.config.seq_len
        # A vision model's MACs are counted at this (height, width): the config's, else the calibration images'.
        self.image_size: tuple[int, int] | None = tuple(self.config.image_size) if self.config.image_size else None
        self.timings: dict[str, float] = {}
        # the repair asked for where `prune_channels` was left to its default (None where it was named)
        self.default_channels_repair: str | None = None
        self.default_allocation = self.config.allocation == "auto"  # left to the family: the scores where no data measures

    def _batches(
        self, model: nn.Module, adapter: ArchAdapter, data: Any, tokenizer, labels: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        c = self.config
        batches = prepare_calibration(
            data, tokenizer, num_samples=c.num_samples, batch_size=c.batch_size, max_length=c.max_length, labels=labels,
            config=model.config,
        )
        check_inputs(batches, adapter.is_vision, model.config.model_type)
        if self.config.image_size is None:
            self.image_size = image_size_of(batches)
        if self.config.seq_len is None:
            self.seq_len = average_length(batches) or adapter.default_seq_len(model.config, self.image_size)
        return batches

    def _reconstruction_batches(
        self, model: nn.Module, adapter: ArchAdapter, data: Any, tokenizer
    ) -> list[dict[str, torch.Tensor]]:
        """The first `reconstruct_samples` examples of `data` (those scoring reads are among them), keeping the dense
        run over them that the refit selection records for the refit (`dense_calls`)."""
        c = self.config
        batches = CalibrationBatches(prepare_calibration(
            data, tokenizer, num_samples=c.reconstruct_samples, batch_size=c.batch_size, max_length=c.max_length, config=model.config
        ))
        check_inputs(batches, adapter.is_vision, model.config.model_type)
        if self.config.image_size is None:  # given masks, the refit's images are the only ones read
            self.image_size = image_size_of(batches)
        return batches

    def _check_model(self, model: nn.Module, repair: bool = False) -> ArchAdapter:
        """The adapter of a dense model that this config can prune (and, with `repair`, reconstruct): what
        the config asks for and the adapter does not declare is refused here, before any scoring. The entry
        points look the adapter up here, once, and hand it to everything they call."""
        adapter = check_model(model)
        self._resolve_repair(model, adapter)
        c = self.config
        # A refit allocation, and a refit between steps, run the repair even where the model is not slimmed.
        self._refuse(model, adapter, repair or c.allocation == "refit" or c.prune_steps > 1)
        if _offloaded(model):  # what layer-streamed scoring cannot run
            check_streaming(model, adapter, c, repair)
        return adapter

    def _resolve_auto(self, model: nn.Module) -> bool:
        """Whether an entry point must run importance="auto"'s recipe search first (`prune_by_search`; `_search`).
        An offloaded (layer-streamed) model cannot have pruned copies to measure, so there "auto" becomes OPTIN, the
        first searched criterion that streamed scoring runs, named in this pruner's config (and so in the saved one)."""
        if self.config.importance != AUTO_IMPORTANCE:
            return False
        if not _offloaded(model):
            # What every candidate would refuse (an already pruned model, a setting the family does not declare) is
            # refused before the search reads any data, as it is for a named criterion; OPTIN, the first candidate,
            # takes every setting a criterion can (tokens, channels).
            type(self)(search_base(self.config))._check_model(model, repair=True)
            return True
        streamed = next(name for name in SEARCHED_CRITERIA if name in STREAMED_CRITERIA)
        self.config = dataclasses.replace(self.config, importance=streamed, importance_options={})
        return False

    def _search(self, model: nn.Module, data: Any, tokenizer) -> None:
        """Run importance="auto"'s recipe search (`search_recipe`) on copies of the dense `model`, which stays as it
        is. This pruner then holds the kept run's config (the chosen criterion and repair, the search record in
        `extra`), scores and masks, as if that recipe had been named; so `prune_model(model, data, masks=self.masks)`
        slims `model` with the very masks `prune_model(model, data)` would (its refit then reads `data`'s first
        `reconstruct_samples` examples, where the search's kept copy was refit on the fit share, or all under `reprune`)."""
        search_recipe(self, model, data, tokenizer)

    def _resolve_repair(self, model: nn.Module, adapter: ArchAdapter) -> None:
        """Replace `reconstruct="auto"` in this pruner's config by the repair it runs on `model`'s family, so the
        result and the saved config record the repair used."""
        c = self.config
        if c.prune_channels is None:  # the default: residual channels cut where the family and settings allow it
            self.default_channels_repair = c.reconstruct  # the repair asked for, resolved again if no data judges them
        self.config = resolve_defaults(c, adapter, model.config, _offloaded(model))  # the search's candidates too

    def _refuse(self, model: nn.Module, adapter: ArchAdapter, repair: bool) -> None:
        """Raise if `model` is already pruned or this config asks for what `adapter` does not declare."""
        if getattr(model.config, "optin", None):
            raise ValueError("This model is already pruned (config.optin is set); prune the dense base model instead.")
        c, model_type = self.config, model.config.model_type
        if c.prune_tokens:
            require(adapter, "tokens", model_type)
        if c.prune_channels:
            require(adapter, "channels", model_type)
            if c.reconstruct == "scales":  # one factor per kept unit cannot rebuild what a cut channel carried
                raise ValueError("reconstruct='scales' cannot repair the convs reading residual channels that "
                                 "prune_channels=True cuts: use reconstruct='weights' (or 'batchnorm'), or prune_channels=False.")
            if not getattr(CRITERIA[c.importance], "scores_channels", False):
                scoring = [name for name in CRITERIA if getattr(CRITERIA[name], "scores_channels", False)]
                raise ValueError(f"prune_channels=True needs residual channel scores, and importance={c.importance!r} "
                                 f"gives none: use importance={' or '.join(map(repr, scoring))}, or prune_channels=False.")
        for kind, with_other in (("heads", c.prune_neurons), ("neurons", c.prune_heads)):
            if not with_other:  # this kind alone is asked for: the family must have it
                require(adapter, kind, model_type)
        if repair and c.reconstruct != "none":
            require(adapter, c.reconstruct, model_type)
        if c.prune_tokens and not getattr(CRITERIA[c.importance], "scores_tokens", True):
            scoring = [name for name in CRITERIA if getattr(CRITERIA[name], "scores_tokens", False)]
            raise ValueError(
                f"prune_tokens=True needs token scores, and importance={c.importance!r} gives none: use "
                f"importance={' or '.join(map(repr, scoring))} (the criteria that score tokens), or prune_tokens=False."
            )

    def compute_scores(self, model: nn.Module, data: Any, tokenizer=None) -> ImportanceScores:
        """Score every head and neuron (and token, in token mode) of the dense `model` on calibration `data`.

        A criterion that scores by masked runs is first timed: `plan` says what it will run and
        how long it should take. Under `max_scoring_time`, `config` then holds the settings the
        budget picked (and `max_scoring_time=None`), which `save` writes.

        Under `importance="auto"` the recipe search runs first (`_search`): the scores are the chosen
        criterion's (its last step's with `prune_steps > 1`), and `config` names that recipe.
        """
        if self._resolve_auto(model):
            self._search(model, data, tokenizer)
            return self.scores
        return self._scores(model, self._check_model(model), data, tokenizer)

    def _scores(self, model: nn.Module, adapter: ArchAdapter, data: Any, tokenizer) -> ImportanceScores:
        """`compute_scores` of a model whose adapter the caller checked."""
        data = replayable(data)  # the plan may read it again
        criterion = criterion_from_config(self.config)
        labels = getattr(criterion, "needs_labels", False)
        batches = self._batches(model, adapter, data, tokenizer, labels=labels)
        was_training = model.training
        model.eval()
        try:
            check_budget(CostModel.of(model, adapter, self.image_size), self.config, self.seq_len, self.config.mac_constraint)
            if hasattr(criterion, "masked_units"):
                with torch.no_grad():
                    units = criterion.masked_units(model, adapter, self.config)
                    if self._plan_scoring(model, adapter, units, batches):
                        batches = self._batches(model, adapter, data, tokenizer, labels=labels)
                criterion = criterion_from_config(self.config)  # with the neuron grouping the plan picked
            start = time.perf_counter()
            with torch.set_grad_enabled(getattr(criterion, "needs_grad", False)):
                self.scores = criterion(model, adapter, batches, self.config)
        finally:
            model.train(was_training)
        self.timings["scoring_s"] = time.perf_counter() - start
        release_freed_memory()  # the masked passes' activations
        return self.scores

    def _plan_scoring(self, model: nn.Module, adapter, units: dict[str, int], batches: list[dict[str, torch.Tensor]]) -> bool:
        """Estimate the scoring time (`engine.estimate.plan_model_scoring`); under `max_scoring_time`, make
        `self.config` the fitting settings. True: fewer examples were picked."""
        c = self.config
        self.plan, timing = plan_model_scoring(model, adapter, units, batches, c)
        self.timings.update(dense_forward_s=timing.seconds, estimated_scoring_s=self.plan.estimated_s)
        fewer = self.plan.num_samples < self.plan.available_samples
        if c.max_scoring_time is not None:
            self.timings["max_scoring_time_s"] = c.max_scoring_time
            # The saved optin_config.json holds the settings used, so loading it reruns this very scoring.
            picked = {"num_samples": self.plan.num_samples} if fewer else {}
            if self.plan.neuron_group_size is not None:
                picked["neuron_group_size"] = self.plan.neuron_group_size
            self.config = dataclasses.replace(c, max_scoring_time=None, **picked)
        return fewer

    def compute_masks(
        self, model: nn.Module, data: Any = None, scores: ImportanceScores | None = None, tokenizer=None
    ) -> PruningMasks:
        """Allocate the MAC budget; with `scores` given (or kept from before) nothing is re-scored.

        With `prune_steps > 1` and no scores yet, the cut is made in steps with a reconstruction
        and a re-scoring between them (`_masks_in_steps`). `selection="refit"` re-chooses units on `data`, so
        `prune_model(model, data, masks=compute_masks(model, data))` prunes as `prune_model(model, data)` does.
        Under `importance="auto"` with no scores, the recipe search runs first (`_search`, on copies of `model`): the
        masks are the chosen recipe's, and `config` names that recipe, so the same holds."""
        if scores is None and self.scores is None and self._resolve_auto(model):
            self._search(model, data, tokenizer)
            return self.masks
        return self._masks(model, self._check_model(model), data, scores, tokenizer)

    def _masks(
        self, model: nn.Module, adapter: ArchAdapter, data: Any, scores: ImportanceScores | None, tokenizer,
        batches: list[dict[str, torch.Tensor]] | None = None,
    ) -> PruningMasks:
        """`compute_masks` of a model whose adapter the caller checked; `batches`: the refit's calibration batches
        where the caller read them."""
        data = replayable(data)  # each step reads it again
        if data is None and batches is None and self.config.prune_channels and self.default_channels_repair is not None:
            # no calibration data to judge a residual share on: the default keeps the residual widths (and its repair)
            self.config = dataclasses.replace(self.config, prune_channels=False, reconstruct=self.default_channels_repair)
            self._resolve_repair(model, adapter)
        if data is None and batches is None and self.default_allocation and self.config.allocation != "scores":
            # no data for a per-layer allocation (the fluctuation's dense pass, the refit's cuts): the default counts by the scores
            self.config = dataclasses.replace(self.config, allocation="scores")
        if scores is None and self.scores is None and self.config.prune_steps > 1:
            return self._masks_in_steps(model, adapter, data, tokenizer, batches)
        if scores is None and self.scores is None:
            scores = self._scores(model, adapter, data, tokenizer)
        elif scores is None:
            scores = self.scores
        elif data is not None and (self.config.seq_len is None or (adapter.is_vision and self.config.image_size is None)):
            self._batches(model, adapter, data, tokenizer)
        c = self.config
        measured = c.prune_channels or c.allocation != "scores" or c.selection == "refit"
        if batches is None and measured and data is not None:  # the options the search measures on calibration data
            batches = self._reconstruction_batches(model, adapter, data, tokenizer)
        self.masks = self._choose(model, adapter, scores, c.mac_constraint, batches, select=True)
        return self.masks

    def _masks_in_steps(
        self, model: nn.Module, adapter: ArchAdapter, data: Any, tokenizer, batches: list[dict[str, torch.Tensor]] | None,
    ) -> PruningMasks:
        """Remove 1/k of the MAC cut, reconstruct, re-score what is left on the repaired model; k times."""
        c = self.config
        if data is None:
            raise ValueError(f"prune_steps={c.prune_steps} scores and reconstructs on calibration data: pass data.")
        if batches is None:
            batches = self._reconstruction_batches(model, adapter, data, tokenizer)
        current, masks, scoring_s = model, None, 0.0
        try:
            for step in range(1, c.prune_steps + 1):
                if c.checkpoint_dir is not None:  # each step scores another (repaired) model: its losses resume apart
                    self.config = dataclasses.replace(self.config, checkpoint_dir=os.path.join(c.checkpoint_dir, f"step{step}"))
                scores = self._scores(current, adapter, data, tokenizer)
                scoring_s += self.timings["scoring_s"]
                if masks is not None:
                    scores = scores.ranking_last(~masks.head_mask, ~masks.neuron_mask)
                last = step == c.prune_steps
                masks = self._choose(model, adapter, scores, 1 - (1 - c.mac_constraint) * step / c.prune_steps, batches,
                                     select=last)  # the refit's unit choice for the final masks only
                if not last:
                    work = slim_model(copy.deepcopy(model), masks, adapter)
                    reconstruct(work, model, batches, c.reconstruct, c.reconstruct_ridge, adapter, inputs=c.reconstruct_inputs,
                                masks=masks, readers=c.reconstruct_readers)
                    current = unslim(work, model, masks, adapter)
        finally:
            self.config = dataclasses.replace(self.config, checkpoint_dir=c.checkpoint_dir)  # as given, for the saved config
        self.timings["scoring_s"], self.scores, self.masks = scoring_s, scores, masks
        return masks

    def _choose(
        self, model: nn.Module, adapter: ArchAdapter, scores: ImportanceScores, mac_constraint: float,
        batches: list[dict[str, torch.Tensor]] | None, select: bool,
    ) -> PruningMasks:
        """The masks that keep `mac_constraint` of the dense `model`'s MACs by `scores` (`allocate.choose_masks`), at
        the MAC length and image size this pruner counts at, which it records; `select`: apply `selection` (the final
        masks; a step between refits keeps the scores' units)."""
        costs = CostModel.of(model, adapter, self.image_size)
        self.image_size = costs.image_size  # the size counted at (the config's when no image was read), recorded
        scores.check_fits(model.config, adapter)
        self.scores = scores
        if self.seq_len is None:
            self.seq_len = adapter.default_seq_len(model.config, self.image_size)
        if self.seq_len is None:
            raise ValueError("The MAC sequence length is unknown: pass calibration data or set OptinConfig(seq_len=...).")
        masks, timings = choose_masks(model, scores, costs, self.seq_len, self.config, mac_constraint, batches, select=select)
        self.timings.update(timings)
        return masks

    def prune_model(
        self, model: nn.Module, data: Any = None, masks: PruningMasks | None = None, tokenizer=None, dense: nn.Module | None = None,
    ) -> nn.Module:
        """Slim `model` in place (scoring and allocating first unless `masks` are given), then
        reconstruct it on `data` unless `reconstruct="none"`. The slim model carries its result
        (`optin_hf.result.pruning_result`), so it can be saved or pushed without this pruner.
        Under `importance="auto"` (and no `masks`), the recipe is chosen first (`prune_by_search`).
        `dense`: an unpruned copy of `model` that the caller keeps anyway (to compare against): the refit reads it
        instead of copying `model` once more, one model's memory less (16 GB for an 8B model in bfloat16). It is
        left as it is, and refused unless its weights are `model`'s. The search under "auto" prunes copies and
        compares them with `model` itself, so it needs no copy."""
        if dense is not None and (dense is model or weights_sum(dense) != weights_sum(model)):
            raise ValueError("dense= must be an unpruned copy of the model being pruned, with the same weights (e.g. "
                             "copy.deepcopy(model) before pruning); leave it out and the pruner makes its own.")
        if masks is None and self._resolve_auto(model):
            return prune_by_search(self, model, data, tokenizer)
        adapter = self._check_model(model, repair=True)  # resolves reconstruct="auto" for this family
        c = self.config
        data = replayable(data)  # read for the refit, then for scoring
        if masks is not None:
            check_masks(masks, "prune_model")
            masks.check_fits(model.config, adapter)
        if c.reconstruct != "none" and data is None:
            raise ValueError(
                f"reconstruct={c.reconstruct!r} refits the slim model on calibration data, and none was given: pass "
                "data (e.g. the examples you score on), or set OptinConfig(reconstruct='none') to slim only."
            )
        # Read before scoring, so that a bad example among them fails fast and never after slimming.
        batches = self._reconstruction_batches(model, adapter, data, tokenizer) if c.reconstruct != "none" else None
        if masks is None:
            masks = self._masks(model, adapter, data, None, tokenizer, batches)
        self.masks = masks
        if batches is None:
            dense = None
        elif dense is None:
            dense = copy.deepcopy(model)
        slim_model(model, masks, adapter)
        if dense is not None:
            start = time.perf_counter()
            self.reconstruction = reconstruct(model, dense, batches, c.reconstruct, c.reconstruct_ridge, adapter,
                                              inputs=c.reconstruct_inputs, masks=masks, readers=c.reconstruct_readers)
            self.timings["reconstruction_s"] = time.perf_counter() - start
        counted = dataclasses.replace(self.config, image_size=list(self.image_size) if self.image_size else None)
        attach_result(model, result_of_pruning(model, counted, masks, self.seq_len, self.reconstruction))
        return model

    def check_pruned(self, model: nn.Module) -> PruningResult:
        """The result `model` carries; raise unless this pruner made it, so that its scores describe the model."""
        if self.masks is None:
            raise ValueError("Nothing to save or push yet: call prune_model(model, ...) first.")
        check_masks(self.masks, "OptinPruner.masks (what save and push_to_hub write)")
        result = pruning_result(model)
        mine, theirs = self.masks, result.masks
        same = (
            torch.equal(mine.head_mask, theirs.head_mask)
            and torch.equal(mine.neuron_mask, theirs.neuron_mask)
            and mine.tokens_per_layer() == theirs.tokens_per_layer()
        )
        if not same:
            raise ValueError(
                "This model was pruned with other masks than this pruner's (another prune_model call): save or push "
                "it with the pruner that pruned it, or with optin_hf.checkpoint.save_pruned(model, ...) / "
                "optin_hf.hub.push_to_hub(model, ...), which need no pruner."
            )
        return result

    def save(
        self,
        model: nn.Module,
        save_dir: str | os.PathLike,
        max_shard_size: int | str = MAX_SHARD_SIZE,
        *,
        overwrite: bool = False,
    ) -> None:
        """Write the slim model, `optin_config.json`, the masks and this pruner's scores atomically
        (`optin_hf.checkpoint.save_pruned` with the scores: an earlier checkpoint is replaced keeping the user's
        files, any other non-empty folder refused unless `overwrite=True`). Weights above `max_shard_size` are sharded.
        """
        self.check_pruned(model)
        save_pruned(model, save_dir, scores=self.scores, max_shard_size=max_shard_size, overwrite=overwrite)

    def push_to_hub(
        self,
        model: nn.Module,
        repo_id: str,
        masks_only: bool = True,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        *,
        metrics: CardMetrics | None = None,
        speedup: float | None = None,
        max_shard_size: int | str = MAX_SHARD_SIZE,
    ) -> CommitInfo:
        """Share the pruned `model` with this pruner's scores: its masks naming the base model (default), or the
        full slim checkpoint. See `optin_hf.hub.push_to_hub`.
        """
        self.check_pruned(model)
        return push_to_hub(
            model,
            repo_id,
            scores=self.scores,
            masks_only=masks_only,
            private=private,
            token=token,
            commit_message=commit_message,
            metrics=metrics,
            speedup=speedup,
            max_shard_size=max_shard_size,
        )


def _offloaded(model: nn.Module) -> bool:
    """Whether some of `model`'s weights are offloaded (on the meta device, loaded per forward)."""
    return any(p.is_meta for p in model.parameters())


class CandidateRunner:
    """Prunes copies of one dense model with candidate recipes and measures each on the held-out examples (none:
    the runner that prunes the kept model on every calibration example measures nothing).

    Each criterion scores the dense model once, on the fit examples, and every candidate (and budget) of it
    reuses those scores, as `benchmarks/quality.py` does; a refit in steps re-scores on its own.
    """

    def __init__(
        self, model: nn.Module, adapter: ArchAdapter, fit: list[dict[str, torch.Tensor]], dense: HeldOut | None,
        base: OptinConfig, pruner_class: type[OptinPruner],
    ):
        self.model, self.adapter, self.fit, self.dense, self.base = model, adapter, fit, dense, base
        self.pruner_class = pruner_class
        self.scored: dict[str, tuple[OptinPruner, ImportanceScores] | ValueError] = {}

    def scores(self, name: str) -> tuple[OptinPruner, ImportanceScores]:
        """The dense model's scores by criterion `name` and the pruner that computed them (a failure: raised again)."""
        if name not in self.scored:
            # scoring only: no repair, so neither the refit's unit choice nor its per-layer counts (they need one)
            scorer = self.pruner_class(dataclasses.replace(self.base, importance=name, reconstruct="none", reconstruct_inputs=False,
                                                           reconstruct_readers=False,
                                                           prune_steps=1, selection="scores", allocation="scores",
                                                           allocation_rounds=1, allocation_band=OptinConfig.allocation_band))
            try:
                self.scored[name] = (scorer, scorer.compute_scores(self.model, self.fit))
            except ValueError as err:  # a criterion this model or data cannot take: Fisher on a regressor without labels
                self.scored[name] = err
        if isinstance(self.scored[name], ValueError):
            raise self.scored[name]
        return self.scored[name]

    def run(self, candidate: Candidate, mac_constraint: float | None = None) -> tuple[nn.Module, OptinPruner]:
        """A copy of the dense model pruned with `candidate`'s recipe (at `mac_constraint`, default the base
        config's) and the pruner that pruned it; `candidate` gets its distance (where there are held-out examples)
        and the seconds it took."""
        began = time.perf_counter()
        scorer, scores = self.scores(candidate.importance)
        # The scorer's config holds what a scoring time budget picked (fewer examples, coarser neuron groups).
        steps = self.base.prune_steps if candidate.reconstruct != "none" else 1
        # the input projections (a ResNet's readers) refit where the candidate's repair is the weights refit they belong to
        weights = candidate.reconstruct == "weights"
        inputs, readers = self.base.reconstruct_inputs and weights, self.base.reconstruct_readers and weights
        # prune_channels as asked (the default: resolved by this candidate's settings, as its repair was, not the scorer's)
        changes = dict(reconstruct=candidate.reconstruct, reconstruct_inputs=inputs, reconstruct_readers=readers, selection=candidate.selection,
                       prune_steps=steps, allocation=self.base.allocation, allocation_rounds=self.base.allocation_rounds,
                       allocation_band=self.base.allocation_band, prune_channels=self.base.prune_channels)
        pruner = self.pruner_class(dataclasses.replace(scorer.config, **changes, mac_constraint=mac_constraint or self.base.mac_constraint))
        pruner.seq_len, pruner.image_size, pruner.plan = scorer.seq_len, scorer.image_size, scorer.plan
        if steps == 1:  # allocated from the shared scores (then re-chosen by the refit under selection="refit")
            pruner.scores = scores
            pruner.timings["scoring_s"] = scorer.timings["scoring_s"]
        work = copy.deepcopy(self.model)
        pruner.prune_model(work, self.fit, dense=self.model)
        if self.dense is not None:
            candidate.kl, candidate.md, losses = distance(work, self.adapter, self.dense)
            candidate.distance = candidate.kl + candidate.md
            if losses is not None:
                candidate.loss, candidate.losses = float(losses.mean()), losses.tolist()
        candidate.seconds = time.perf_counter() - began
        return work, pruner


def measure(runner: CandidateRunner, candidate: Candidate, keep: bool) -> tuple[nn.Module, OptinPruner] | None:
    """Measure `candidate` on `runner`'s fold, one more fold for it (`recipe_search.add_fold`). Returns the pruned copy
    and its pruner where `keep`, else frees the copy."""
    part = Candidate(candidate.importance, candidate.reconstruct, candidate.selection)
    trial = runner.run(part)
    add_fold(candidate, part)
    return trial if keep else None


class FoldRunners:
    """The runner of each fold (`search.folds` splits of the calibration examples into fit and held-out ones), each
    made when first asked for: a later fold may never be run, and making its runner runs the dense model on it."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, examples: list[dict[str, torch.Tensor]], base: OptinConfig,
                 search: RecipeSearch, pruner_class: type[OptinPruner]):
        self.model, self.adapter, self.examples, self.base, self.search = model, adapter, examples, base, search
        self.pruner_class = pruner_class
        self.made: dict[int, CandidateRunner] = {}

    def __len__(self) -> int:
        return self.search.folds

    def __getitem__(self, fold: int) -> CandidateRunner:
        if not 0 <= fold < len(self):
            raise IndexError(fold)
        if fold not in self.made:
            fit, held = split_examples(self.examples, self.base, self.search.held_out, fold)
            self.made[fold] = make_runner(self.model, self.adapter, fit, held, self.base, self.pruner_class)
        return self.made[fold]


def prepare_search(
    model: nn.Module, data: Any, tokenizer, config: OptinConfig, search: RecipeSearch, asked_repair: str,
    pruner_class: type[OptinPruner],
) -> tuple[FoldRunners, list[Candidate], list[dict[str, torch.Tensor]]]:
    """The runners of `model`'s candidates, one per fold of `data` (`search.folds` splits into fit and held-out
    examples), the candidates, and every calibration example read; `pruner_class` prunes each candidate
    (`OptinPruner`, or the subclass that started the search)."""
    base = search_base(config)
    adapter = check_model(model)
    tried = candidates(base, adapter, model.config, asked_repair, search.refit_selection)
    refits = any(c.reconstruct != "none" for c in tried)
    examples = calibration_examples(model, replayable(data), tokenizer, base, search.held_out,
                                    max(base.num_samples, base.reconstruct_samples if refits else 0))
    check_inputs(examples, adapter.is_vision, model.config.model_type)  # before the dense model runs on them
    runners = FoldRunners(model, adapter, examples, base, search, pruner_class)
    runners[0]  # noqa: B018  (the first fold's split is checked, and its dense outputs taken, before any candidate runs)
    return runners, tried, examples


def make_runner(
    model: nn.Module, adapter: ArchAdapter, fit: list[dict[str, torch.Tensor]], held: list[dict[str, torch.Tensor]],
    base: OptinConfig, pruner_class: type[OptinPruner],
) -> CandidateRunner:
    """The runner that prunes `model` on the `fit` examples and measures each candidate on the `held` ones."""
    batches = prepare_calibration(held, num_samples=len(held), batch_size=base.batch_size, max_length=base.max_length, labels=True)
    return CandidateRunner(model, adapter, fit, held_out_run(model, adapter, batches, base), base, pruner_class)


def search_recipe(pruner: OptinPruner, model: nn.Module, data: Any, tokenizer=None) -> nn.Module:
    """Try `importance="auto"`'s candidates on copies of the dense `model` (left as it is) until the time budget has
    passed; return the best-ranked candidate's pruned copy (`RecipeSearch.rank`), carrying its result. Every candidate
    is measured on the first fold; each later fold measures the candidates still in contention (`contenders`: all of
    them under the distance), and stops once one is left. The kept copy is the chosen candidate's first-fold copy
    (re-pruned on every calibration example under `reprune`). `pruner` then holds that run's config (the criterion and
    repair chosen, the record in `extra`), scores, masks and refit, as if that recipe had been named."""
    start = time.perf_counter()
    search = RecipeSearch.from_config(pruner.config)
    was_training = model.training
    model.eval()
    try:
        runners, tried, examples = prepare_search(model, data, tokenizer, pruner.config, search, pruner.config.reconstruct, type(pruner))
        # a label-aware rank needs the held-out labels; without them the distance ranks, as the record says
        rank = search.rank if runners[0].dense.labels is not None else "distance"
        screen = rank == "screened"
        record = SearchRecord(runners[0].dense.examples, len(runners[0].fit), search.max_search_time, folds=1, rank=rank,
                              tolerance=search.loss_tolerance if screen else None,
                              standard_errors=search.standard_errors if screen else None)
        copies: dict[int, tuple[nn.Module, OptinPruner]] = {}  # first-fold copies of the candidates that may be kept
        out_of_time = lambda: (search.max_search_time is not None  # noqa: E731
                               and time.perf_counter() - start >= search.max_search_time)

        def settle() -> None:
            """Choose, then free each copy no later measurement can make the choice (memory: the dense model, the copies
            kept, and the one being measured); a freed copy that is chosen after all is pruned again."""
            record.chosen = choose(record.candidates, rank, search.loss_tolerance, search.standard_errors)
            if not label_aware(record.candidates, rank) or rank == "loss":
                live = {record.chosen}
            elif len(runners) > 1:  # a later fold may yet decide between the contenders
                live = set(contenders(record.candidates, search))
            else:
                live = set(within(record.candidates, search.loss_tolerance, search.standard_errors))
            for index in [i for i in copies if i not in live | {record.chosen}]:
                del copies[index]

        first_error: ValueError | None = None
        for candidate in tried:
            record.candidates.append(candidate)
            if record.chosen is not None and out_of_time():
                candidate.skipped = f"not tried: max_search_time={search.max_search_time:g} s had passed"
                continue
            try:
                trial = measure(runners[0], candidate, keep=not search.reprune)
            except ValueError as err:  # a criterion this model or data cannot take
                candidate.skipped = f"failed: {err}"
                first_error = first_error or err
                continue
            if trial is not None:
                copies[len(record.candidates) - 1] = trial
            del trial
            settle()
        if record.chosen is None:
            raise first_error
        for fold in range(1, len(runners)):
            rivals = contenders(record.candidates, search)
            if len(rivals) < 2 or out_of_time():
                break
            for index in rivals:
                measure(runners[fold], record.candidates[index], keep=False)
            record.folds = fold + 1
            settle()
        picked = record.candidates[record.chosen]
        if search.reprune or record.chosen not in copies:  # the chosen recipe on every example, or its first fold again
            runner = (CandidateRunner(model, runners[0].adapter, examples, None, runners[0].base, type(pruner))
                      if search.reprune else runners[0])
            copies = {record.chosen: runner.run(Candidate(picked.importance, picked.reconstruct, picked.selection))}
        record.kept_examples = len(examples) if search.reprune else len(runners[0].fit)
    finally:
        model.train(was_training)
    work, chosen = copies[record.chosen]
    record.seconds = time.perf_counter() - start
    extra = {**pruner.config.extra, RECORD_KEY: {**record.to_dict(), "options": dict(pruner.config.importance_options)}}
    # the refit saw only the examples the kept model was pruned on: the config says so, not the number asked for
    used = dict(extra=extra, reconstruct_samples=min(chosen.config.reconstruct_samples, record.kept_examples))
    chosen.config = dataclasses.replace(chosen.config, **used)
    result = pruning_result(work)
    attach_result(work, dataclasses.replace(result, config=dataclasses.replace(result.config, **used)))
    chosen.timings = {**chosen.timings, "search_s": time.perf_counter() - start}
    vars(pruner).update(vars(chosen))  # the pruner now describes the run it kept: config, scores, masks, refit, timings
    return work


def prune_by_search(pruner: OptinPruner, model: nn.Module, data: Any, tokenizer=None) -> nn.Module:
    """`pruner.prune_model(model, data)` under `importance="auto"`: `search_recipe`, then `model` (in place) becomes
    the kept copy: the same slimming, then its (refit) weights (a refit adds no parameter) and its result."""
    work = search_recipe(pruner, model, data, tokenizer)
    slim_model(model, pruner.masks, check_model(model))
    model.load_state_dict(work.state_dict())
    attach_result(model, pruning_result(work))
    return model
