"""Calibration data in any accepted form -> a list of padded batches of model inputs (and, on
request, the examples' `labels`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:  # None, a dict: torch's "Could not infer dtype of NoneType"
        raise ValueError(
            f"Calibration labels must be class ids (or regression targets), not {values!r:.60} ({err}): label every "
            "example, or pass none."
        ) from err


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
    """Refuse examples that disagree in their inputs, shapes or dtypes, naming the example."""
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
        if "pixel_values" in ex and ex["pixel_values"].numel() == 0:
            raise ValueError(f"Calibration example {i}: pixel_values of shape {tuple(ex['pixel_values'].shape)} is an empty image.")
        if "pixel_values" in ex and not ex["pixel_values"].is_floating_point():
            raise ValueError(
                f"Calibration example {i}: pixel_values is {ex['pixel_values'].dtype}; pass the float tensors an image "
                "processor gives (rescaled and normalized), not raw pixels."
            )
        ids = ex.get("input_ids")
        if ids is None:
            continue
        for key in ("input_ids", "token_type_ids"):
            if key in ex and (ex[key].dim() != 1 or ex[key].is_floating_point() or ex[key].dtype == torch.bool):
                raise ValueError(
                    f"Calibration example {i}: {key} must be integer ids of shape [tokens] (a batch: [examples, "
                    f"tokens]); got {ex[key].dtype} of shape {tuple(ex[key].shape)}."
                )
        for key in ("attention_mask", "token_type_ids"):
            if key in ex and ex[key].shape != ids.shape:
                raise ValueError(
                    f"Calibration example {i}: {key} has shape {tuple(ex[key].shape)} but input_ids {tuple(ids.shape)}: "
                    "they must match token for token."
                )


def _first(values: torch.Tensor, bad: torch.Tensor) -> str:
    """The first of `values` where `bad` holds, as an error shows it (a whole float as an int)."""
    value = values[bad][0].item()
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _check_values(examples: list[dict[str, torch.Tensor]]) -> None:
    """Refuse, naming the example, values that no model reads as meant (after truncation, as the model
    gets them): a NaN image (else found only in the scores, after scoring), a negative id (an
    IndexError inside the model), an attention mask other than 1 (real token) / 0 (padding) (2s
    count each token twice in the MAC length, a -1 fails deep inside the engine), or no real token."""
    for i, ex in enumerate(examples):
        if "pixel_values" in ex and (bad := int((~torch.isfinite(ex["pixel_values"])).sum())):
            raise ValueError(f"Calibration example {i}: pixel_values holds {bad} NaN/inf value(s): fix or drop that image.")
        for key in ("input_ids", "token_type_ids"):
            if key in ex and (bad := ex[key] < 0).any():
                raise ValueError(
                    f"Calibration example {i}: {key} holds {_first(ex[key], bad)}; ids are never negative (pad with the "
                    "tokenizer's pad id, and attention_mask 0 there)."
                )
        if "attention_mask" in ex and (bad := (ex["attention_mask"] != 0) & (ex["attention_mask"] != 1)).any():
            raise ValueError(
                f"Calibration example {i}: attention_mask holds {_first(ex['attention_mask'], bad)}; it must be 1 for "
                "each real token and 0 for padding, nothing else."
            )
        if "input_ids" in ex and (int(ex["attention_mask"].count_nonzero()) if "attention_mask" in ex else ex["input_ids"].numel()) == 0:
            raise ValueError(
                f"Calibration example {i} has no real token (it is empty, or its attention_mask is all zero): drop it "
                "from the calibration data."
            )


# Families whose position ids start at pad_token_id + 1 (transformers' RobertaEmbeddings), so that
# max_position_embeddings - pad_token_id - 1 tokens fit (514 -> 512 for roberta-base).
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def _max_tokens(config) -> int | None:
    """The most tokens one example may hold in a text model of `config` (None: no fixed limit)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    return positions - ((config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0)


def evaluation_max_length(max_length: int | None, config) -> int | None:
    """`max_length`, lowered to what the model of `config` holds. Evaluation truncates there, as any pipeline
    does, so that every held-out row is measured; calibration examples are refused instead (`_check_fits`),
    since their length sets the MAC budget."""
    limit = _max_tokens(config)
    return limit if limit is not None and (max_length is None or max_length > limit) else max_length


def _check_fits(examples: list[dict[str, torch.Tensor]], config, max_length: int) -> None:
    """Refuse, naming the example, what would fail deep inside the model of `config`: a token id or
    type beyond its embeddings, more tokens than its positions, a class label it does not have."""
    model = f"this {config.model_type} model"
    limit = _max_tokens(config)
    for i, ex in enumerate(examples):
        for key, attr, what in (("input_ids", "vocab_size", "vocabulary"), ("token_type_ids", "type_vocab_size", "token types")):
            size = getattr(config, attr, None)
            if key in ex and size is not None and (bad := ex[key] >= size).any():
                raise ValueError(
                    f"Calibration example {i}: {key} holds {_first(ex[key], bad)}, outside the {what} of {model} "
                    f"({attr}={size}: ids 0 to {size - 1}); tokenize with the model's own tokenizer."
                )
        if "input_ids" in ex and limit is not None and (n := ex["input_ids"].shape[-1]) > limit:
            raise ValueError(
                f"Calibration example {i} has {n} tokens at max_length={max_length}, but {model} has positions for "
                f"{limit}: truncate to at most {limit} (--max-length {limit}, OptinConfig(max_length={limit}))."
            )
        if "labels" in ex and ex["labels"].dim() == 0:
            _check_label(i, ex["labels"], config.num_labels)


def _check_label(i: int, label: torch.Tensor, num_labels: int) -> None:
    """A class id in [0, num_labels), or a finite target for a regression model (num_labels == 1)."""
    value = label.item()
    if num_labels == 1:
        if not math.isfinite(value):
            raise ValueError(f"Calibration example {i}: label {value} is not a finite regression target.")
    elif not float(value).is_integer() or not 0 <= value < num_labels:
        unlabeled = " (-1 marks an unlabeled example, as in GLUE's test splits: use a labeled split)" if value == -1 else ""
        raise ValueError(f"Calibration example {i}: label {value} is not a class id of this model (0 to {num_labels - 1}){unlabeled}.")


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


def encode_texts(
    tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None, name: str = "Calibration text {i}"
) -> list[dict[str, torch.Tensor]]:
    """One dict of tensors per text (or pair), unpadded. A text that is missing, empty, or gives no token
    besides the special ones ([CLS] [SEP]) is refused, named by `name` (with its index as {i}): the model
    would be run on those alone."""
    for i, text in enumerate(texts if pairs is None else [*zip(texts, pairs)]):
        for part in (text,) if pairs is None else text:
            if not isinstance(part, str) or not part.strip():
                what = "missing (None: an empty csv field?)" if part is None else f"empty ({part!r})"
                raise ValueError(f"{name.format(i=i)} is {what}: drop it from the data.")
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    for i, special in enumerate(encoded["special_tokens_mask"]):
        if all(special):
            raise ValueError(
                f"{name.format(i=i)} ({texts[i]!r:.60}) gives no token besides the tokenizer's special ones at max_length="
                f"{max_length}: drop it from the data."
            )
    keys = [k for k in encoded if k in MODEL_INPUTS]
    return [{k: torch.tensor(encoded[k][i]) for k in keys} for i in range(len(texts))]


def _tokenize(texts: list, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        raise ValueError("Calibration data is text: pass a tokenizer (OptinPruner.compute_scores(model, data, tokenizer=...)).")
    if isinstance(texts[0], (tuple, list)):
        return encode_texts(tokenizer, [t[0] for t in texts], [t[1] for t in texts], max_length)
    return encode_texts(tokenizer, list(texts), None, max_length)


def _is_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, datasets.Dataset)


def _examples(data: Any, tokenizer, max_length: int, labels: bool) -> list[dict[str, torch.Tensor]]:
    if _is_dataset(data):
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


def replayable(data: Any) -> Any:
    """`data` such that every read gives the same examples: scoring, the scoring plan and the refit each
    read it from the start, so a generator (one read only) or a loader that may shuffle is read once
    into a list here. Lists, dicts and datasets are returned as they are."""
    if data is None or isinstance(data, (Sequence, Mapping)) or _is_dataset(data) or not isinstance(data, Iterable):
        return data
    return list(data)


def prepare_calibration(
    data: Any,
    tokenizer=None,
    *,
    num_samples: int,
    batch_size: int,
    max_length: int,
    labels: bool = False,
    config=None,
) -> list[dict[str, torch.Tensor]]:
    """The first `num_samples` examples of `data`, as padded batches of at most `batch_size`.

    Only model inputs are kept, so the batches can be passed as `model(**batch)`. `labels=True`
    also keeps each example's `labels` (or `label`) as `labels: [batch]`, when every example has one.
    With the model's `config`, token ids, token types, lengths and class labels are checked against it.
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
    _check_values(examples)
    if config is not None:
        _check_fits(examples, config, max_length)
    if "attention_mask" in examples[0]:  # one dtype for all: a bool or float mask of 0/1 reads as the same ints
        examples = [{**ex, "attention_mask": ex["attention_mask"].long()} for ex in examples]
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def image_size_of(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int] | None:
    """(height, width) of calibration images, all of one size (`_check_examples` refuses mixed sizes);
    None for text. A vision model's MACs and tokens are counted at it."""
    if "pixel_values" not in batches[0]:
        return None
    height, width = batches[0]["pixel_values"].shape[-2:]
    return int(height), int(width)


def average_length(batches: list[dict[str, torch.Tensor]]) -> float | None:
    """Mean unpadded token count of text batches; None for images (their length is fixed)."""
    if "attention_mask" not in batches[0]:
        return None
    lengths = torch.cat([b["attention_mask"].sum(-1) for b in batches]).float()
    return float(lengths.mean())
