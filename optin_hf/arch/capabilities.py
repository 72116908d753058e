"""What an adapter declares it supports (`ArchAdapter.capabilities`), and the message that refuses the rest.

The pruner, the scoring engines and the reconstruction never guess a family's features from
which adapter fields are None: they ask this declaration (`optin_hf.arch.require`), so a
feature a family lacks is refused up front with one message, which names the model type, the
feature, the fix and what the family does support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Repair = Literal["weights", "scales", "batchnorm"]
Feature = Literal["fast_engine", "weights", "scales", "batchnorm", "inputs", "readers", "tokens", "heads", "neurons", "channels"]
REPAIRS: tuple[Repair, ...] = ("weights", "scales", "batchnorm")
FEATURES: tuple[Feature, ...] = ("fast_engine", *REPAIRS, "inputs", "readers", "tokens", "heads", "neurons", "channels")

_REFIT = (
    "refits each layer's output projections through the adapter's layer pieces "
    "(finish_attention, feed_forward, finish_feed_forward)"
)
# feature -> (the setting that asks for it, what it does, so what the adapter must give)
_ASKED_BY: dict[str, tuple[str, str]] = {
    "fast_engine": ("engine='fast'", "starts inside a layer through the adapter's layer pieces (finish_attention, feed_forward)"),
    "weights": ("reconstruct='weights'", _REFIT),
    "scales": ("reconstruct='scales'", _REFIT),
    "inputs": ("reconstruct_inputs=True", "refits each sublayer's input projections (query, key and value; the FFN's up "
               "and gate) as linear maps of the sublayer's input, which needs them to be Linear or Conv1D layers"),
    "readers": ("reconstruct_readers=True", "refits the convs that read each block's input (its reduce conv and projection "
                "shortcut) and the classifier, which needs a ResNet's blocks"),
    "batchnorm": ("reconstruct='batchnorm'", "re-estimates the running means of the BatchNorms after the pruned convs"),
    "tokens": ("prune_tokens=True", "reduces image tokens by merging a ViT token sequence, its class token(s) kept apart"),
    "heads": ("prune_heads=True with prune_neurons=False", "prunes heads only"),
    "neurons": ("prune_neurons=True with prune_heads=False", "prunes neurons only"),
    "channels": ("prune_channels=True", "prunes the residual channels that a stage's residual adds tie together"),
}


@dataclass(frozen=True)
class Capabilities:
    """The optional features of a family. The defaults are those every family has (heads and neurons
    to prune, the reference engine, `reconstruct="none"`), so a family declares only what it adds or lacks.

    fast_engine: the fast scoring engine may run it (`ArchAdapter.finish_attention` and `feed_forward` given).
    repairs: the `reconstruct` modes besides "none" it takes, strongest first (`reconstruct="auto"` uses
    the first, `auto_repair`): "weights" and "scales" refit the output projections through the three
    layer pieces; "batchnorm" re-estimates the running means of the BatchNorms after the pruned convs (ResNet).
    inputs: the weights refit can refit each sublayer's input projections too (`reconstruct_inputs=True`): the
    output-side slices of `head_slices` / `neuron_slices` that are Linear or Conv1D layers, each read as a linear map
    of its own input (needs "weights" among the repairs).
    readers: the weights refit can refit the convs that read each block's input and the classifier too, the residual
    widths cut or kept (`reconstruct_readers=True`; ResNet: `ArchAdapter.channel_readers`, needs "weights").
    tokens: token mode (`prune_tokens=True`): a ViT token sequence with class token(s) to keep apart.
    heads, neurons: the kinds of unit its layers have (ConvNeXt has no heads).
    channels: coupled residual channels (`prune_channels=True`): the adapter gives `channel_widths(config)` (the
    width of each group of channels tied by residual adds), `kept_channels(model)`, `channel_carriers(model)`
    (the modules whose outputs carry each group, and the first layer reading it) and `slim_channels(model, keep)`,
    and its MAC formulas take the groups' widths (`channels=`; ResNet).
    allocation: what `allocation="auto"` counts units per layer by, where the settings allow a per-layer allocation
    (`auto_settings.resolve_defaults`): "scores" (OPTIN's budget search), "fluctuation" (FLAP's, for decoders whose
    layers have equal widths: on SmolLM2 OPTIN's own per-layer counts cut the last layers' MLPs to a sixth and lost
    far more, benchmarks/RESULTS.md, s41-s42), or "refit" (by the loss the refit leaves: ConvNeXt, SegFormer and ViT,
    where scores taken before the refit empty blocks the refit cannot rebuild; on the development splits of a
    cluttered-digits ConvNeXt, a harder-scenes SegFormer and a cluttered-digits ViT trained here,
    `OptinConfig(mac_constraint=0.5)` lost 12.5 points, 5.1 mIoU points and 13.7 points with the scores' counts, 0.4,
    +0.2 and 8.6 with the refit's, benchmarks/RESULTS.md, s46; not ResNet, whose
    wide stem needs its residual channels cut, which a per-layer allocation does not do). "refit" needs a refit repair,
    and "auto" runs it where the repair is a refit and the model is small (`auto_settings.auto_allocation`).
    """

    fast_engine: bool = False
    repairs: tuple[Repair, ...] = ()
    inputs: bool = False
    readers: bool = False
    tokens: bool = False
    heads: bool = True
    neurons: bool = True
    channels: bool = False
    allocation: Literal["scores", "fluctuation", "refit"] = "scores"

    def __post_init__(self) -> None:
        if self.allocation not in ("scores", "fluctuation", "refit"):
            raise ValueError(f"Capabilities(allocation={self.allocation!r}): a family's own allocation is 'scores', "
                             "'fluctuation' or 'refit'.")
        if self.allocation == "refit" and self.auto_repair(refit=True) == "none":
            raise ValueError("Capabilities(allocation='refit') counts units by the loss the refit leaves: declare "
                             "repairs=('weights', ...) too.")
        unknown = [mode for mode in self.repairs if mode not in REPAIRS]
        if unknown:
            raise ValueError(f"Capabilities(repairs={self.repairs!r}) names {unknown}: the repairs are {list(REPAIRS)}.")
        if self.inputs and "weights" not in self.repairs:
            raise ValueError("Capabilities(inputs=True) refits input projections within the weights refit: declare "
                             "repairs=('weights', ...) too.")
        if self.readers and "weights" not in self.repairs:
            raise ValueError("Capabilities(readers=True) refits convs within the weights refit: declare "
                             "repairs=('weights', ...) too.")
        if not (self.heads or self.neurons):
            raise ValueError("Capabilities(heads=False, neurons=False) leaves nothing to prune: declare one kind of unit.")

    def auto_repair(self, refit: bool = False) -> str:
        """What `reconstruct="auto"` runs: the first declared repair ("none" if there is none); with `refit`
        (pruning in steps re-scores a refit model), the first of "weights" and "scales" that is declared."""
        usable = [mode for mode in self.repairs if not refit or mode in ("weights", "scales")]
        return usable[0] if usable else "none"

    def supports(self, feature: Feature) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"{feature!r} is not a capability; the capabilities are {list(FEATURES)}.")
        return feature in self.repairs if feature in REPAIRS else bool(getattr(self, feature))

    def supported(self) -> list[str]:
        """The declared features, named by the settings that ask for them."""
        names = ["engine='fast'"] if self.fast_engine else []
        names += [f"reconstruct={mode!r}" for mode in self.repairs] + ["reconstruct='none'"]
        names += ["reconstruct_inputs=True"] if self.inputs else []
        names += ["prune_tokens=True"] if self.tokens else []
        names += ["prune_channels=True"] if self.channels else []
        return names + [kind for kind in ("heads", "neurons") if getattr(self, kind)]

    def refusal(self, feature: Feature, model_type: str, supporters: Sequence[str] = ()) -> str:
        """Why `feature` is refused for `model_type`, with the fix; `supporters`: the model types that declare it."""
        asked, does = _ASKED_BY[feature]
        return (
            f"{asked} {does}, which the {model_type} adapter does not give: {self._fix(feature, model_type, supporters)}. "
            f"The {model_type} adapter supports: {', '.join(self.supported())}."
        )

    def _fix(self, feature: Feature, model_type: str, supporters: Sequence[str]) -> str:
        if feature == "fast_engine":
            return "this run uses the reference engine (one full forward per candidate)"
        if feature in REPAIRS:
            first, *others = [*self.repairs, "none"]
            alternatives = f" (or {' or '.join(map(repr, others))})" if others else ""
            return f"prune it with OptinConfig(reconstruct={first!r}){alternatives}"
        if feature == "tokens":
            if not supporters:
                return "set prune_tokens=False (no registered family declares token mode)"
            return f"it needs a {' or '.join(supporters)} model, not {model_type!r}; or set prune_tokens=False"
        if feature == "channels":
            return "set prune_channels=False (its residual widths stay whole)"
        if feature == "inputs":
            return "set reconstruct_inputs=False (the output projections are still refit)"
        return "set prune_neurons=True" if feature == "heads" else "set prune_heads=True"
