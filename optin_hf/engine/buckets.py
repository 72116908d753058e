"""Length bucketing: re-batch the calibration examples by length so padding stays small.

The MD token subset is drawn over the examples in their given order (see `md_token_rows`),
so it names the same real tokens however the examples are batched; `Buckets.rows` puts
those tokens at their places in the bucketed batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import md_token_rows
from ..data import collate


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
