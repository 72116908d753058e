"""Calibration data in any accepted form -> a list of padded batches of model inputs (and, on
request, the examples' `labels`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
# Detected in this order when no column is named: sentence pairs first, so QNLI's (question,
# sentence) is never read as single sentences.
TEXT_PAIRS = (("premise", "hypothesis"), ("question1", "question2"), ("question", "sentence"), ("sentence1", "sentence2"))
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_KEYS = ("labels", "label")  # the first one present is kept as `labels`


def _label_key(keys) -> str | None:
    return next((k for k in LABEL_KEYS if k in keys), None)


def _labels(values: Any) -> torch.Tensor:
    first = values[0] if isinstance(values, (list, tuple)) and values else values
    if isinstance(first, str):
        raise ValueError(
            f"Calibration labels must be class ids in the model's order (or scores for regression), not names such as "
            f"{first!r}: map them with model.config.label2id."
        )
    return torch.as_tensor(values)


def _examples_from_mapping(batch: Mapping[str, Any], labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Split a dict of tensors (one example, or a batch along dim 0) into single examples."""
    tensors = {k: torch.as_tensor(v) for k, v in batch.items() if k in MODEL_INPUTS}
    if not tensors:
        raise ValueError(f"A calibration item has none of the model inputs {list(MODEL_INPUTS)}; got {sorted(batch)}.")
    batched = tensors["pixel_values"].dim() == 4 if "pixel_values" in tensors else next(iter(tensors.values())).dim() == 2
    if labels and (key := _label_key(batch)) is not None:
        tensors["labels"] = _labels(batch[key])
    if not batched:
        return [tensors]
    n = next(iter(tensors.values())).shape[0]
    return [{k: v[i] for k, v in tensors.items()} for i in range(n)]


def text_columns(names: list[str]) -> tuple[str, ...]:
    """The (text, text_pair) or (text,) columns among `names`, pairs first; () when there are none."""
    pair = next((p for p in TEXT_PAIRS if set(p) <= set(names)), ())
    return pair or next(((c,) for c in TEXT_COLUMNS if c in names), ())


def _tokenize(texts: list, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        raise ValueError("Calibration data is text: pass a tokenizer (OptinPruner.compute_scores(model, data, tokenizer=...)).")
    pairs = isinstance(texts[0], (tuple, list))
    encoded = tokenizer(
        [t[0] for t in texts] if pairs else list(texts),
        [t[1] for t in texts] if pairs else None,
        truncation=True,
        max_length=max_length,
    )
    keys = [k for k in encoded if k in MODEL_INPUTS]
    return [{k: torch.tensor(encoded[k][i]) for k in keys} for i in range(len(texts))]


def _examples(data: Any, tokenizer, max_length: int, labels: bool) -> list[dict[str, torch.Tensor]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(data, datasets.Dataset):
        columns = data.column_names
        if not any(c in columns for c in MODEL_INPUTS):
            inputs = text_columns(columns)
            if not inputs:
                raise ValueError(
                    f"Dataset has neither model inputs {list(MODEL_INPUTS)} nor a text column {list(TEXT_COLUMNS)} "
                    f"or pair {[list(p) for p in TEXT_PAIRS]}: {columns}."
                )
            texts = list(zip(data[inputs[0]], data[inputs[1]])) if len(inputs) == 2 else list(data[inputs[0]])
            examples = _tokenize(texts, tokenizer, max_length)
            if labels and (key := _label_key(columns)) is not None:
                for ex, label in zip(examples, _labels(list(data[key]))):
                    ex["labels"] = label
            return examples
        return [_examples_from_mapping(row, labels)[0] for row in data.with_format("torch")]
    if isinstance(data, Mapping):
        return _examples_from_mapping(data, labels)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"Calibration data of type {type(data).__name__} is not supported: pass a list of dicts of tensors, "
            "a DataLoader, a datasets.Dataset, or a list of strings with a tokenizer."
        )
    items = list(data)
    if items and isinstance(items[0], (str, tuple)):
        return _tokenize(items, tokenizer, max_length)
    return [ex for item in items for ex in _examples_from_mapping(item, labels)]


def _pad(values: list[torch.Tensor], key: str) -> torch.Tensor:
    if key in ("pixel_values", "labels"):
        return torch.stack(values)
    length = max(v.shape[-1] for v in values)
    out = torch.zeros(len(values), length, dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[i, : v.shape[-1]] = v
    return out


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad text examples to the longest in the batch (attention_mask marks the real tokens)."""
    keys = examples[0].keys()
    batch = {k: _pad([ex[k] for ex in examples], k) for k in keys}
    if "input_ids" in batch and "attention_mask" not in batch:
        batch["attention_mask"] = _pad([torch.ones_like(ex["input_ids"]) for ex in examples], "attention_mask")
    return batch


def prepare_calibration(
    data: Any, tokenizer=None, *, num_samples: int, batch_size: int, max_length: int, labels: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The first `num_samples` examples of `data`, as padded batches of at most `batch_size`.

    Only model inputs are kept, so the batches can be passed as `model(**batch)`. `labels=True`
    also keeps each example's `labels` (or `label`) as `labels: [batch]`, when every example has one.
    """
    examples = _examples(data, tokenizer, max_length, labels)[:num_samples] if data is not None else []
    if not examples:
        raise ValueError("The calibration data is empty: pass at least one example.")
    labelled = sum("labels" in ex for ex in examples)
    if 0 < labelled < len(examples):
        raise ValueError(f"{labelled} of the {len(examples)} calibration examples have a label: label all of them or none.")
    if "input_ids" in examples[0]:
        examples = [{k: v[..., :max_length] if k in MODEL_INPUTS else v for k, v in ex.items()} for ex in examples]
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def average_length(batches: list[dict[str, torch.Tensor]]) -> float | None:
    """Mean unpadded token count of text batches; None for images (their length is fixed)."""
    if "attention_mask" not in batches[0]:
        return None
    lengths = torch.cat([b["attention_mask"].sum(-1) for b in batches]).float()
    return float(lengths.mean())
