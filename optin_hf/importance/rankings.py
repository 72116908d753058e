"""Import of the reference's published rankings, Python pickles, without unpickling them.

Each file (`head_ranking_body.pkl`, `neuron_ranking_body.pkl`) is a list of
`(score, layer, index, "head" | "neuron")` sorted ascending by score, where score is the
NEGATED loss (so the most important structure comes first). In vision files a neuron index
>= intermediate_size is the token position `index - intermediate_size`.

The scores are tensors written with `pickle.dump` (possibly CUDA tensors), or the list was
written with `torch.save`. `pickled_data` reads either as data: its own interpreter of the
pickle opcodes builds lists, numbers, strings and tensors (on the CPU) and refuses everything
else, so a file that would run code when unpickled is an error and nothing of it runs. Neither
`pickle` nor `torch.load` is used.
"""

from __future__ import annotations

import os
import reprlib
from typing import Any

import torch

from ..arch import get_adapter
from .pickled_data import CutShort, load_pickled_data


def load_rankings(path: str | os.PathLike) -> list:
    """The ranking list in `path`: a `pickle.dump` file or a `torch.save` archive, read as data only."""
    try:
        rankings = load_pickled_data(path)
    except CutShort as err:
        raise ValueError(
            f"{path} is empty or cut short: not a complete rankings pickle. Download the reference's "
            "*_ranking_body.pkl file again."
        ) from err
    if not isinstance(rankings, (list, tuple)):
        raise ValueError(
            f"{path} holds a {type(rankings).__name__}, not the reference's list of (score, layer, index, kind)."
        )
    return list(rankings)


def _entry(item: Any, path: str | os.PathLike) -> tuple[float, int, int, str]:
    if not (isinstance(item, (tuple, list)) and len(item) == 4 and item[3] in ("head", "neuron")):
        raise ValueError(f"{path}: {reprlib.repr(item)} is not a (score, layer, index, 'head'|'neuron') entry.")
    score, layer, index, kind = item
    if not (isinstance(score, (torch.Tensor, int, float)) and type(layer) is int and type(index) is int):
        raise ValueError(f"{path}: {reprlib.repr(item)} is not a (score, layer, index, kind) entry of numbers.")
    if isinstance(score, torch.Tensor):
        if score.numel() != 1 or score.is_complex():
            raise ValueError(f"{path}: a score holds {score.numel()} {score.dtype} numbers, not one real number.")
        score = score.item()
    return float(score), layer, index, kind


def scores_from_rankings(
    head_pkl: str | os.PathLike, neuron_pkl: str | os.PathLike, config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Our scores (higher = more important: the negated stored values) as head [L, H], neuron
    [L, I] and token [L, T] tensors; tokens are None when the files hold none. Token entries
    absent from the files (layer 0, prefix tokens) stay 0: they are never removed anyway."""
    adapter = get_adapter(config)
    layers, heads, inter = config.num_hidden_layers, adapter.num_heads(config), adapter.intermediate_size(config)
    tokens = adapter.default_seq_len(config) or 0
    shapes = {"head": (layers, heads), "neuron": (layers, inter), "token": (layers, tokens)}
    scores = {kind: torch.zeros(shape, dtype=torch.float64) for kind, shape in shapes.items()}
    seen = {kind: torch.zeros(shape, dtype=torch.bool) for kind, shape in shapes.items()}
    for path in (head_pkl, neuron_pkl):
        for item in load_rankings(path):
            score, layer, index, kind = _entry(item, path)
            if kind == "neuron" and index >= inter:
                kind, index = "token", index - inter
            if not (0 <= layer < layers and 0 <= index < shapes[kind][1]):
                raise ValueError(
                    f"{path}: {kind} {index} of layer {layer} is outside this model's {shapes[kind][0]} layers x "
                    f"{shapes[kind][1]} {kind}s. Were the rankings made for another model?"
                )
            scores[kind][layer, index] = -score
            seen[kind][layer, index] = True
    for kind in ("head", "neuron"):
        if not seen[kind].all():
            raise ValueError(
                f"The rankings miss {int((~seen[kind]).sum())} of the model's {seen[kind].numel()} {kind}s: "
                "a missing structure would be pruned first. Were they made for another model?"
            )
    return scores["head"], scores["neuron"], scores["token"] if seen["token"].any() else None
