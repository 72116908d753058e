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


ACCEPTED = (
    "a list of strings (or string pairs) with a tokenizer; dicts of tensors or lists, each one example or a batch "
    "(a tokenizer's BatchEncoding too), in a list, a DataLoader or any iterable; or a datasets.Dataset"
)


def _is_text(item: Any) -> bool:
    """A text or a pair of texts, which the tokenizer encodes."""
    pair = isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)
    return isinstance(item, str) or pair


def _not_an_item(item: Any, index: int) -> TypeError:
    if isinstance(item, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in item):
        return TypeError(
            f"Calibration item {index} is a {type(item).__name__} of tensors, as a TensorDataset yields: the inputs need "
            "names. Yield dicts instead, {'input_ids': ..., 'attention_mask': ...} for text or {'pixel_values': ...} for "
            "images (e.g. a DataLoader over a list of such dicts)."
        )
    return TypeError(f"Calibration item {index} is {type(item).__name__} {item!r:.60}; pass {ACCEPTED}.")


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


def _column(value: Any, key: str, index: int) -> torch.Tensor | list[torch.Tensor]:
    """One input of a calibration item as a tensor, or one tensor per example when a batch's lists
    are ragged (a tokenizer's output without padding)."""
    try:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple, torch.Tensor)) for v in value):
            rows = [torch.as_tensor(v) for v in value]
            return torch.stack(rows) if len({r.shape for r in rows}) == 1 else rows
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"Calibration item {index}: {key!r} must be a tensor or a (nested) list of numbers, not {type(value).__name__} ({err})."
        ) from err


def _examples_from_mapping(batch: Mapping[str, Any], index: int, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Split a dict (one example, or a batch along dim 0) into single examples; `index` names it in errors."""
    tensors = {k: _column(v, k, index) for k, v in batch.items() if k in MODEL_INPUTS}
    if not tensors:
        raise ValueError(f"Calibration item {index} has none of the model inputs {list(MODEL_INPUTS)}; got {sorted(batch)}.")
    first = tensors.get("pixel_values", next(iter(tensors.values())))
    ragged = any(isinstance(v, list) for v in tensors.values())
    batched = ragged or first.dim() == (4 if "pixel_values" in tensors else 2)
    if labels and (key := _label_key(batch)) is not None:
        tensors["labels"] = _labels(batch[key])
    if not batched:
        return [tensors]
    sizes = {k: len(v) if isinstance(v, list) or v.dim() else 1 for k, v in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Calibration item {index} is a batch whose inputs hold different numbers of examples: {sizes}.")
    return [{k: v[i] for k, v in tensors.items()} for i in range(sizes[next(iter(tensors))])]


def _check_examples(examples: list[dict[str, torch.Tensor]]) -> None:
    """Refuse examples that disagree in their inputs or shapes, or hold no real token, naming the example."""
    keys = sorted(k for k in examples[0] if k in MODEL_INPUTS)
    for i, ex in enumerate(examples):
        if (own := sorted(k for k in ex if k in MODEL_INPUTS)) != keys:
            raise ValueError(
                f"Calibration example {i} has inputs {own} but example 0 has {keys}: give every example the same "
                "inputs (e.g. attention_mask on all of them or on none)."
            )
        if "pixel_values" in ex and (ex["pixel_values"].dim() != 3 or ex["pixel_values"].shape != examples[0]["pixel_values"].shape):
            raise ValueError(
                f"Calibration example {i}: pixel_values has shape {tuple(ex['pixel_values'].shape)}; every image must be "
                f"[channels, height, width], all of one size (example 0: {tuple(examples[0]['pixel_values'].shape)})."
            )
        ids = ex.get("input_ids")
        if ids is None:
            continue
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"Calibration example {i}: input_ids must be integer token ids of shape [tokens] (a batch: [examples, "
                f"tokens]); got {ids.dtype} of shape {tuple(ids.shape)}."
            )
        for key in ("attention_mask", "token_type_ids"):
            if key in ex and ex[key].shape != ids.shape:
                raise ValueError(
                    f"Calibration example {i}: {key} has shape {tuple(ex[key].shape)} but input_ids {tuple(ids.shape)}: "
                    "they must match token for token."
                )
        if (int(ex["attention_mask"].count_nonzero()) if "attention_mask" in ex else ids.numel()) == 0:
            raise ValueError(
                f"Calibration example {i} has no real token (it is empty, or its attention_mask is all zero): drop it "
                "from the calibration data."
            )


def check_inputs(batches: list[dict[str, torch.Tensor]], vision: bool, model_type: str) -> None:
    """Refuse images for a text model and text for a vision model before any forward pass, where the
    error would come from deep inside transformers."""
    given = sorted(k for k in batches[0] if k in MODEL_INPUTS)
    if vision and given != ["pixel_values"]:
        raise ValueError(
            f"The calibration data has {given}, but this {model_type} model takes images only, as pixel_values "
            "[channels, height, width] from an image processor."
        )
    if not vision and ("input_ids" not in given or "pixel_values" in given):
        raise ValueError(
            f"The calibration data has {given}, but this {model_type} model takes text, as input_ids (with "
            "attention_mask) from a tokenizer."
        )


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
        return [_examples_from_mapping(row, i, labels)[0] for i, row in enumerate(data.with_format("torch"))]
    if isinstance(data, Mapping):
        return _examples_from_mapping(data, 0, labels)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"Calibration data of type {type(data).__name__} is not supported: pass {ACCEPTED}.")
    items = list(data)
    if items and all(_is_text(item) for item in items):
        return _tokenize(items, tokenizer, max_length)
    examples = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise _not_an_item(item, index)
        examples += _examples_from_mapping(item, index, labels)
    return examples


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
    _check_examples(examples)
    if "input_ids" in examples[0]:
        examples = [{k: v[..., :max_length] if k in MODEL_INPUTS else v for k, v in ex.items()} for ex in examples]
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def average_length(batches: list[dict[str, torch.Tensor]]) -> float | None:
    """Mean unpadded token count of text batches; None for images (their length is fixed)."""
    if "attention_mask" not in batches[0]:
        return None
    lengths = torch.cat([b["attention_mask"].sum(-1) for b in batches]).float()
    return float(lengths.mean())
