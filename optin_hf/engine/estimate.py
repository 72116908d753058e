"""How long scoring will take on this machine, and which calibration size and neuron grouping
fit a time budget.

One dense forward over the first calibration batch is timed (the cost grows with the tokens,
and timing all of them would take a good share of a short budget); a candidate then costs the layers it
reruns over the examples' real tokens: for the fast engine layers i..N-1 for a head of layer i
and i+1..N-1 for a neuron (its own layer's FFN runs once per layer, then a cheap correction),
for the reference engine the whole model over the padded batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.base import LayerGeometry
from .distributed import gather, process_state
from .run import grouped

# An engine's real token-layers per second as a fraction of a padded dense forward's, measured
# with one thread on MiniLM (benchmarks/RESULTS.md, "Search speed"): fast 0.78 on BBC News
# (no padding), 2.44 x 1,067 real / 2,848 padded = 0.91 on tweets; reference 0.86-0.91.
THROUGHPUT = {"fast": 0.8, "reference": 0.85}
# The picker's bounds: never fewer calibration examples, never coarser neuron groups.
MIN_SAMPLES = 8
MAX_NEURON_GROUP = 128


def _rerun_layers(kind: str, layer: int, num_layers: int, engine: str) -> int:
    if engine == "reference":
        return num_layers
    # At least one: a candidate always pays its losses (MD Grams, KL) and the classifier.
    return max(1, num_layers - layer - (kind == "neuron"))


@dataclass
class ScoringCost:
    """Seconds of scoring as a function of (num_samples, neuron_group_size) on this machine.

    token_layer_s: seconds per padded token-layer of the timed dense forward.
    real_tokens[e]: real tokens of calibration example e, in the order examples are taken.
    units: each layer's own units of each kind scored ({"head": [12, 12, ...], "neuron": [1536, ...]},
    `layer_units`): a narrower layer of a ragged family (Swin's, a CNN's stages) runs fewer candidates.
    """

    token_layer_s: float
    real_tokens: list[int]
    batch_size: int
    num_layers: int
    units: dict[str, list[int]]
    engine: str

    def candidates(self, neuron_group_size: int) -> dict[str, list[int]]:
        """Candidates each layer runs of each kind, its neurons in groups of `neuron_group_size` (a layer's last may be partial)."""
        groups = {"neuron": neuron_group_size}
        return {kind: [grouped({kind: n}, groups)[kind] for n in counts] for kind, counts in self.units.items()}

    def num_candidates(self, neuron_group_size: int) -> int:
        return sum(sum(counts) for counts in self.candidates(neuron_group_size).values())

    def seconds(self, num_samples: int, neuron_group_size: int) -> float:
        layers = sum(
            count * _rerun_layers(kind, layer, self.num_layers, self.engine)
            for kind, counts in self.candidates(neuron_group_size).items()
            for layer, count in enumerate(counts)
        )
        if self.engine == "reference":  # batches padded to their longest example
            real = self.real_tokens[:num_samples]
            tokens = sum(len(real[i : i + self.batch_size]) * max(real[i : i + self.batch_size])
                         for i in range(0, len(real), self.batch_size))
        else:  # the fast engine packs text examples: it computes real tokens only
            tokens = sum(self.real_tokens[:num_samples])
        return tokens * layers * self.token_layer_s / THROUGHPUT[self.engine]


def layer_units(units: dict[str, int], geometry: Sequence[LayerGeometry]) -> dict[str, list[int]]:
    """Each layer's units of each kind that scoring runs: a criterion's `masked_units` (the widest
    layer's count) capped at the layer's own (`ArchAdapter.layer_geometry`), as the engine runs
    them: a narrower layer's padding runs nothing."""
    own = {"head": [g.heads for g in geometry], "neuron": [g.neurons for g in geometry]}
    return {kind: [min(count, n) for n in own[kind]] for kind, count in units.items()}


def _lengths(batches: list[dict[str, torch.Tensor]], tokens_per_image: int | None) -> tuple[list[int], int]:
    """(real tokens of every example, padded tokens in all)."""
    real, padded = [], 0
    for batch in batches:
        if "attention_mask" in batch:
            real += [int(t) for t in batch["attention_mask"].sum(-1)]
            padded += batch["attention_mask"].numel()
        else:
            real += [int(tokens_per_image)] * batch["pixel_values"].shape[0]
            padded += int(tokens_per_image) * batch["pixel_values"].shape[0]
    return real, padded


@torch.no_grad()
def time_dense(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of one dense forward over `batch` (after a one-example warm-up), the main process's on every
    process so that all of them pick the same setting."""
    device = next(model.parameters()).device
    process_state(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    model(**{k: v[:1] for k, v in batch.items()})
    start = time.perf_counter()
    model(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return float(gather([time.perf_counter() - start])[0])


def scoring_cost(
    dense_s: float, batches: list[dict[str, torch.Tensor]], tokens_per_image: int | None, batch_size: int,
    num_layers: int, units: dict[str, list[int]], engine: str,
) -> ScoringCost:
    """The cost model of scoring `units` (per layer, `layer_units`) on `batches`, from `dense_s`, one dense
    forward over the first of them."""
    real, _ = _lengths(batches, tokens_per_image)
    _, padded = _lengths(batches[:1], tokens_per_image)
    return ScoringCost(dense_s / max(padded * num_layers, 1), real, batch_size, num_layers, units, engine)


def scoring_ladder(num_samples: int, neuron_group_size: int, intermediate: int | None) -> list[tuple[int, int]]:
    """(num_samples, neuron_group_size) settings, finest first, never finer than asked.

    The rule: neurons coarsen first, by powers of two up to MAX_NEURON_GROUP (or one group a
    layer), keeping every calibration example: a neuron group is most of the candidates, and
    fewer examples make every score noisier. Then examples are dropped, one by one, down to
    MIN_SAMPLES. `intermediate=None`: neurons are not scored, only examples are dropped.
    """
    groups = [neuron_group_size]
    while intermediate is not None and groups[-1] < MAX_NEURON_GROUP and groups[-1] < intermediate:
        groups.append(min(1 << groups[-1].bit_length(), MAX_NEURON_GROUP))
    coarsest = groups[-1]
    fewest = min(num_samples, MIN_SAMPLES)
    return [(num_samples, g) for g in groups] + [(n, coarsest) for n in range(num_samples - 1, fewest - 1, -1)]


def pick_setting(ladder: list[tuple[int, int]], seconds, budget_s: float) -> tuple[int, int, float, bool]:
    """(num_samples, neuron_group_size, estimated seconds, fits): the first setting of `ladder`
    whose `seconds(num_samples, group)` fits `budget_s`, else the last (coarsest) one."""
    for samples, group in ladder:
        estimate = seconds(samples, group)
        if estimate <= budget_s:
            return samples, group, estimate, True
    samples, group = ladder[-1]
    return samples, group, seconds(samples, group), False


def format_seconds(seconds: float) -> str:
    """A rough duration: 0.4 s, 40 s, 25 min, 2.3 h."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class ScoringPlan:
    """What scoring will run and how long it should take; `budget_s` set: what the budget picked."""

    num_samples: int
    available_samples: int
    neuron_group_size: int | None  # None: neurons are not scored
    num_candidates: int
    estimated_s: float
    device: str
    budget_s: float | None = None
    fits: bool = True

    def __str__(self) -> str:
        about = f"{self.num_candidates} candidates, about {format_seconds(self.estimated_s)} on this machine ({self.device})"
        groups = "" if self.neuron_group_size is None else f", neurons in groups of {self.neuron_group_size}"
        if self.budget_s is None:
            return f"Scoring {self.num_samples} examples{groups}: {about}"
        if not self.fits:
            return f"Scoring budget {format_seconds(self.budget_s)} does not fit even the coarsest setting, " \
                   f"{self.num_samples} examples{groups}: {about}"
        return f"Scoring budget {format_seconds(self.budget_s)}: {self.num_samples} of {self.available_samples} " \
               f"examples{groups}: {about}"


def plan_scoring(cost: ScoringCost, neuron_group_size: int, budget_s: float | None, device: str) -> ScoringPlan:
    """The estimate of scoring every example at `neuron_group_size`, or, under `budget_s`, of the
    finest setting of `scoring_ladder` that fits it (the coarsest when none does)."""
    available = len(cost.real_tokens)
    neurons = max(cost.units["neuron"]) if cost.units.get("neuron") else None  # the widest layer's
    samples, group, fits = available, neuron_group_size, True
    if budget_s is None:
        estimate = cost.seconds(samples, group)
    else:
        ladder = scoring_ladder(available, neuron_group_size, neurons)
        samples, group, estimate, fits = pick_setting(ladder, cost.seconds, budget_s)
    return ScoringPlan(samples, available, None if neurons is None else group, cost.num_candidates(group),
                       estimate, device, budget_s, fits)
