"""Refit-aware unit selection: which heads and neurons each layer drops, given how many it drops.

The allocation (`optin_hf.allocate`) decides how many units each layer keeps from importance scores,
and by default which ones too: the best-scored. But the refit (`optin_hf.reconstruct`) then re-solves
each output projection for the units that are left, so a unit whose contribution the others can
rebuild costs little however large it is, and a small unit nothing else carries costs a lot. This
module keeps the allocation's counts and re-chooses the units by the error left after the refit.

For an output projection with weight θ₀ (as [in (+1 for the bias), out] rows) and input rows X
(plus a constant column with a bias) on the dense model's calibration tokens, let
G = XᵀX + λI with the refit's ridge λ = ridge · mean(diag XᵀX). The refit minimises
|X θ - X θ₀|² + λ|θ - θ₀|² = (θ - θ₀)ᵀ G (θ - θ₀) over the kept rows; removing the rows R of a set of
units and refitting the rest raises it by tr(θ₀_Rᵀ ((G⁻¹)_RR)⁻¹ θ₀_R) (the Schur complement; the
Optimal Brain Surgeon step of Hassibi & Stork, used for structured pruning by ZipLM, SlimGPT and
OSSCAR), and the optimal rest moves by -(G⁻¹)_SR ((G⁻¹)_RR)⁻¹ θ₀_R. A head owns its head_dim rows
(a KV group its query heads' rows, `ArchAdapter.head_slices`), a neuron one (`neuron_slices`).

Greedy removal: score every remaining unit by that increase, remove the cheapest, update θ and G⁻¹
(G⁻¹ of the rest is the Schur complement of the removed block), repeat until the layer keeps its
allocated count. Beyond `MAX_ROUNDS` removals in a layer (wide FFNs), each round removes the several
cheapest units together, with the exact joint update. G⁻¹ is kept as the first inverse minus a factor
that grows by the removed rows' columns each round (`greedy_removal`), never copied or shrunk: a round
touches θ and the removed columns, not all n² entries (SmolLM2's 1,536-channel layer: about 0.6 s on 2 threads, with
θ row-major and a unit's rows read as a view where units own consecutive rows).

The Grams come from the dense model's own calibration stream (every layer's input as the dense model
computes it), so all layers are chosen independently, before slimming; the refit then runs as usual. They are
accumulated by hooks during the one dense run over the calibration batches that the refit reads again
(`optin_hf.dense_calls`): no layer runs twice for them. Where every sublayer's float64 Gram would not fit in
`GRAM_MEMORY` together (a CUDA device: a quarter of its free memory), they are accumulated a group of sublayers at a
time, one dense run per group: Llama-3.1-8B's would take 57 GB at once (SmolLM2's 0.65 GB).
Sublayers the family does not refit (`ArchAdapter.refit_sublayers`: ResNet's 3x3 conv) keep the
allocation's choice, as do layers that keep all or none of a kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter, Projection, check_model
from .arch.projection import unit_features
from .masks import PruningMasks
from .memory import release_freed_memory
from .least_squares import NormalEquations, stacked_theta
from .dense_calls import dense_calls
from .engine.fast import free_memory
from .reconstruct import output_projection

MAX_ROUNDS = 256  # greedy rounds per sublayer; more removals than this go several per round
GRAM_MEMORY = 4 * 2**30  # bytes of float64 Grams accumulated at once on a CPU (`gram_groups`)

KINDS = (("attn_out", "head"), ("ffn_down", "neuron"))  # refit sublayer -> the unit whose columns it reads


def unit_columns(adapter: ArchAdapter, config, sublayer: str, units: int, width: int, total: int) -> torch.Tensor:
    """[units, features per unit]: the input columns of `sublayer`'s projection that each unit owns, read off
    the slice the adapter slims them by (a head's `width` columns, a KV group's g query heads', a neuron's one);
    `total`: the projection's input features."""
    slices = adapter.head_slices(config) if sublayer == "attn_out" else adapter.neuron_slices(config)
    path = getattr(adapter, sublayer)
    part = next((p for p in slices if p.path == path and p.side == "in"), None)
    if part is None:
        raise TypeError(
            f"selection='refit' reads which {sublayer} input columns a unit owns off the adapter's slices, and the "
            f"{adapter.model_types[0]} adapter slices no input of {path!r}: use selection='scores'."
        )
    w = part.width or width
    flat = unit_features(torch.arange(units), w, part.segments, total)  # [segments * units * w], segment-major
    return flat.view(part.segments, units, w).transpose(0, 1).reshape(units, part.segments * w)


def greedy_removal(
    gram: torch.Tensor, theta: torch.Tensor, columns: torch.Tensor, remove: int, ridge: float, rounds: int = MAX_ROUNDS,
    trace: list[tuple[int, float]] | None = None,
) -> tuple[list[int], float]:
    """Which `remove` units to drop, greedily by the post-refit error, and that error's increase.

    gram: XᵀX [rows, rows] (a trailing constant column included where the projection has a bias, never
    removed); theta: θ₀ [rows, out]; columns: [units, w], the rows each unit owns. Each of at most
    `rounds` rounds drops the cheapest ceil(left / rounds left) units together (one at a time when
    `remove <= rounds`).

    G⁻¹ is never copied or shrunk: after the rounds so far it is H₀ - L Lᵀ (H₀ = the first inverse), each
    round appending the columns G⁻¹_:R chol(G⁻¹_RR)⁻ᵀ of its dropped rows R to L, so a round costs
    O(rows · (removed so far + out) · |R|) for G⁻¹_:R, θ and the units' diagonal blocks, not O(rows²) copies.
    Dropped rows end with zero θ and G⁻¹ rows; their units are out of the running. `trace`, where given, gets
    (units removed so far, error increase so far) after every round: the layer's post-refit error curve
    (`benchmarks/llm_allocation_dev.py` allocates per-layer counts from it).
    """
    g = gram.double()
    # a Gram of zeros (inputs that are zero on every calibration token: every choice leaves the same error) would be
    # singular; the ridge alone then ranks the units by their weights
    ridge_term = ridge * g.diagonal().mean() if g.diagonal().any() else g.new_tensor(ridge)
    start = torch.linalg.inv(g + ridge_term * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    theta = theta.to(torch.float64, memory_format=torch.contiguous_format, copy=True)  # row-major: rows are units
    units, width = columns.shape
    # a unit's rows as a view where the units own rows 0, 1, ... in order (a Llama's neurons and KV groups), rather
    # than θ [rows, out] gathered anew every round
    ordered = torch.equal(columns.flatten(), torch.arange(columns.numel(), device=columns.device))

    def unit_rows(t: torch.Tensor) -> torch.Tensor:
        return t[: units * width].view(units, width, t.shape[1]) if ordered else t[columns]

    rounds = max(1, min(rounds, remove))
    factor = theta.new_empty(g.shape[0], remove * width)  # L, filled `used` columns at a time
    used = 0
    blocks = start[columns[:, :, None], columns[:, None, :]]  # (G⁻¹)_gg of every unit, kept current
    gone_units = torch.zeros(units, dtype=torch.bool, device=columns.device)
    removed: list[int] = []
    increase = 0.0
    for step in range(rounds):
        count = -(-(remove - len(removed)) // (rounds - step))
        if count == 0:
            continue
        rows = unit_rows(theta)  # [units, w, out]
        # tr(θ_gᵀ ((G⁻¹)_gg)⁻¹ θ_g) as <((G⁻¹)_gg)⁻¹, θ_g θ_gᵀ>: the batched w x w inverse is cheap, a batched
        # solve against the out-wide θ_g (one LU per unit) was most of a round. The blocks are SPD, so by Cholesky:
        # torch 2.13's batched LU inverse (MKL) hangs on 2+ threads for blocks of 192 (SmolLM2's KV groups)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
        costs = (inverse * (rows @ rows.mT)).sum((1, 2)).masked_fill(gone_units, float("inf"))
        picked = costs.topk(count, largest=False).indices
        gone = columns[picked].flatten()
        # the joint OBS step for the dropped rows R: θ -= G⁻¹_:R (G⁻¹_RR)⁻¹ θ_R, G⁻¹ -= G⁻¹_:R (G⁻¹_RR)⁻¹ G⁻¹_R:
        link = start[:, gone] - factor[:, :used] @ factor[gone, :used].T  # G⁻¹_:R now
        lower = torch.linalg.cholesky(link[gone])  # G⁻¹_RR = C Cᵀ
        coef = torch.linalg.solve_triangular(lower, theta[gone], upper=False)  # C⁻¹ θ_R
        new = torch.linalg.solve_triangular(lower, link.T, upper=False).T  # G⁻¹_:R C⁻ᵀ
        increase += float(coef.pow(2).sum())  # tr(θ_Rᵀ (G⁻¹_RR)⁻¹ θ_R)
        theta -= new @ coef
        factor[:, used: used + len(gone)] = new
        used += len(gone)
        part = unit_rows(new)  # [units, w, |R|]
        blocks -= part @ part.transpose(1, 2)
        gone_units[picked] = True
        blocks[gone_units] = torch.eye(width, dtype=blocks.dtype, device=blocks.device)  # zero now: kept solvable
        removed += picked.tolist()
        if trace is not None:
            trace.append((len(removed), increase))
    return removed, increase


def _pending(masks: PruningMasks, adapter: ArchAdapter, config) -> dict[tuple[int, str], int]:
    """(layer, sublayer) -> units to remove, where the refit fits that sublayer and the layer keeps some but not
    all of its units of that kind."""
    geometry = adapter.layer_geometry(config)
    pending = {}
    for sublayer, kind in KINDS:
        if sublayer not in adapter.refit_sublayers or (kind == "head" and not adapter.supports("heads")):
            continue
        mask = masks.head_mask if kind == "head" else masks.neuron_mask
        for i, g in enumerate(geometry):
            units = g.heads if kind == "head" else g.neurons
            kept = int(mask[i, :units].sum())
            if 0 < kept < units:
                pending[(i, sublayer)] = units - kept
    return pending


@contextmanager
def _gram_hooks(
    adapter: ArchAdapter, layers: list[nn.Module], projections: dict[tuple[int, str], Projection],
    grams: dict[tuple[int, str], NormalEquations], real: torch.Tensor | None,
) -> Iterator[None]:
    """While one dense batch runs: add each projection's input rows (attention outputs in token order, padding
    windows dropped, as the refit pairs them: Swin) at the real tokens `real` to its Gram."""
    calls: dict[int, tuple[tuple, dict]] = {}

    def enter(i: int):
        def hook(module, args, kwargs):
            calls[i] = (tuple(args[1:]), dict(kwargs))

        return hook

    def add(i: int, sub: str, proj: Projection):
        def hook(module, args):
            x = args[0]
            if sub == "attn_out":
                x = adapter.token_order(layers[i], x, *calls[i][0], **calls[i][1])
            rows = proj.rows(x)
            grams[(i, sub)].add(rows, rows.new_zeros(rows.shape[0], 0), real)  # only the Gram: no target

        return hook

    handles = [layers[i].register_forward_pre_hook(enter(i), with_kwargs=True) for i in {i for i, _ in projections}]
    handles += [p.module.register_forward_pre_hook(add(i, sub, p)) for (i, sub), p in projections.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gram_groups(projections: dict[tuple[int, str], Projection], device: torch.device) -> list[list[tuple[int, str]]]:
    """The sublayers in groups whose float64 Grams fit in memory together, in order: `GRAM_MEMORY` on a CPU, a
    quarter of the free memory on a CUDA device (each group holds at least one)."""
    budget = free_memory(device) // 4 if device.type == "cuda" else GRAM_MEMORY
    groups: list[list[tuple[int, str]]] = [[]]
    held = 0
    for key, proj in projections.items():
        size = 8 * (proj.in_features + int(proj.has_bias)) ** 2
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += size
    return groups


@torch.no_grad()
def select_by_refit(
    model: nn.Module,
    masks: PruningMasks,
    batches: list[dict[str, torch.Tensor]],
    ridge: float = 1e-3,
    adapter: ArchAdapter | None = None,
) -> PruningMasks:
    """Masks with `masks`' per-layer counts, each refit sublayer's units chosen by the greedy post-refit error
    (module docstring) on the dense `model`'s calibration `batches` (padded, as `reconstruct` takes them);
    `ridge`: the refit's (`OptinConfig.reconstruct_ridge`). `adapter`: the model's, where the caller has it."""
    if not ridge > 0:
        raise ValueError(f"select_by_refit inverts each sublayer's Gram matrix, which ridge={ridge} leaves singular "
                         "wherever a unit never varies on the calibration data: pass ridge > 0 (the refit's default is 1e-3).")
    adapter = adapter or check_model(model)
    config = model.config
    masks.check_fits(config, adapter)
    pending = _pending(masks, adapter, config)
    heads, neurons = masks.head_mask.clone(), masks.neuron_mask.clone()
    if not pending:
        return masks.with_masks(heads, neurons, masks.token_schedule)
    was_training = model.training
    model.eval()
    try:
        layers = adapter.layers_of(model)
        projections = {(i, sub): output_projection(adapter, layers[i], sub) for i, sub in pending}
        geometry = adapter.layer_geometry(config)
        with tqdm(total=len(projections), desc="Refit selection", unit="sublayer") as bar:
            for group in gram_groups(projections, next(model.parameters()).device):
                part = {key: projections[key] for key in group}
                grams = {key: NormalEquations(p.in_features, 0, p.device, p.has_bias) for key, p in part.items()}
                dense_calls(model, adapter, batches, observe=lambda real: _gram_hooks(adapter, layers, part, grams, real))
                for (i, sub), proj in part.items():
                    g = geometry[i]
                    units, width = (g.heads, g.head_dim) if sub == "attn_out" else (g.neurons, 1)
                    columns = unit_columns(adapter, config, sub, units, width, proj.in_features).to(proj.device)
                    theta = stacked_theta(proj.weight(), proj.bias(), adapter.branch_scale(layers[i], sub))
                    removed, _ = greedy_removal(grams.pop((i, sub)).gram, theta, columns, pending[(i, sub)], ridge)
                    mask = heads if sub == "attn_out" else neurons
                    mask[i, :units] = True
                    mask[i, removed] = False
                    bar.update()
                release_freed_memory()  # the group's Grams and greedy factors
    finally:
        model.train(was_training)
    return masks.with_masks(heads, neurons, masks.token_schedule)
