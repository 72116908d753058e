"""`ImportanceScores`: one number per head and per neuron (and per token position of each layer,
in vision token mode), higher = more important."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import save_file

from ..arch import ArchAdapter, get_adapter
from ..masks import PruningMasks, load_safetensors
from .rankings import scores_from_rankings

SCORES_NAME = "optin_scores.safetensors"


@dataclass
class ImportanceScores:
    """head_scores: [num_layers, num_heads]; neuron_scores: [num_layers, intermediate_size];
    token_scores: [num_layers, tokens] of removing token position p from layer l onward (vision
    token mode; layer 0 and the prefix tokens are never removed), or None. example_grads: a
    gradient criterion's per-example gradients ({"head": [examples, num_layers, num_heads], ...})
    for PTF's mask rearrangement (`allocate.rearrange_masks`); kept in memory, not saved. channel_scores:
    [channels of every residual group in turn] (`OptinConfig.prune_channels`), or None."""

    head_scores: torch.Tensor
    neuron_scores: torch.Tensor
    criterion: str = "optin"
    token_scores: torch.Tensor | None = None
    example_grads: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    channel_scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.head_scores = torch.as_tensor(self.head_scores, dtype=torch.float64).cpu()
        self.neuron_scores = torch.as_tensor(self.neuron_scores, dtype=torch.float64).cpu()
        if self.token_scores is not None:
            self.token_scores = torch.as_tensor(self.token_scores, dtype=torch.float64).cpu()
        if self.channel_scores is not None:
            self.channel_scores = torch.as_tensor(self.channel_scores, dtype=torch.float64).cpu()

    def check_fits(self, config, adapter: ArchAdapter | None = None) -> None:
        """Raise unless these scores were made for a dense model with this config (of `adapter`, where known)."""
        adapter = adapter or get_adapter(config)
        full = PruningMasks.full(config, adapter)
        for kind, scores, mask in (("head", self.head_scores, full.head_mask), ("neuron", self.neuron_scores, full.neuron_mask)):
            if scores.shape != mask.shape:
                raise ValueError(
                    f"{kind}_scores {tuple(scores.shape)} do not fit this model, which needs {tuple(mask.shape)}. "
                    "Were they computed for another base model?"
                )
        if self.token_scores is not None:
            tokens = adapter.default_seq_len(config)
            if self.token_scores.shape != (self.head_scores.shape[0], tokens):
                raise ValueError(
                    f"token_scores {tuple(self.token_scores.shape)} do not fit this model, which needs "
                    f"[{self.head_scores.shape[0]}, {tokens}] (layers x tokens per image)."
                )
        if self.channel_scores is not None:
            widths = adapter.channel_widths(config) if adapter.supports("channels") else ()
            if self.channel_scores.shape != (sum(widths),):
                raise ValueError(
                    f"channel_scores {tuple(self.channel_scores.shape)} do not fit this model, whose residual channel "
                    f"groups are {list(widths)} wide. Were they computed for another base model?"
                )

    def ranking_last(self, heads: torch.Tensor, neurons: torch.Tensor) -> "ImportanceScores":
        """These scores with the units marked in `heads` [L, H] / `neurons` [L, I] (bool) below all
        others, by more than every other score together, so the budget search drops them first."""
        low = -1.0 - self.head_scores.abs().sum() - self.neuron_scores.abs().sum()
        return replace(
            self,
            head_scores=self.head_scores.masked_fill(heads, float(low)),
            neuron_scores=self.neuron_scores.masked_fill(neurons, float(low)),
        )

    @classmethod
    def from_reference_rankings(
        cls, head_pkl: str | os.PathLike, neuron_pkl: str | os.PathLike, model_config
    ) -> "ImportanceScores":
        """Import the reference's published rankings (`head_ranking_body.pkl`,
        `neuron_ranking_body.pkl`) for a model with `model_config`, without running their code.

        The files (`pickle.dump` or `torch.save`) are read as data, never unpickled: `importance.pickled_data`
        interprets their opcodes itself and builds only lists, numbers, strings and tensors; any other global,
        call or opcode is refused with a `ValueError` naming it, and nothing of the file runs.
        """
        heads, neurons, tokens = scores_from_rankings(head_pkl, neuron_pkl, model_config)
        return cls(heads, neurons, "optin-reference", tokens)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"head_scores": self.head_scores, "neuron_scores": self.neuron_scores}
        if self.token_scores is not None:
            tensors["token_scores"] = self.token_scores
        if self.channel_scores is not None:
            tensors["channel_scores"] = self.channel_scores
        save_file(tensors, str(path), metadata={"format": "optin-scores-v1", "criterion": self.criterion})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceScores":
        from safetensors import safe_open

        tensors = load_safetensors(path, "importance scores")
        if {"head_scores", "neuron_scores"} - set(tensors):
            raise ValueError(f"{path} lacks head_scores/neuron_scores: it is not an optin-hf scores file.")
        with safe_open(str(path), "pt") as f:
            criterion = (f.metadata() or {}).get("criterion", "unknown")
        return cls(tensors["head_scores"], tensors["neuron_scores"], criterion, tensors.get("token_scores"),
                   channel_scores=tensors.get("channel_scores"))
