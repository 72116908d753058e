"""The prefix cache: what each layer received in the dense run, laid out so that masked runs
spend little on padding.

Masking a structure of layer i cannot change layers before i, so a masked run can start at
layer i from the dense run's inputs instead of at the embeddings (`record_layer_calls`).

The dense run is made on the calibration examples re-batched by length (`bucket_by_length`),
which keeps each bucket's padding small. Where a family's layer calls allow it, the recorded
calls are then packed (`pack_calls`): the real tokens of the examples laid end to end in rows,
with a block-diagonal attention mask so that each example still attends only to itself, which
wastes only the ends of rows. The masked runs start from the cached layer inputs, whose positions
were embedded before layer 0, so moving a token changes nothing it computes: packing is done on
the recorded layer calls, not on the inputs.

The MD token subset is drawn over the examples in their given order (see `md_token_rows`), so
it names the same real tokens however the examples are batched: `Buckets.rows` and the packs'
rows put those tokens at their new places.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..capture import md_token_rows
from ..data import collate


@dataclass
class LayerCall:
    """One layer's call in one dense batch.

    hidden: [batch, tokens, hidden], the layer input. args/kwargs: the rest of the call (the
    extended attention mask, ...), replayed as they were. heads: [batch, tokens, heads*head_dim],
    the input of the attention output projection. output: the layer output (kept for the last
    layer only, to check the replay, or for every layer where the layers do not form a chain,
    `ArchAdapter.chained_layers`, to replay them); tuple_size: the length of the tuple the layer
    returned it in (0: it returned the tensor), to replay it as the layer returns it.
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    heads: torch.Tensor | None = None
    output: torch.Tensor | None = None
    tuple_size: int = 0


@contextmanager
def record_layer_calls(model: nn.Module, adapter: ArchAdapter, heads: bool = True) -> Iterator[list[list[LayerCall]]]:
    """calls[b][i]: layer i's call in the b-th forward run inside the context (with the input of its
    attention output projection where `heads` and the family has heads)."""
    layers = adapter.layers_of(model)
    calls: list[list[LayerCall]] = []

    def enter(i: int):
        def hook(module, args, kwargs):
            if i == 0:
                calls.append([])
            calls[-1].append(LayerCall(args[0], tuple(args[1:]), dict(kwargs)))

        return hook

    def keep_heads(i: int):
        def hook(module, args):
            calls[-1][i].heads = args[0]

        return hook

    def keep_output(i: int):
        def hook(module, args, output):
            call = calls[-1][i]
            call.output, call.tuple_size = (output[0], len(output)) if isinstance(output, tuple) else (output, 0)

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
            if i == len(layers) - 1 or not adapter.chained_layers:
                handles.append(layer.register_forward_hook(keep_output(i)))
            if heads and adapter.supports("heads"):
                handles.append(get_submodule(layer, adapter.attn_out).register_forward_pre_hook(keep_heads(i)))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# Length buckets: the examples re-batched by length before the dense run, so each batch pads little.


@dataclass
class Buckets:
    """batches: the re-padded, length-sorted batches. rows[b]: flat indices into batch b's
    [batch*tokens] of the MD token subset."""

    batches: list[dict[str, torch.Tensor]]
    rows: list[torch.Tensor]


def _tokens(batch: dict[str, torch.Tensor], tokens_per_example: int | None) -> int:
    return batch["attention_mask"].shape[1] if "attention_mask" in batch else int(tokens_per_example)


def _examples(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a batch into examples, dropping each text example's trailing padding.

    Only trailing positions are dropped: with right padding they are masked keys that no real
    token attends to, while leading padding would shift the real tokens' positions.
    """
    size = next(iter(batch.values())).shape[0]
    examples = []
    for i in range(size):
        example = {k: v[i] for k, v in batch.items()}
        if "attention_mask" in example:
            real = example["attention_mask"].nonzero()
            end = int(real.max()) + 1 if len(real) else 1
            example = {k: v[:end] for k, v in example.items()}
        examples.append(example)
    return examples


# A forward's fixed cost (kernel launches, Python per layer), in token rows: splitting a bucket
# in two pays off only if that saves more padded rows than this.
FORWARD_COST_TOKENS = 64


def split_points(lengths: list[int], max_size: int, forward_cost: int = FORWARD_COST_TOKENS) -> list[int]:
    """Ends of the buckets that cut ascending `lengths` into runs of at most `max_size`, with the
    fewest padded token rows plus `forward_cost` per bucket (exact, by dynamic programming)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_size), j):  # bucket = examples i..j-1, padded to lengths[j-1]
            cost = best[i] + (j - i) * lengths[j - 1] + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], n
    while j:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def bucket_by_length(
    batches: list[dict[str, torch.Tensor]], batch_size: int, md_tokens: int, seed: int, tokens_per_example: int | None
) -> Buckets:
    """Sort examples by length, cut them into buckets of at most `batch_size` (`split_points`),
    and move the MD rows along."""
    examples = [ex for batch in batches for ex in _examples(batch)]
    lengths = [ex["attention_mask"].shape[0] if "attention_mask" in ex else 0 for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])  # stable: equal lengths keep their order
    starts = [0, *split_points([lengths[i] for i in order], batch_size)]
    bucketed = [collate([examples[i] for i in order[a:b]]) for a, b in zip(starts, starts[1:])]

    # Original rows -> (example, position) -> bucketed rows.
    chosen: list[tuple[int, int]] = []
    start = 0
    for batch, rows in zip(batches, md_token_rows(batches, md_tokens, seed, tokens_per_example)):
        tokens = _tokens(batch, tokens_per_example)
        chosen += [(start + int(r) // tokens, int(r) % tokens) for r in rows]
        start += next(iter(batch.values())).shape[0]
    place = {example: (b, slot - a) for b, (a, end) in enumerate(zip(starts, starts[1:])) for slot, example in enumerate(order[a:end], a)}
    new_rows: list[list[int]] = [[] for _ in bucketed]
    for example, position in chosen:
        b, i = place[example]
        new_rows[b].append(i * _tokens(bucketed[b], tokens_per_example) + position)
    return Buckets(bucketed, [torch.tensor(sorted(r), dtype=torch.long) for r in new_rows])


# Packing: the recorded calls with their real tokens laid end to end in rows (block-diagonal attention).


@dataclass
class Pack:
    """One packed forward.

    calls[i]: layer i's call with packed tensors. real: flat indices of its real tokens. rows:
    flat indices of its MD tokens, first: of its examples' first tokens (the classifier's).
    """

    calls: list[LayerCall]
    real: torch.Tensor
    rows: torch.Tensor
    first: torch.Tensor


@dataclass
class Packing:
    """Packed forwards, and where their MD tokens and examples sit in the dense run's order:
    concatenating the packs' `rows` gives the dense MD tokens `md_order`, their `first`s the
    examples `example_order`."""

    packs: list[Pack]
    md_order: torch.Tensor
    example_order: torch.Tensor


def _mask_slot(calls: list[LayerCall]) -> tuple[tuple[str, int | str], torch.Tensor] | None:
    """Where the layer calls (one per batch) carry their [batch, 1, tokens, tokens] attention mask,
    ("arg", i) or ("kwarg", name), and one such mask (the form to build).

    None if no call has one (a batch without padding may get None there), or if a call carries
    another batch-shaped tensor, which packing would have to move too.
    """
    slot, like = None, None
    for call in calls:
        batch, tokens = call.hidden.shape[:2]
        places = [(("arg", i), v) for i, v in enumerate(call.args)] + [(("kwarg", k), v) for k, v in call.kwargs.items()]
        for place, value in places:
            if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch:
                continue
            if value.shape != (batch, 1, tokens, tokens) or slot not in (None, place):
                return None
            slot, like = place, value
    return None if slot is None else (slot, like)


def _first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, start) per example: first-fit decreasing into rows of `capacity` tokens."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for e in sorted(range(len(lengths)), key=lambda e: -lengths[e]):
        row = next((r for r, room in enumerate(free) if room >= lengths[e]), len(free))
        if row == len(free):
            free.append(capacity)
        place[e] = (row, capacity - free[row])
        free[row] -= lengths[e]
    return place


def _capacities(longest: int) -> list[int]:
    """Row lengths worth trying: the longest example up to 4x, in quarter steps (longer rows pack
    more tightly but pay more attention)."""
    return sorted({longest * k // 4 for k in range(4, 17)})


def _cost(rows: int, length: int, hidden_size: int) -> float:
    """A forward's work in token rows: the linear layers (12 h^2 a token) plus the attention
    scores and their weighted sum (2 h x length a token)."""
    return rows * length * (1 + length / (6 * hidden_size))


def _block_mask(segments: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[rows, 1, length, length] mask in `like`'s form (bool: attend; float: additive) that lets a
    token attend to the tokens of its own segment. Unused positions have segments of their own, so
    every query sees a key and no softmax row is empty (an empty one gives NaN, which would leak
    into real tokens through 0 x NaN in the next layer's attention)."""
    allowed = (segments[:, None, :, None] == segments[:, None, None, :])
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype).masked_fill(~allowed, torch.finfo(like.dtype).min)


def pack_calls(
    calls: list[list[LayerCall]], attention_masks: list[torch.Tensor], md_rows: list[torch.Tensor], max_rows: int
) -> Packing | None:
    """Pack the dense run's layer calls (calls[b][i], batch b padded as attention_masks[b], its
    MD tokens md_rows[b]) into forwards of at most `max_rows` rows of one length (`_capacities`).

    None when packing does not apply (left padding or holes in a mask, a call without a
    [batch, 1, tokens, tokens] mask) or costs no less than the buckets (`_cost`).
    """
    found = _mask_slot([layer_calls[0] for layer_calls in calls])
    if found is None:
        return None
    (where, key), like = found
    positions = [mask.shape[0] * mask.shape[1] for mask in attention_masks]
    lengths, sources = [], []
    offset = 0
    for mask, size in zip(attention_masks, positions):
        batch, tokens = mask.shape
        for e in range(batch):
            length = int(mask[e].sum())
            if not bool(mask[e, :length].all()):
                return None  # not right-padded
            lengths.append(length)
            sources.append(offset + e * tokens + torch.arange(length))
        offset += size
    hidden_size = calls[0][0].hidden.shape[-1]
    capacity, place = min(
        ((c, _first_fit(lengths, c)) for c in _capacities(max(lengths))),
        key=lambda option: _cost(1 + max(row for row, _ in option[1]), option[0], hidden_size),
    )
    num_rows = 1 + max(row for row, _ in place)
    bucketed = sum(_cost(mask.shape[0], mask.shape[1], hidden_size) for mask in attention_masks)
    if _cost(num_rows, capacity, hidden_size) >= bucketed:
        return None

    # The packed layout: global row r is row r % max_rows of forward r // max_rows.
    destination = torch.full((sum(positions),), -1, dtype=torch.long)  # dense flat position -> packed flat
    segments = torch.arange(num_rows * capacity).neg() - 1  # unused positions: a segment each
    for e, ((row, start), source) in enumerate(zip(place, sources)):
        target = row * capacity + start + torch.arange(len(source))
        destination[source] = target
        segments[target] = e
    firsts = torch.tensor([row * capacity + start for row, start in place])
    md_dense = torch.cat([rows + sum(positions[:b]) for b, rows in enumerate(md_rows)])
    md_packed = destination[md_dense]

    def gather(tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])
        packed = flat.new_zeros(num_rows * capacity, flat.shape[-1])
        real = (destination >= 0).to(flat.device)
        packed[destination.to(flat.device)[real]] = flat[real]
        return packed.view(num_rows, capacity, -1)

    mask = _block_mask(segments.view(num_rows, capacity), like).to(like.device)
    num_layers = len(calls[0])
    packed_layers = []
    for i in range(num_layers):
        hidden = gather([c[i].hidden for c in calls])
        heads = gather([c[i].heads for c in calls]) if calls[0][i].heads is not None else None
        output = gather([c[i].output for c in calls]) if calls[0][i].output is not None else None
        packed_layers.append((hidden, heads, output))

    real_flat = destination[destination >= 0]
    packs, md_order, example_order = [], [], []
    for start in range(0, num_rows, max_rows):
        stop = min(start + max_rows, num_rows)
        lo, hi = start * capacity, stop * capacity

        def local(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            inside = ((flat >= lo) & (flat < hi)).nonzero().flatten()
            return inside, flat[inside] - lo

        layer_calls = []
        for i, (hidden, heads, output) in enumerate(packed_layers):
            original = calls[0][i]
            args, kwargs = list(original.args), dict(original.kwargs)
            if where == "arg":
                args[key] = mask[start:stop]
            else:
                kwargs[key] = mask[start:stop]
            layer_calls.append(LayerCall(
                hidden[start:stop], tuple(args), kwargs,
                None if heads is None else heads[start:stop],
                None if output is None else output[start:stop],
            ))
        md_index, md_local = local(md_packed)
        example_index, first_local = local(firsts)
        packs.append(Pack(layer_calls, local(real_flat)[1], md_local, first_local))
        md_order.append(md_index)
        example_order.append(example_index)
    return Packing(packs, torch.cat(md_order), torch.cat(example_order))
