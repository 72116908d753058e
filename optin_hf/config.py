"""`OptinConfig`: every setting of one pruning run, serialisable as `optin_config.json`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .criteria import CRITERIA

CONFIG_NAME = "optin_config.json"
ENGINES = ("fast", "reference")
DTYPES = ("float32", "bfloat16", "float16")
RECONSTRUCT_MODES = ("auto", "weights", "scales", "batchnorm", "none")
SELECTIONS = ("scores", "refit")  # which units a layer drops, given how many (`selection`)
ALLOCATIONS = ("auto", "scores", "refit", "fluctuation")  # how many units each layer keeps (`allocation`)
SCALE_RANGE = (1e-100, 1e100)  # temperature, lambda_contribution: their float64 products stay finite
INT64 = 2**63  # integer settings reach torch (seeds, sizes, counts) as int64


@dataclass
class OptinConfig:
    """Settings of an OPTIN pruning run.

    `mac_constraint` is the fraction of the base MACs to keep (0.6 = a 40% FLOPs cut), as in
    the paper. `faithful=False` scores as the paper states, MD + balanced KL; `faithful=True`
    adds the reference code's undocumented extra weights (a prior on the unit's index within
    its layer, last-layer and head decays), to reproduce the reference's numbers.
    `neuron_group_size=g` scores FFN neurons g at a time (1 = each alone, as the paper), each
    group g neurons of like output energy: g times fewer masked runs for a coarser ranking.
    `neurons_multiple_of=8` makes every layer keep a multiple of 8 neurons (or all): matmul
    kernels run such widths much faster per column, so the slim model's speed follows its MACs;
    1 keeps the exact best neurons.
    `prune_channels=True` (ResNet) also prunes each stage's residual width: a channel tied by the residual adds
    (the block outputs, the shortcut convs, the next stage's input; the stem's with the first stage's) goes in
    every one of them at once, scored by the masked run that zeroes it in them all (`optin_hf.channel_search`).
    `prune_channels=None` (the default) does so where the family has them and the other settings allow it
    (`channel_search.channels_by_default`), and `reconstruct="auto"` then runs the refit; False never does.
    `uniform_layers=True` makes every layer keep the same number of heads (KV groups) and FFN neurons,
    the best common counts under the budget: a decoder LLM's slim checkpoint is then its family's
    standard config, which plain transformers (and serving engines with no per-layer sizes) load.
    `seq_len=None` counts MACs at the calibration data's average unpadded length; `image_size=None` counts
    a vision model's at the calibration images' [height, width] (the saved config records it).
    `base_model_*` name the dense model that was pruned (Hub id, commit sha, transformers class), so a
    masks-only repo can rebuild it; `push_to_hub` fills them in, a value set here overrides what it detects.
    A masks-only save over a base in a local folder records `base_model_fingerprint`, the sha256 of its
    weights (`checkpoint.weights_fingerprint`), which the load checks.
    `engine="fast"` gives the reference loop's scores faster; `variants_per_batch=None` sizes its
    stacked forwards from free memory. `checkpoint_dir` makes scoring resumable.
    `max_scoring_time` (seconds): before scoring, one dense forward is timed and the calibration
    size and neuron grouping are lowered (never raised) until the estimated scoring time fits:
    neurons coarsen first (powers of two up to 128), then examples are dropped (down to 8).

    `reconstruct="auto"` (the default) repairs with the strongest repair the model's family declares
    (`Capabilities.repairs`, in order of preference; with `prune_steps > 1`, the strongest refit), so one
    config prunes and repairs every supported model; the pruner records the repair it used in its config
    (and so in the saved `optin_config.json`).
    `reconstruct="weights"` refits each sublayer's output projection after slimming, by ridge
    least squares on `reconstruct_samples` calibration examples, so that the slim model rebuilds
    the dense model's sums (`optin_hf.reconstruct`); "scales" fits one factor per kept unit
    (PTF's mask tuning); "batchnorm" (CNNs with BatchNorm: ResNet) re-estimates the BatchNorm
    running means of the slim model instead; "none" keeps the base weights of the kept units.
    `reconstruct_inputs=True` makes the weights refit fit each sublayer's input projections first (query, key and
    value; the FFN's up and gate, at the units kept), from the slim model's own input of each to the dense model's
    output of the same rows, so the drift that earlier layers' pruning left in the stream is corrected where it enters
    the sublayer too (families that declare it: `Capabilities.inputs`; a larger artifact, a longer refit).
    `reconstruct_readers=True` (families that declare it: `Capabilities.readers`, ResNet) makes it refit each block's
    reduce conv and projection shortcut (from the slim block's own input) and the classifier (from the pooled features)
    as well, also where the residual widths are kept (the consumer refit of cut widths refits them anyway).
    `prune_steps=k` makes the search see the repair: each step removes 1/k of the MAC cut,
    reconstructs, and re-scores the remaining units on the repaired model (k scoring runs).
    `selection` says which units each layer drops, the allocation having said how many: "scores" (the default)
    the worst-scored; "refit" those whose removal the refit repairs best, chosen greedily by the error left
    after refitting the rest (the OBS / Schur-complement update on the dense model's calibration Grams,
    `optin_hf.refit_selection`). "refit" needs a refit repair (`reconstruct="weights"` or "scales"; "auto"
    then picks one) and applies to masks the pruner allocates, not to masks given to `prune_model`.
    `allocation` says how many units each layer keeps: "auto" (the default) the family's own
    (`Capabilities.allocation`: "fluctuation" for the Llama family's decoders, "refit" for ConvNeXt, SegFormer and ViT
    models of at most 8 layers whose repair is a refit, "scores" elsewhere, and "scores" wherever the settings rule a
    per-layer allocation out, the layers are offloaded or no data is given to measure on:
    `auto_settings.auto_allocation`); "scores" the budget search over the importance scores; "refit" by the loss left
    after the refit, each layer's heads and neurons cut alone to a few depths, refit and measured on the calibration
    data (`optin_hf.refit_allocation`: layers x kinds x 4 slim-and-refit runs, for small models whose refit repairs
    some layers far better than others).
    "fluctuation" keeps the heads of the uniform search's split in every layer and spreads the neurons that leaves
    over layers by FLAP's standardized fluctuation, each layer within `allocation_band` x its width of the uniform
    count, the shape read at 0.8 of the MACs and scaled to the budget (`optin_hf.fluctuation_allocation`: one dense
    pass over the scoring's windows; models whose layers have equal widths).
    `allocation_rounds=k` runs that measurement k times down a ladder of budgets, each round's cuts measured
    from the counts the previous round left, so cuts that interact are priced together (k times the cost).

    `prune_tokens=True` is the reference's vision "tau" mode: heads and neurons take
    `token_cut_share` of the MAC cut and a per-layer token schedule (run by token merging)
    takes the rest; False is its `beta_config_only` (parameters alone). Token scores are
    (MD x geomspace(1, `max_patch_envelope`, layers)[l] + balanced KL) x `patch_metric_decay`,
    x0.5 in the last layer. `token_cut_share=None` draws the share uniformly in [0.15, 0.30]
    with `seed`, as the reference does.

    Every field's type and range is checked when the config is built, from Python, JSON or a YAML
    recipe alike: a string is never read as a bool or a number, a bool is not an int, an int is a
    float, NaN and infinity are refused, and None is taken only by the fields typed `| None`.
    `importance="auto"` (the default) chooses the recipe: optin, magnitude and fisher, each with the repair
    `reconstruct="auto"` resolves for it (`optin_hf.auto_settings`) and without one, prune copies of the model, and
    the one whose pruned model stays closest to the dense model on held-out calibration examples is kept (`optin_hf.recipe_search`), since no single recipe is best on every model.
    The pruner's config then names the criterion and repair chosen, with the search's record in `extra`, so the saved
    config says what pruned the model. Any other value names a registered criterion
    (`optin_hf.criteria`), checked without importing it, and is used as named ("optin": the paper's).
    The search has no default time budget (`importance_options={"max_search_time": S}` sets one): a clock would make
    one config choose differently on a faster machine, and the search costs a bounded multiple of naming OPTIN (one
    scoring per criterion, OPTIN's masked runs the bulk of them, then a prune, refit and held-out forward per candidate).
    `importance_options` sets that criterion's own settings (its dataclass fields that are not OptinConfig
    fields), so a criterion with a setting of its own needs no new OptinConfig field or CLI flag; they are
    checked against the criterion's fields when the config is built (importing the criterion only then).
    """

    mac_constraint: float = 0.6
    prune_heads: bool = True
    prune_neurons: bool = True
    prune_channels: bool | None = None
    num_samples: int = 128
    batch_size: int = 32
    max_length: int = 128
    temperature: float = 4.0
    lambda_contribution: float = 10.0
    md_tokens: int = 768
    neuron_group_size: int = 1
    neurons_multiple_of: int = 8
    uniform_layers: bool = False
    faithful: bool = False
    importance: str = "auto"
    importance_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seq_len: float | None = None
    image_size: list[int] | None = None
    engine: str = "fast"
    variants_per_batch: int | None = None
    dtype: str = "float32"
    checkpoint_dir: str | None = None
    max_scoring_time: float | None = None
    prune_tokens: bool = False
    max_patch_envelope: float = 100.0
    patch_metric_decay: float = 1.0
    token_cut_share: float | None = None
    reconstruct: str = "auto"
    reconstruct_samples: int = 256
    reconstruct_ridge: float = 1e-3
    reconstruct_inputs: bool = False
    reconstruct_readers: bool = False
    prune_steps: int = 1
    selection: str = "scores"
    allocation: str = "auto"
    allocation_rounds: int = 1
    allocation_band: float = 0.2
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_model_class: str | None = None
    base_model_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (int, tuple)) and not isinstance(self.image_size, bool):  # one side, or (h, w)
            self.image_size = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
        check_field_types(self)
        if not 0.0 < self.mac_constraint <= 1.0:
            raise ValueError(
                f"mac_constraint={self.mac_constraint} is outside (0, 1]: it is the fraction of the base "
                "MACs to keep, e.g. 0.6 for a 40% FLOPs reduction."
            )
        if not (self.prune_heads or self.prune_neurons):
            raise ValueError("prune_heads and prune_neurons are both False: nothing would be pruned; enable one.")
        if self.prune_channels and (self.prune_tokens or self.uniform_layers or self.prune_steps > 1):
            raise ValueError(
                "prune_channels=True prunes residual widths in one step, which token mode, uniform_layers and prune_steps "
                "do not: set prune_channels=False, or prune_tokens=False, uniform_layers=False and prune_steps=1."
            )
        for name in ("num_samples", "batch_size", "max_length", "md_tokens", "neuron_group_size", "neurons_multiple_of", "reconstruct_samples", "prune_steps", "allocation_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.temperature <= 0 or self.lambda_contribution <= 0:
            raise ValueError("temperature and lambda_contribution must be positive.")
        # Scoring multiplies KL by temperature² and by a power of ten near 1 / lambda_contribution, in float64:
        # beyond these bounds they overflow (an OverflowError in the middle of scoring).
        for name in ("temperature", "lambda_contribution"):
            if not SCALE_RANGE[0] <= getattr(self, name) <= SCALE_RANGE[1]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is outside [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]: the scores it "
                    "scales would overflow float64 (the defaults: temperature=4.0, lambda_contribution=10.0)."
                )
        if self.importance not in CRITERIA:
            raise ValueError(
                f"importance={self.importance!r} is unknown; choose one of {sorted(CRITERIA)} "
                "(or register your own with optin_hf.register_criterion)."
            )
        if self.importance_options:
            self.importance_options = checked_options(self.importance, self.importance_options)
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is unknown; choose one of {list(ENGINES)}.")
        if self.variants_per_batch is not None and self.variants_per_batch < 1:
            raise ValueError(f"variants_per_batch={self.variants_per_batch} must be a positive integer (or None: automatic).")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; choose one of {list(DTYPES)} (half precision is meant for GPUs).")
        if self.max_scoring_time is not None and not self.max_scoring_time > 0:
            raise ValueError(f"max_scoring_time={self.max_scoring_time!r} must be a positive number of seconds (or None: no budget).")
        if self.max_patch_envelope <= 0 or self.patch_metric_decay <= 0:
            raise ValueError("max_patch_envelope and patch_metric_decay must be positive.")
        if self.token_cut_share is not None and not 0.0 <= self.token_cut_share <= 1.0:
            raise ValueError(
                f"token_cut_share={self.token_cut_share} is outside [0, 1]: it is the share of the MAC cut that "
                "heads and neurons take in token mode (None = a seeded draw in [0.15, 0.30])."
            )
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise ValueError(f"reconstruct={self.reconstruct!r} is unknown; choose one of {list(RECONSTRUCT_MODES)}.")
        if self.prune_steps > 1 and self.prune_tokens:
            raise ValueError(f"prune_steps={self.prune_steps} is for heads and neurons; token mode (prune_tokens=True) prunes in one step.")
        if self.reconstruct_inputs and self.reconstruct not in ("auto", "weights"):
            raise ValueError(f"reconstruct_inputs=True refits input projections within the weights refit, which "
                             f"reconstruct={self.reconstruct!r} does not run: set reconstruct='weights' (or 'auto'), or "
                             "reconstruct_inputs=False.")
        if self.reconstruct_readers and self.reconstruct not in ("auto", "weights"):
            raise ValueError(f"reconstruct_readers=True refits convs within the weights refit, which reconstruct="
                             f"{self.reconstruct!r} does not run: set reconstruct='weights', or reconstruct_readers=False.")
        if self.reconstruct_inputs and self.prune_tokens:
            raise ValueError("reconstruct_inputs=True pairs each input projection's rows in the slim and the dense model, "
                             "which token mode's merges make differ: set reconstruct_inputs=False, or prune_tokens=False.")
        if self.prune_steps > 1 and self.reconstruct == "batchnorm":
            raise ValueError(f"prune_steps={self.prune_steps} re-scores a refit model between steps, which reconstruct='batchnorm' does not give: set prune_steps=1.")
        if self.prune_steps > 1 and self.reconstruct == "none":
            raise ValueError(f"prune_steps={self.prune_steps} re-scores a reconstructed model between steps: set reconstruct='weights' (or 'scales'), or prune_steps=1.")
        for name, choices, what in (("selection", SELECTIONS, "chooses units"), ("allocation", ALLOCATIONS, "counts units")):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r} is unknown; choose one of {list(choices)}.")
            if value == "refit" and self.reconstruct in ("batchnorm", "none"):
                raise ValueError(
                    f"{name}='refit' {what} by the loss left after the refit, which reconstruct={self.reconstruct!r} does not "
                    f"run: set reconstruct='weights' (or 'scales', or 'auto'), or {name}='scores'."
                )
        if not (math.isfinite(self.allocation_band) and self.allocation_band >= 0.0):
            raise ValueError(f"allocation_band={self.allocation_band} must be a finite fraction >= 0 of a layer's neurons.")
        if self.allocation_band != type(self).allocation_band and self.allocation != "fluctuation":
            raise ValueError(f"allocation_band={self.allocation_band} bounds the fluctuation allocation's counts: set "
                             f"allocation='fluctuation', or leave allocation_band at {type(self).allocation_band}.")
        if self.allocation_rounds > 1 and self.allocation != "refit":
            raise ValueError(f"allocation_rounds={self.allocation_rounds} repeats the refit allocation's measurement: set "
                             "allocation='refit', or allocation_rounds=1.")
        if self.allocation not in ("auto", "scores") and not self.counts_per_layer():
            raise ValueError(
                f"allocation={self.allocation!r} counts heads and neurons per layer in one step, which prune_tokens, "
                "uniform_layers, prune_steps > 1 and prune_channels do not: set allocation='scores', or turn those off."
            )
        if not (math.isfinite(self.reconstruct_ridge) and self.reconstruct_ridge >= 0.0):
            raise ValueError(f"reconstruct_ridge={self.reconstruct_ridge} must be a finite number >= 0 (relative to the Gram's mean diagonal).")
        if self.reconstruct_ridge == 0.0 and self.selection == "refit":
            raise ValueError("selection='refit' inverts each sublayer's Gram matrix, which reconstruct_ridge=0 leaves singular "
                             "wherever a unit never varies on the calibration data: set reconstruct_ridge > 0 (the default "
                             "is 1e-3), or selection='scores'.")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len={self.seq_len} must be positive (or None to measure it on the data).")
        if self.image_size is not None and (
            len(self.image_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.image_size)
        ):
            raise ValueError(f"image_size={self.image_size!r} must be [height, width], two positive integers (or None: the calibration images').")

    def counts_per_layer(self) -> bool:
        """Whether a per-layer allocation ("refit", "fluctuation") can count this config's units: one step, with no
        token mode, uniform layers or residual channels (`allocation="auto"` is "scores" otherwise)."""
        return not (self.prune_tokens or self.uniform_layers or self.prune_steps > 1 or self.prune_channels)

    def resolved_token_cut_share(self) -> float:
        """The heads-and-neurons share of the MAC cut in token mode: the given one, or a seeded draw."""
        if self.token_cut_share is not None:
            return float(self.token_cut_share)
        generator = torch.Generator().manual_seed(self.seed)
        return 0.15 + 0.15 * float(torch.rand((), generator=generator, dtype=torch.float64))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "OptinConfig":
        if not isinstance(values, dict):  # a JSON list or null would fail as "argument after ** must be a mapping"
            raise ValueError(f"OptinConfig settings must be a mapping of field names to values, not {_a(type(values).__name__)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown OptinConfig keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "OptinConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is it a folder written by OptinPruner.save?")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err} Re-save or re-download the checkpoint.") from err


PATH_FIELDS = {"checkpoint_dir"}  # str fields that also take an os.PathLike, and never ""
EXPECTED = {
    bool: "a bool (true or false)", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping",
    Path: "a path (a non-empty string)",
}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(instance: Any) -> None:
    """Check every field of the dataclass `instance` against its type hint, normalising it in place
    (an int given for a float becomes a float, a path string a Path), or raise `checked_type`'s
    ValueError. One check for every settings class (`OptinConfig`, recipes, data specs, reports),
    so that none reads `"false"` as True or a list as a name."""
    hints = _field_types(type(instance))
    for f in dataclasses.fields(instance):
        object.__setattr__(instance, f.name, checked_type(f.name, getattr(instance, f.name), hints[f.name]))  # frozen too


def checked_type(name: str, value: Any, hint: Any) -> Any:
    """`value` as field `name`'s type (`hint`: one of EXPECTED's types, another class, or it | None), or
    a ValueError naming the field, the value and the type. A bool is not a number here, and an int
    is a float; no string is parsed: `faithful="false"` would otherwise read as True."""
    optional = type(None) in typing.get_args(hint)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    kind = typing.get_origin(kind) or kind
    if value is None and optional:
        return None
    if isinstance(value, bool):
        ok = kind is bool
    elif kind is int:
        ok = isinstance(value, numbers.Integral)
        value = int(value) if ok else value
        if ok and not -INT64 <= value < INT64:  # else torch fails deep inside ("Overflow when unpacking long long")
            raise ValueError(f"{name}={value} does not fit in 64 bits (at most {INT64 - 1}).")
    elif kind is float:
        ok = isinstance(value, numbers.Real) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is Path or (kind is str and name in PATH_FIELDS):
        # Path("") is the current folder: an empty value must not aim a run's writes there.
        ok = isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""
        value = (Path(value) if kind is Path else os.fspath(value)) if ok else value
        kind = Path  # its message
    else:
        ok = isinstance(value, kind)
    if ok:
        return value
    expected = EXPECTED.get(kind, _a(kind.__name__)) + (" or None" if optional else "")
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be {expected}.")
    if kind is Path and value == "":
        raise ValueError(f"{name}='' is an empty path; expected {expected}.")
    advice = ""
    if isinstance(value, str) and kind is bool:
        advice = " Write it unquoted: true or false."
    elif isinstance(value, str) and kind in (int, float):
        advice = " Write it unquoted (in YAML an exponent needs a dot: 1.0e-3, not 1e-3)."
    raise ValueError(f"{name}={value!r} is {_a(type(value).__name__)}; expected {expected}.{advice}")


def criterion_options(criterion: type) -> dict[str, Any]:
    """A criterion class's own settings, name -> type hint: its dataclass fields that OptinConfig does not
    have (those it shares, like `seed`, come from the config). A criterion that is no dataclass has none."""
    if not dataclasses.is_dataclass(criterion):
        return {}
    shared = {f.name for f in dataclasses.fields(OptinConfig)}
    hints = typing.get_type_hints(criterion)
    return {f.name: hints[f.name] for f in dataclasses.fields(criterion) if f.name not in shared}


def checked_options(importance: str, options: dict[str, Any], criterion: type | None = None) -> dict[str, Any]:
    """`options` checked against the own settings of `criterion` (default: the one registered as `importance`) (normalised as `checked_type` does), or
    a ValueError naming the criterion, the key and the settings it accepts. Checked here, when the config is
    built, so that a typo fails before any model loads, whether it came from Python, JSON, a recipe or the CLI."""
    accepted = criterion_options(CRITERIA[importance] if criterion is None else criterion)
    checked = {}
    for key, value in options.items():
        if key not in accepted:
            shared = " (an OptinConfig setting: set it there)" if key in {f.name for f in dataclasses.fields(OptinConfig)} else ""
            raise ValueError(
                f"importance_options: importance={importance!r} has no setting {key!r}{shared}; its settings are "
                f"{sorted(accepted) or 'none'}."
            )
        try:
            checked[key] = checked_type(key, value, accepted[key])
        except ValueError as err:
            raise ValueError(f"importance_options of importance={importance!r}: {err}") from err
    return checked


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun
