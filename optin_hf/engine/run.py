"""A scoring run: every candidate's raw MD and KL, by the chosen engine, shared between
processes (torchrun, accelerate launch), checkpointed as it goes, with a progress bar on the
main process.

Engines return raw losses only; balancing and weights come afterwards in the reference
order (`losses.balance`), so the order in which candidates are run does not matter. Launched
normally there is one process: it gets every candidate and gathers only its own.
"""

from __future__ import annotations

import hashlib

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Sequence, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter, refusal
from .resume import FORMAT, LossCheckpoint, fingerprint
from .fast import FastRunner
from .reference import ReferenceRunner

KINDS = ("head", "neuron")

Candidate = tuple[str, int, int]  # (kind, layer, index)
T = TypeVar("T")


@dataclass
class RawLosses:
    """Unbalanced losses per candidate. Each tensor is [num_layers, units] (units = heads or neurons)."""

    md: torch.Tensor
    kl: torch.Tensor


def process_state(device: torch.device) -> PartialState:
    """The process group, on gloo when the model is on CPU (nccl on GPUs under accelerate launch)."""
    return PartialState(cpu=device.type == "cpu")


def share(items: Sequence[T], state: PartialState) -> list[T]:
    """This process's share: every num_processes-th item.

    Dealt round-robin, not in contiguous blocks, because a candidate in an early layer costs
    more than one in a late layer (more layers to rerun): blocks would leave the process with
    the last layers idle while the one with the first layers works.
    """
    return list(items[state.process_index :: state.num_processes])


def gather(items: list[Any]) -> list[Any]:
    """Every process's items, on every process."""
    return gather_object(items)


def precision(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Half precision by autocast: the weights stay untouched, matmuls run in `dtype`, and the
    losses are still computed in fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def candidate_masks(indices: list[int], width: int, group: int, device=None, order: torch.Tensor | None = None) -> torch.Tensor:
    """[variants, width] multipliers: candidate v removes units [i*group, (i+1)*group) of its layer,
    or, with `order` [width] (a permutation), the units at those places of the order."""
    mask = torch.ones(len(indices), width, device=device)
    for v, index in enumerate(indices):
        units = slice(index * group, (index + 1) * group)
        mask[v, units if order is None else order[units].to(mask.device)] = 0.0
    return mask


def candidates(units: dict[str, int], num_layers: int) -> list[Candidate]:
    """Every candidate in the reference's order: heads, then neurons; layer by layer; index by index."""
    kinds = [kind for kind in KINDS if kind in units]
    return [(kind, layer, index) for kind in kinds for layer in range(num_layers) for index in range(units[kind])]


def grouped(units: dict[str, int], groups: dict[str, int]) -> dict[str, int]:
    """Candidates per layer of each kind when `groups[kind]` consecutive units go together (the last group may be partial)."""
    return {kind: -(-count // groups.get(kind, 1)) for kind, count in units.items()}


def chunks(items: list[Candidate], size: int) -> Iterator[list[Candidate]]:
    """Runs of at most `size` consecutive candidates of one kind and layer (one stacked forward)."""
    chunk: list[Candidate] = []
    for item in items:
        if chunk and (len(chunk) == size or item[:2] != chunk[0][:2]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def engine_for(model: nn.Module, adapter: ArchAdapter, config) -> str:
    """The engine that will run: the fast one falls back to the reference for a family that does not declare it
    (`Capabilities.fast_engine`) or a task head whose classifier its adapter does not know (a family whose
    layers do not chain needs none: the model's own forward finishes its runs)."""
    head_known = not adapter.chained_layers or adapter.classifier_of(model) is not None
    fast = adapter.supports("fast_engine") and head_known
    return "fast" if config.engine == "fast" and fast else "reference"


def _runner(model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config):
    if engine_for(model, adapter, config) == "fast":
        return FastRunner(model, adapter, batches, config)
    if config.engine == "fast" and not adapter.supports("fast_engine"):
        warnings.warn(refusal(adapter, "fast_engine", model.config.model_type), stacklevel=3)
    elif config.engine == "fast":
        warnings.warn(
            f"The fast engine does not know how {type(model).__name__} turns hidden states into logits, so this "
            "run uses the reference engine (one full forward per candidate). Add the class to its adapter's "
            "`classifiers` to make it fast.",
            stacklevel=3,
        )
    return ReferenceRunner(model, adapter, batches, config)


def _settings(
    model: nn.Module, config, units: dict[str, int], num_layers: int, groups: dict[str, int], orders: dict[str, torch.Tensor]
) -> dict:
    """The settings raw losses depend on (the fingerprint's readable part)."""
    return {
        "format": FORMAT,
        "engine": config.engine,
        "dtype": config.dtype,
        "md_tokens": config.md_tokens,
        "seed": config.seed,
        "temperature": config.temperature,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "units": units,
        "groups": groups or {},
        "orders": {kind: hashlib.blake2b(order.cpu().numpy().tobytes(), digest_size=8).hexdigest() for kind, order in orders.items()},
        "num_layers": num_layers,
    }


def _store(tensors: dict[str, torch.Tensor], kind: str, layer: int, index: int, md: float, kl: float) -> None:
    tensors[f"{kind}.md"][layer, index] = md
    tensors[f"{kind}.kl"][layer, index] = kl
    tensors[f"{kind}.done"][layer, index] = True


@torch.no_grad()
def compute_raw_losses(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[dict[str, torch.Tensor]],
    config,
    units: dict[str, int],
    groups: dict[str, int] | None = None,
    orders: dict[str, torch.Tensor] | None = None,
) -> dict[str, RawLosses]:
    """Raw MD and KL of every candidate of the kinds in `units` ({"head": num_heads, ...}).

    `groups[kind] = g` makes each candidate g units removed together, so `units[kind]` counts
    groups: g consecutive ones, or with `orders[kind]` ([num_layers, width], a permutation per
    layer) g consecutive places of the layer's order. Masks stay as wide as the layer, and when g
    does not divide its width the last group is partial. A layer narrower than the widest
    (`ArchAdapter.layer_geometry`) runs only its own candidates; its padding stays 0.
    """
    groups, orders = groups or {}, orders or {}
    num_layers = len(adapter.layers_of(model))
    widths = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
    device = next(model.parameters()).device
    dtype = getattr(torch, config.dtype)
    state = process_state(device)
    geometry = adapter.layer_geometry(model.config)
    layer_units = {"head": [g.heads for g in geometry], "neuron": [g.neurons for g in geometry]}
    tensors: dict[str, torch.Tensor] = {}
    for kind, count in units.items():
        tensors[f"{kind}.md"] = torch.zeros(num_layers, count, dtype=torch.float64)
        tensors[f"{kind}.kl"] = torch.zeros(num_layers, count, dtype=torch.float64)
        runs = torch.tensor([-(-n // groups.get(kind, 1)) for n in layer_units[kind]])
        tensors[f"{kind}.done"] = torch.arange(count)[None, :] >= runs[:, None]  # padding: nothing to run
    checkpoint = None
    if config.checkpoint_dir is not None:
        tag = fingerprint(model, batches, _settings(model, config, units, num_layers, groups, orders))
        checkpoint = LossCheckpoint(config.checkpoint_dir, tag, state.process_index)
        checkpoint.load_into(tensors)
    state.wait_for_everyone()  # every process has read the checkpoint before any writes to it
    todo = [c for c in candidates(units, num_layers) if not tensors[f"{c[0]}.done"][c[1], c[2]]]
    mine = share(todo, state)
    computed: list[tuple[str, int, int, float, float]] = []
    if mine:
        with precision(device, dtype):
            runner = _runner(model, adapter, batches, config)
            desc = "OPTIN scoring" + (f" ({state.num_processes} processes)" if state.num_processes > 1 else "")
            bar = tqdm(total=len(mine), desc=desc, unit="cand", disable=not state.is_main_process)
            for chunk in chunks(mine, runner.variants):
                kind, layer = chunk[0][:2]
                bar.set_postfix_str(f"{kind}s of layer {layer}", refresh=False)
                group = groups.get(kind, 1)
                order = orders[kind][layer] if kind in orders else None
                masks = candidate_masks([index for _, _, index in chunk], widths[kind], group, device, order)
                losses = runner.run(kind, layer, masks)
                for (_, _, index), (md, kl) in zip(chunk, losses):
                    _store(tensors, kind, layer, index, md, kl)
                    computed.append((kind, layer, index, md, kl))
                if checkpoint is not None:
                    checkpoint.save(tensors)
                bar.update(len(chunk))
            bar.close()
    for result in gather(computed):
        _store(tensors, *result)
    missing = sum(int((~tensors[f"{kind}.done"]).sum()) for kind in units)
    if missing:  # e.g. processes on several machines that each saw a different checkpoint_dir
        raise RuntimeError(
            f"{missing} candidates were scored by no process: did every process see the same checkpoint_dir?"
        )
    return {kind: RawLosses(tensors[f"{kind}.md"], tensors[f"{kind}.kl"]) for kind in units}
