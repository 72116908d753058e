"""Import of the reference's published rankings, Python pickles, without running their code.

Each file (`head_ranking_body.pkl`, `neuron_ranking_body.pkl`) is a list of
`(score, layer, index, "head" | "neuron")` sorted ascending by score, where score is the
NEGATED loss (so the most important structure comes first). In vision files a neuron index
>= intermediate_size is the token position `index - intermediate_size`.

The scores are tensors written with `pickle.dump`, possibly CUDA tensors. Such a pickle names
three globals: `torch._utils._rebuild_tensor_v2` (the tensor), `torch.storage._load_from_bytes`
(its storage: a legacy `torch.save` blob) and `collections.OrderedDict` (empty backward hooks).
`RankingUnpickler` resolves only those, and to checked stand-ins: the storage blob goes to
`torch.load(weights_only=True, map_location="cpu")`, torch's own restricted loader, because
torch's `_load_from_bytes` would unpickle it with no restriction.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from ..arch import get_adapter


def _storage_from_bytes(blob: bytes) -> torch.storage.TypedStorage:
    if not isinstance(blob, bytes):
        raise pickle.UnpicklingError(f"A tensor storage must be bytes, got {type(blob).__name__}.")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"A tensor must be rebuilt from a torch storage, got {type(storage).__name__}.")
    if backward_hooks or metadata:
        raise pickle.UnpicklingError("A ranking score tensor carries backward hooks or metadata; refusing it.")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
}


class RankingUnpickler(pickle.Unpickler):
    """Unpickles a ranking file, refusing every global that is not a tensor's own rebuild step."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"Refusing the forbidden global {module}.{name}: a ranking file holds only tensors, numbers and "
                "strings, so this pickle would run code it should not. Do not load it with pickle either."
            )
        return SAFE_GLOBALS[(module, name)]


def load_rankings(path: str | os.PathLike) -> list:
    """The ranking list in `path`: a `pickle.dump` file (read restricted), or a `torch.save`
    archive (read by torch with weights_only=True)."""
    if zipfile.is_zipfile(path):
        rankings = torch.load(path, map_location="cpu", weights_only=True)
    else:
        with open(path, "rb") as f:
            try:
                rankings = RankingUnpickler(f).load()
            except pickle.UnpicklingError as err:
                raise pickle.UnpicklingError(f"{path}: {err}") from err
            except EOFError as err:
                raise ValueError(
                    f"{path} is empty or cut short: not a complete rankings pickle. Download the reference's "
                    "*_ranking_body.pkl file again."
                ) from err
    if not isinstance(rankings, (list, tuple)):
        raise ValueError(f"{path} holds a {type(rankings).__name__}, not the reference's list of (score, layer, index, kind).")
    return list(rankings)


def _entry(item: Any, path: str | os.PathLike) -> tuple[float, int, int, str]:
    if not (isinstance(item, (tuple, list)) and len(item) == 4 and item[3] in ("head", "neuron")):
        raise ValueError(f"{path}: {item!r} is not a (score, layer, index, 'head'|'neuron') entry.")
    score, layer, index, kind = item
    if isinstance(score, torch.Tensor):
        if score.numel() != 1:
            raise ValueError(f"{path}: a score holds {score.numel()} numbers, not one.")
        score = score.item()
    return float(score), int(layer), int(index), kind


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
