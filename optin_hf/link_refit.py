"""The refit of the modules that read a stage's output, in a model whose layers do not chain (SegFormer).

The weights refit (`optin_hf.reconstruct`) rebuilds each layer's sums from the pruned model's own stream, but what
is left of the error at a stage's end reaches two readers that the refit never fits: the next stage's
overlapping patch-embedding conv and the decode head's per-stage projection (SegFormer's decode head reads every
stage). Both are linear in what they read (the conv in its input's patches), so, as for an output projection,
the weights that best rebuild the dense module's output from the pruned model's input have a closed form: the
same normal equations and ridge toward the module's own weights (`optin_hf.reconstruct`), so nothing pruned
changes nothing.

The order: the later stages' patch embeddings first, each measured with the earlier ones refit; then the layers'
refit once more (on the refit stages' inputs); then the task head's readers, from the stages' final outputs. On
the digit-scenes SegFormer's two development folds this took 0.2 to 0.5 mIoU points off the loss at 0.6 of the MACs
and 0.7 to 1.1 at 0.5 (benchmarks/RESULTS.md). The artifact holds each module's weight (an [out, in] matrix,
a conv's kernel flattened) and bias, keyed `links.{path}.weight` / `.bias`, the path from the task model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .arch import ArchAdapter
from .capture import scoring_forward
from .least_squares import NormalEquations, map_rows, patches, record, solve_weights, stacked_theta, write_solved

if TYPE_CHECKING:  # reconstruct imports this module: the type only, for the annotations
    from .reconstruct import Reconstruction

LINKS = "links"


@dataclass
class Link:
    """A Linear or a Conv2d read as an [out, in] matrix (a conv's kernel flattened, as its input's patches are), with
    the `weight()` / `bias()` / `set()` / `device` an output projection offers (`optin_hf.arch.Projection`)."""

    module: nn.Linear | nn.Conv2d

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def in_features(self) -> int:
        return self.module.weight[0].numel()

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0]

    def weight(self) -> torch.Tensor:
        return self.module.weight.detach().reshape(self.out_features, self.in_features)

    def bias(self) -> torch.Tensor | None:
        return None if self.module.bias is None else self.module.bias.detach()

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write an [out, in] weight (and the bias, where the module has one) back in the module's own shape."""
        self.module.weight.data.copy_(weight.reshape(self.module.weight.shape))
        if bias is not None and self.module.bias is not None:
            self.module.bias.data.copy_(bias)

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input rows, output rows), one per output position: a conv's input patches and its map's positions."""
        if isinstance(self.module, nn.Conv2d):
            out = map_rows(y)
            return patches(self.module, x, out.shape[0] // x.shape[0]), out
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def link_paths(adapter: ArchAdapter, model: nn.Module) -> list[str]:
    """Every module the link refit fits in `model` (`ArchAdapter.link_refits`), stage inputs first."""
    stage_inputs, head_inputs = adapter.link_refits(model)
    return [*stage_inputs, *head_inputs]


@torch.no_grad()
def refit_links(
    model: nn.Module, dense: nn.Module, batches: list[dict[str, torch.Tensor]], ridge: float, paths: list[str]
) -> tuple[dict[str, torch.Tensor], list[tuple[int, str, float, float]]]:
    """Refit the modules at `paths` of the slim `model` (in place), each from its input in `model` to the dense
    module's output in `dense` on `batches`, in one pass (none of them may feed another); (the artifact, the
    calibration errors (-1, path, before, after))."""
    links = {path: Link(model.get_submodule(path)) for path in paths}
    eqs = {path: NormalEquations(link.in_features, link.out_features, link.device, link.module.bias is not None,
                                 stacked_theta(link.weight(), link.bias(), None)) for path, link in links.items()}
    seen: dict[str, dict[str, torch.Tensor]] = {"in": {}, "out": {}}
    hooks = [model.get_submodule(path).register_forward_pre_hook(lambda m, args, p=path: seen["in"].__setitem__(p, args[0]))
             for path in paths]
    hooks += [dense.get_submodule(path).register_forward_hook(lambda m, args, out, p=path: seen["out"].__setitem__(p, out))
              for path in paths]
    was_training = (model.training, dense.training)
    model.eval()
    dense.eval()
    try:
        for batch in batches:
            scoring_forward(model, batch)
            scoring_forward(dense, batch)
            for path, link in links.items():
                eqs[path].add(*link.rows(seen["in"][path], seen["out"][path]), None)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training[0])
        dense.train(was_training[1])
    tensors, errors = {}, []
    for path, link in links.items():
        theta0 = stacked_theta(link.weight(), link.bias(), None)
        before = eqs[path].error(theta0)
        write_solved(link, solve_weights(eqs[path], theta0, ridge), f"{LINKS}.{path}", tensors)
        errors.append((-1, path, before, eqs[path].error(stacked_theta(link.weight(), link.bias(), None))))
    return tensors, errors


def with_links(model: nn.Module, dense: nn.Module, batches: list[dict[str, torch.Tensor]], ridge: float,
               adapter: ArchAdapter, refit_layers: Callable[[], Reconstruction]) -> Reconstruction:
    """The layers' refit (`refit_layers()`, the slim `model` in place) with the link refit (module docstring): the
    later stages' inputs refit one by one on the refit layers' stream, then the layers refit again from their slim
    weights (what a refit of the stage inputs inside the layers' pass would give, and its errors from those weights),
    then the head's readers. The artifact and errors of both."""
    stage_inputs, head_inputs = adapter.link_refits(model)
    slim = copy.deepcopy(adapter.layers_of(model).state_dict()) if stage_inputs else None
    result = refit_layers()
    tensors: dict[str, torch.Tensor] = {}
    errors: list[tuple[int, str, float, float]] = []
    for path in stage_inputs:  # each one's input comes through the ones before it
        found, errs = refit_links(model, dense, batches, ridge, [path])
        tensors.update(found)
        errors += errs
    if slim is not None:
        adapter.layers_of(model).load_state_dict(slim)
        result = refit_layers()
    if head_inputs:  # a bare encoder has none
        found, errs = refit_links(model, dense, batches, ridge, list(head_inputs))
        tensors.update(found)
        errors += errs
    return replace(result, tensors={**result.tensors, **tensors}, errors=result.errors + errors)


def link_destination(model: nn.Module, adapter: ArchAdapter, key: str) -> tuple[Link, str, tuple[int, ...]] | None:
    """Where a `links.{path}.weight` / `.bias` tensor goes: (the module as a `Link`, "weight" or "bias", the shape it
    must have); None if `path` is no link of this model."""
    path, _, name = key[len(LINKS) + 1 :].rpartition(".")
    if path not in link_paths(adapter, model) or name not in ("weight", "bias"):
        return None
    link = Link(model.get_submodule(path))
    if name == "bias":
        return (link, "bias", (link.out_features,)) if link.module.bias is not None else None
    return link, "weight", (link.out_features, link.in_features)


def link_tensors(model: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    """The artifact of the slim `model`'s links (`links.{path}.weight` / `.bias`), as it holds them: what a loaded full
    checkpoint carries of them, to save again masks-only."""
    tensors = {}
    for path in link_paths(adapter, model):
        link = Link(model.get_submodule(path))
        record(tensors, f"{LINKS}.{path}", link.weight(), link.bias())
    return tensors


@torch.no_grad()
def copy_links(source: nn.Module, target: nn.Module, adapter: ArchAdapter) -> None:
    """Give `target` (a dense copy) `source`'s refit links: their shapes do not change with the masks."""
    for path in link_paths(adapter, source):
        target.get_submodule(path).load_state_dict(source.get_submodule(path).state_dict())
