"""How long scoring will take on this machine, and which calibration size and neuron grouping
fit a time budget.

One dense forward over the first calibration batch is timed (the cost grows with the tokens,
and timing all of them would take a good share of a short budget), each layer's part of it apart
(`time_dense`), and so are the losses each candidate pays (one MD Gram comparison, the KL). A
candidate then costs what it reruns over the examples' tokens, and its losses: for the fast
engine layers i..N-1 for a head of layer i and i+1..N-1 for a neuron (its own layer's FFN runs
once per layer, then a cheap correction), then the task head; for the reference engine the whole
model over the padded batches. Each layer is charged its own measured time, so the cheap late
stages of a ragged family (Swin's, a CNN's, SegFormer's, whose first stage holds 16 times the
tokens of its second) are not charged as its first; and only real candidates are counted: a layer
narrower than the widest runs its own units (`layer_units`), never the padding of the masks. Each
residual channel a ResNet's scoring cuts (`prune_channels`) is one more candidate, of the reference
engine's cost on either engine: the whole model with that channel zeroed (`channel_runs`).

A layer-streamed model (`engine.streaming`) reads each offloaded layer's weights for each forward
that runs it. The timed forward holds each such layer `resident` for its run, so its load is timed
apart from its compute; the load is then charged per forward that runs the layer (a reference
candidate's every batch; a fast-engine stack of candidates, `timed_variants`), not per candidate:
the timed forward's whole layer time, charged to every candidate, overstated a streamed run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter
from ..arch.base import LayerGeometry
from ..capture import scoring_forward
from ..data import image_size_of
from ..losses import bounded, kl_loss, later_layers, md_loss
from .fast import stacked_variants
from .run import engine_for, gather, grouped, precision, process_state
from .streaming import is_streamed, resident

# An engine's real token-layers per second as a fraction of a padded dense forward's, measured
# with one thread on MiniLM (benchmarks/RESULTS.md, "Search speed"): fast 0.78 on BBC News
# (no padding), 2.44 x 1,067 real / 2,848 padded = 0.91 on tweets; reference 0.86-0.91.
THROUGHPUT = {"fast": 0.8, "reference": 0.85}
# The picker's bounds: never fewer calibration examples, never coarser neuron groups.
MIN_SAMPLES = 8
MAX_NEURON_GROUP = 128
# A dense forward shorter than this is timed again (up to TIMED_RUNS times, the median run kept): one
# run of a small model takes milliseconds, which a busy machine's scheduler can double.
MIN_TIMED_S = 0.05
TIMED_RUNS = 5


@dataclass
class DenseTiming:
    """One timed dense forward over a batch of `examples` examples and `tokens` padded tokens (an image's
    tokens are its first stage's): `seconds` in all, `layers[j]` of them in layer j, `before` before the
    first layer (the embeddings; the rest, after the last layer, is the task head). `positions[j]`: the
    positions per example of layer j's output (a later stage's smaller map; None where unknown). `md_s`:
    one MD comparison of `md_rows` rows of `md_width` features; `kl_s`: the KL of the batch's outputs.
    `loads[j]`: of the forward's time, what bringing layer j's offloaded weights in and dropping them took
    (layer-streamed, `engine.streaming`; empty: every layer held in memory), apart from `layers[j]`, its compute."""

    seconds: float
    layers: list[float]
    before: float
    examples: int
    tokens: int
    positions: list[int | None] | None = None
    md_s: float = 0.0
    md_rows: int = 1
    md_width: int = 1
    kl_s: float = 0.0
    loads: list[float] = field(default_factory=list)

    @classmethod
    def uniform(cls, seconds: float, num_layers: int, examples: int, tokens: int) -> DenseTiming:
        """A forward of `seconds` spent evenly over its layers, with no embedding, head or loss cost."""
        return cls(seconds, [seconds / num_layers] * num_layers, 0.0, examples, tokens)

    @property
    def after(self) -> float:
        return max(self.seconds - self.before - sum(self.layers) - sum(self.loads), 0.0)


@dataclass
class ScoringCost:
    """Seconds of scoring as a function of (num_samples, neuron_group_size) on this machine.

    token_layer_s[j]: seconds per padded token in layer j of the timed dense forward; token_before_s: per
    padded token before the first layer; example_after_s: per example after the last (the task head).
    md_s: seconds of one MD comparison per squared row per feature; example_kl_s: seconds of the KL per
    example. real_tokens[e]: real tokens of calibration example e, in the order examples are taken.
    positions[j]: an image's positions in layer j, which bound the MD rows there (a Swin's, a CNN's or a
    SegFormer's later stage holds fewer); None for text, whose every layer holds the real tokens.
    units: each layer's own units of each kind scored ({"head": [12, 12, ...], "neuron": [1536, ...]},
    `layer_units`): a narrower layer of a ragged family (Swin's, a CNN's stages) runs fewer candidates.
    widths[j]: the features of layer j that MD compares; md_tokens: the rows it compares at most.
    channels: (first layer that reads it, width) of each residual channel group scored (`prune_channels`): each of
    its channels is one masked run of the whole model over the padded batches, as a reference-engine candidate,
    judged from that layer on (`importance.residual_channels`), whatever the engine and the neuron grouping.
    layer_load_s[j]: seconds to bring layer j's offloaded weights in and drop them (layer-streamed; empty: none
    offloaded), paid once per forward that runs the layer, whatever its tokens: a reference candidate's every
    batch, a fast-engine stack of `variants` candidates of one layer (`run.chunks`) per forward over a batch.
    """

    token_layer_s: list[float]
    token_before_s: float
    example_after_s: float
    md_s: float
    example_kl_s: float
    real_tokens: list[int]
    batch_size: int
    units: dict[str, list[int]]
    engine: str
    widths: list[int]
    md_tokens: int
    positions: list[int] | None = None
    channels: list[tuple[int, int]] = field(default_factory=list)
    layer_load_s: list[float] = field(default_factory=list)
    variants: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.token_layer_s)

    def candidates(self, neuron_group_size: int) -> dict[str, list[int]]:
        """Candidates each layer runs of each kind, its neurons in groups of `neuron_group_size` (a layer's last may be partial)."""
        groups = {"neuron": neuron_group_size}
        return {kind: [grouped({kind: n}, groups)[kind] for n in counts] for kind, counts in self.units.items()}

    def num_candidates(self, neuron_group_size: int) -> int:
        """Masked runs of every kind: each layer's heads and neuron groups, and every residual channel."""
        units = sum(sum(counts) for counts in self.candidates(neuron_group_size).values())
        return units + sum(width for _, width in self.channels)

    def seconds(self, num_samples: int, neuron_group_size: int) -> float:
        real = self.real_tokens[:num_samples]
        # a reference run's batches are padded to their longest example; the fast engine packs text examples: it
        # computes real tokens only
        padded = sum(len(real[i : i + self.batch_size]) * max(real[i : i + self.batch_size])
                     for i in range(0, len(real), self.batch_size))
        tokens = padded if self.engine == "reference" else sum(real)
        rows = min(self.md_tokens, sum(real))
        # MD at layer j: its rows (as many distinct positions as the layer holds at most) squared, times its features
        md = [self.md_s * width * min(rows, len(real) * self.positions[j] if self.positions else rows) ** 2
              for j, width in enumerate(self.widths)]
        batches = -(-len(real) // self.batch_size)
        loads = self.layer_load_s or [0.0] * self.num_layers
        total = 0.0
        for kind, counts in self.candidates(neuron_group_size).items():
            for layer, count in enumerate(counts):
                if self.engine == "reference":  # the whole model, embeddings included
                    forward = tokens * (self.token_before_s + sum(self.token_layer_s))
                    streamed = count * batches * sum(loads)
                else:
                    forward = tokens * sum(self.token_layer_s[layer + (kind == "neuron"):])
                    # a stack holds its own layer (a neuron's twice: its down projection read, then its finish), then
                    # runs each later one
                    held = sum(loads[layer:]) + (loads[layer] if kind == "neuron" else 0.0)
                    streamed = -(-count // self.variants) * batches * held
                forward += len(real) * self.example_after_s
                losses = sum(md[z] for z in later_layers(layer, self.num_layers))
                total += count * (forward / THROUGHPUT[self.engine] + losses + len(real) * self.example_kl_s) + streamed
        whole = padded * (self.token_before_s + sum(self.token_layer_s)) + len(real) * self.example_after_s
        for first, width in self.channels:  # the layer before the first reader: MD from the first reader on
            losses = sum(md[z] for z in later_layers(first - 1, self.num_layers))
            total += width * (whole / THROUGHPUT["reference"] + losses + len(real) * self.example_kl_s)
        return total


def layer_units(units: dict[str, int], geometry: Sequence[LayerGeometry]) -> dict[str, list[int]]:
    """Each layer's units of each kind that scoring runs: a criterion's `masked_units` (the widest
    layer's count) capped at the layer's own (`ArchAdapter.layer_geometry`), as the engine runs
    them: a narrower layer's padding runs nothing."""
    own = {"head": [g.heads for g in geometry], "neuron": [g.neurons for g in geometry]}
    return {kind: [min(count, n) for n in own[kind]] for kind, count in units.items()}


def token_counts(batches: list[dict[str, torch.Tensor]], tokens_per_image: int | None) -> tuple[list[int], int]:
    """(real tokens of every example, padded tokens in all); an image holds `tokens_per_image`."""
    real, padded = [], 0
    for batch in batches:
        if "attention_mask" in batch:
            real += [int(t) for t in batch["attention_mask"].sum(-1)]
            padded += batch["attention_mask"].numel()
        else:
            real += [int(tokens_per_image)] * batch["pixel_values"].shape[0]
            padded += int(tokens_per_image) * batch["pixel_values"].shape[0]
    return real, padded


def _clock(device: torch.device) -> float:
    """Now, after the device has finished what it was given (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_s(run, device: torch.device) -> float:
    """Median seconds of `run()` after a warm-up, over at least 3 runs, more (up to TIMED_RUNS) while they add up
    to less than MIN_TIMED_S: a loss that takes a millisecond is paid by every candidate."""
    run()
    seconds: list[float] = []
    while len(seconds) < 3 or (sum(seconds) < MIN_TIMED_S and len(seconds) < TIMED_RUNS):
        start = _clock(device)
        run()
        seconds.append(_clock(device) - start)
    return sorted(seconds)[len(seconds) // 2]


@torch.no_grad()
def time_dense(
    model: nn.Module, adapter: ArchAdapter, batch: dict[str, torch.Tensor], tokens_per_image: int | None,
    md_rows: int, widths: Sequence[int], temperature: float,
) -> DenseTiming:
    """One dense forward over `batch` (after a one-example warm-up; repeated while short, the median run
    kept), timed in all and in each of `adapter`'s layers (whose outputs have `widths[j]` features), and
    the losses a candidate pays on it: one MD comparison of `md_rows` rows of the widest layer's
    features, the KL of its outputs. The main process's timings on every process, so that all of them
    pick the same setting."""
    device = next(model.parameters()).device
    process_state(device)
    layers = adapter.layers_of(model)
    scoring_forward(model, {k: v[:1] for k, v in batch.items()})
    marks: list[float] = []  # each layer's start, weights held, compute done and end, in the order they run
    sizes: list[int | None] = []  # the elements of each layer's output
    holding = ExitStack()  # an offloaded layer's weights, held `resident` for its forward: the load timed apart
    # only an offloaded model (weights on the meta device) has layers to hold: others never enter `streaming`
    offloaded = any(p.is_meta for p in model.parameters())
    streamed = {id(layer) for layer in layers if is_streamed(layer)} if offloaded else set()

    def started(module: nn.Module, args) -> None:
        marks.append(_clock(device))
        if id(module) in streamed:
            holding.enter_context(resident(module))
        marks.append(_clock(device))

    def finished(module: nn.Module, args, output) -> None:
        marks.append(_clock(device))
        first = output if torch.is_tensor(output) else output[0] if isinstance(output, (tuple, list)) else None
        sizes.append(first.numel() if torch.is_tensor(first) else None)
        holding.close()
        marks.append(_clock(device))

    handles = [hook for layer in layers for hook in (layer.register_forward_pre_hook(started), layer.register_forward_hook(finished))]
    runs: list[tuple[float, list[float], float]] = []
    try:
        while not runs or (sum(end - start for start, _, end in runs) < MIN_TIMED_S and len(runs) < TIMED_RUNS):
            marks.clear()
            sizes.clear()
            start = _clock(device)
            output = scoring_forward(model, batch)
            runs.append((start, list(marks), _clock(device)))
    finally:
        holding.close()
        for handle in handles:
            handle.remove()
    start, marks, end = sorted(runs, key=lambda run: run[2] - run[0])[len(runs) // 2]
    _, padded = token_counts([batch], tokens_per_image)
    examples = next(iter(batch.values())).shape[0]
    if len(marks) == 4 * len(layers):
        positions = [None if size is None else size // (examples * width) for size, width in zip(sizes, widths)]
        begun, held, done, ended = marks[::4], marks[1::4], marks[2::4], marks[3::4]
        loads = [(b - a) + (d - c) if id(layer) in streamed else 0.0 for layer, a, b, c, d in zip(layers, begun, held, done, ended)]
        timing = DenseTiming(end - start, [d - a - load for a, d, load in zip(begun, ended, loads)], marks[0] - start, examples,
                             padded, positions, loads=loads if streamed else [])
    else:  # a layer ran more than once, or not at all: its share is unknown, every layer gets an even one
        timing = DenseTiming.uniform(end - start, len(layers), examples, padded)

    md_width = max(widths)
    rows = torch.randn(md_rows, md_width, device=device)
    gram = rows @ rows.T
    timing.md_s, timing.md_rows, timing.md_width = _median_s(lambda: float(md_loss(gram, rows)), device), md_rows, md_width
    dense = bounded(adapter.kl_outputs(output, batch))
    timing.kl_s = _median_s(lambda: float(kl_loss([dense], [adapter.kl_outputs(output, batch)], temperature)), device)

    values = [timing.seconds, timing.before, timing.md_s, timing.kl_s, *timing.layers, *timing.loads]
    seconds, before, timing.md_s, timing.kl_s, *per_layer = gather(values)[: len(values)]
    timing.seconds, timing.before = seconds, before
    timing.layers, timing.loads = per_layer[: len(timing.layers)], per_layer[len(timing.layers) :]
    return timing


def scoring_cost(
    timing: DenseTiming, batches: list[dict[str, torch.Tensor]], tokens_per_image: int | None, batch_size: int,
    units: dict[str, list[int]], engine: str, widths: Sequence[int], md_tokens: int,
    channels: Sequence[tuple[int, int]] = (), variants: int = 1,
) -> ScoringCost:
    """The cost model of scoring `units` (per layer, `layer_units`) and the residual `channels` ((first reader, width)
    per group, `channel_runs`) on `batches`, from `timing`, one dense forward over the first of them; MD compares
    `widths[j]` features of layer j on at most `md_tokens` rows. `variants`: the fast engine's candidates per stacked
    forward (`timed_variants`), over which a streamed layer's load is shared."""
    real, _ = token_counts(batches, tokens_per_image)
    tokens, examples = max(timing.tokens, 1), max(timing.examples, 1)
    md_s = timing.md_s / (timing.md_rows**2 * timing.md_width)
    known = tokens_per_image is not None and timing.positions is not None and None not in timing.positions
    return ScoringCost(
        [s / tokens for s in timing.layers], timing.before / tokens, timing.after / examples, md_s, timing.kl_s / examples,
        real, batch_size, units, engine, list(widths), md_tokens, list(timing.positions) if known else None, list(channels),
        list(timing.loads), variants,
    )


def timed_variants(model: nn.Module, adapter: ArchAdapter, timing: DenseTiming, config) -> int:
    """The candidates the fast engine stacks in one forward (`FastRunner.variants`): `config.variants_per_batch`, or
    what fits the device (`fast.stacked_variants`), for a batch shaped like the timed one."""
    if config.variants_per_batch:
        return config.variants_per_batch
    examples = max(timing.examples, 1)
    tokens = max(timing.tokens // examples, 1)
    return stacked_variants(adapter, model.config, examples, tokens, config.md_tokens, next(model.parameters()).device)


def channel_runs(model: nn.Module, adapter: ArchAdapter, config) -> list[tuple[int, int]]:
    """(first layer that reads it, width) of each residual channel group that scoring runs a masked run per channel
    of: every group under `config.prune_channels` (resolved: the pruner's), none otherwise. A criterion that plans its
    scoring (`masked_units`: OPTIN) scores channels by such runs (`importance.residual_channels`)."""
    if not config.prune_channels:
        return []
    carriers = adapter.channel_carriers(model)
    return [(first, width) for (_, first), width in zip(carriers, adapter.channel_widths(model.config))]


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


def plan_model_scoring(
    model: nn.Module, adapter: ArchAdapter, units: dict[str, int], batches: list[dict[str, torch.Tensor]], config
) -> tuple[ScoringPlan, DenseTiming]:
    """The plan of scoring the masked `units` of `model` ({"head": 12, ...}, `ImportanceCriterion.masked_units`), and its
    residual channels under `config.prune_channels` (`channel_runs`), on `batches` with `config`'s engine, precision,
    neuron grouping and `max_scoring_time`, and the timed dense forward over the first batch it is estimated from; the
    main process says it (each process would say the same)."""
    device = next(model.parameters()).device
    geometry = adapter.layer_geometry(model.config)
    widths = [g.hidden for g in geometry]  # the features MD compares
    tokens = adapter.default_seq_len(model.config, image_size_of(batches))  # per image, at the size scoring runs
    md_rows = min(config.md_tokens, sum(token_counts(batches, tokens)[0]))
    with precision(device, getattr(torch, config.dtype)):
        timing = time_dense(model, adapter, batches[0], tokens, md_rows, widths, config.temperature)
    variants = timed_variants(model, adapter, timing, config) if timing.loads else 1  # only loads are shared by a stack
    cost = scoring_cost(timing, batches, tokens, config.batch_size, layer_units(units, geometry),
                        engine_for(model, adapter, config), widths, config.md_tokens, channel_runs(model, adapter, config),
                        variants=variants)
    plan = plan_scoring(cost, config.neuron_group_size, config.max_scoring_time, device.type)
    if process_state(device).is_main_process:
        tqdm.write(str(plan), file=sys.stderr)
    return plan, timing
