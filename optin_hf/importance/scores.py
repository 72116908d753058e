"""`ImportanceScores`: one number per head and per neuron, higher = more important."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..masks import PruningMasks, load_safetensors

SCORES_NAME = "optin_scores.safetensors"


@dataclass
class ImportanceScores:
    """head_scores: [num_layers, num_heads]; neuron_scores: [num_layers, intermediate_size]."""

    head_scores: torch.Tensor
    neuron_scores: torch.Tensor
    criterion: str = "optin"

    def __post_init__(self) -> None:
        self.head_scores = torch.as_tensor(self.head_scores, dtype=torch.float64).cpu()
        self.neuron_scores = torch.as_tensor(self.neuron_scores, dtype=torch.float64).cpu()

    def check_fits(self, config) -> None:
        PruningMasks(self.head_scores != 0, self.neuron_scores != 0).check_fits(config)

    def save(self, path: str | os.PathLike) -> None:
        save_file(
            {"head_scores": self.head_scores, "neuron_scores": self.neuron_scores},
            str(path),
            metadata={"format": "optin-scores-v1", "criterion": self.criterion},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceScores":
        from safetensors import safe_open

        tensors = load_safetensors(path, "importance scores")
        if {"head_scores", "neuron_scores"} - set(tensors):
            raise ValueError(f"{path} lacks head_scores/neuron_scores: it is not an optin-hf scores file.")
        with safe_open(str(path), "pt") as f:
            criterion = (f.metadata() or {}).get("criterion", "unknown")
        return cls(tensors["head_scores"], tensors["neuron_scores"], criterion)
