"""Token windows of text: how a causal language model is calibrated and how its perplexity is measured.

One protocol for both, the one the LLM pruning papers use (SparseGPT, Wanda, FLAP) for WikiText-2: a
split's texts are joined by blank lines ("\\n\\n") into one stream, tokenized once with the
tokenizer's own special tokens (a Llama tokenizer's BOS starts the stream, not each window), and cut
into consecutive non-overlapping windows of a fixed number of tokens; a last partial window is
dropped. Calibration draws its windows at random (seeded) among those of the calibration split;
evaluation reads the evaluation split's windows, each predicting its tokens 2..N from the ones
before it inside the window (no context carried over), and reports the perplexity
exp(total negative log-likelihood / predicted tokens). Calibration and evaluation come from
different splits, so no calibration token is ever scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import datasets
import torch
from torch import nn
from torch.nn import functional as F

from ..data import evaluation_max_length

SEPARATOR = "\n\n"
# A streamed calibration split is read only until it holds this many times the windows asked for, which
# are then drawn among them (a streamed corpus such as C4 never ends).
STREAM_POOL = 8
STREAM_ROWS = 256  # rows of a streamed split tokenized at a time
# Logits a perplexity forward may hold at once ([windows, tokens, vocabulary] floats: 128 MB), so a long
# window over a large vocabulary runs one window at a time.
EVAL_LOGITS = 1 << 25


def _texts(rows: Iterable[dict[str, Any]], column: str) -> Iterator[str]:
    """The `column` of each row; a missing value (None: an empty csv field) is an empty text, as the
    blank lines of WikiText are."""
    for row in rows:
        value = row[column]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"Column {column!r} holds {type(value).__name__} {value!r:.40}, not text: name the text column (--text-column).")
        yield value or ""


def token_stream(texts: Iterable[str], tokenizer: Any) -> torch.Tensor:
    """[tokens] int64: `texts` joined by blank lines and tokenized at once."""
    ids = tokenizer(SEPARATOR.join(texts), verbose=False)["input_ids"]  # verbose: no "longer than the model" warning
    return torch.tensor(ids, dtype=torch.long)


def check_window(length: int, config: Any) -> int:
    """`length`, or a ValueError when a model of `config` has fewer positions (GPT-2's learned positions would
    fail deep inside it): a window is the protocol, so it is never shortened silently."""
    fits = evaluation_max_length(length, config)
    if fits != length:
        raise ValueError(f"Windows of {length} tokens are longer than this {config.model_type} model's {fits} positions: "
                         f"use windows of at most {fits} tokens (--eval-window, --max-length).")
    return length


def cut_windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """[windows, length]: consecutive non-overlapping windows of `stream`, a last partial one dropped."""
    if length < 2:
        raise ValueError(f"A window of {length} token(s) predicts nothing: use windows of at least 2 tokens.")
    count = len(stream) // length
    return stream[: count * length].reshape(count, length)


def _streamed_windows(dataset: datasets.IterableDataset, column: str, tokenizer: Any, length: int, wanted: int) -> torch.Tensor:
    """Windows of a streamed split, read STREAM_ROWS rows at a time until `wanted` windows are there
    (or the stream ends). Each chunk is tokenized alone, the tokenizer's special tokens kept on the
    first only, so the stream reads as one text."""
    rows, parts, tokens, first = iter(dataset), [], 0, True
    while tokens < wanted * length and (chunk := list(islice(rows, STREAM_ROWS))):
        text = SEPARATOR.join(_texts(chunk, column)) if first else SEPARATOR + SEPARATOR.join(_texts(chunk, column))
        ids = tokenizer(text, verbose=False, add_special_tokens=first)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
        tokens, first = tokens + len(ids), False
    return cut_windows(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long), length)


def split_windows(dataset: Any, column: str, tokenizer: Any, length: int, wanted: int | None = None) -> torch.Tensor:
    """[windows, length]: every window of a split (a streamed one: up to `wanted` windows)."""
    if tokenizer is None:
        raise ValueError("A language model's text needs its tokenizer, and none was found with the model: give --processor.")
    if isinstance(dataset, datasets.IterableDataset):
        return _streamed_windows(dataset, column, tokenizer, length, wanted or 0)
    return cut_windows(token_stream(_texts(dataset, column), tokenizer), length)


def calibration_windows(dataset: Any, column: str, tokenizer: Any, length: int, num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`num` windows of `length` tokens drawn at random (seeded, without replacement) among the calibration
    split's (all of them when it holds fewer), in the drawn order, as unpadded examples."""
    windows = split_windows(dataset, column, tokenizer, length, num * STREAM_POOL)
    if len(windows) == 0:
        raise ValueError(f"The calibration text is shorter than one window of {length} tokens: give more text or a "
                         "shorter --max-length.")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:num]
    return [{"input_ids": window, "attention_mask": torch.ones_like(window)} for window in windows[order]]


def evaluation_windows(dataset: Any, column: str, tokenizer: Any, length: int, max_windows: int | None) -> torch.Tensor:
    """The evaluation split's windows of `length` tokens: all of them, or `max_windows` spread evenly
    over the whole text (the first, the last and equal steps between), so a capped evaluation still
    reads every part of the split."""
    windows = split_windows(dataset, column, tokenizer, length)
    if len(windows) == 0:
        raise ValueError(f"The evaluation text is shorter than one window of {length} tokens: give more text or a "
                         "shorter window.")
    return windows[spread(len(windows), max_windows)]


def spread(count: int, max_windows: int | None) -> torch.Tensor:
    """Which of `count` windows `evaluation_windows` keeps: all, or `max_windows` evenly spread (first and last in)."""
    if max_windows is None or max_windows >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, max_windows).round().long().unique()


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """[windows] float64: each window's summed negative log-likelihood in nats of its tokens 2..length, each
    predicted from those before it (per window, so that two models can be compared window by window)."""
    model.eval()
    device = next(model.parameters()).device
    vocabulary = model.get_output_embeddings().weight.shape[0]
    batch = max(1, EVAL_LOGITS // (windows.shape[1] * vocabulary))
    losses = []
    for chunk in windows.split(batch):
        ids = chunk.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        losses.append(nll.view(ids.shape[0], -1).double().sum(1).cpu())
    return torch.cat(losses)


def negative_log_likelihood(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, predicted tokens) of `model` over `windows`
    [windows, length]: each window predicts its tokens 2..length from those before it."""
    return float(window_losses(model, windows).sum()), windows.shape[0] * (windows.shape[1] - 1)
