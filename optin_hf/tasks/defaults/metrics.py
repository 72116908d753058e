"""Plain accuracy, enough to check a default (or a pruned copy) against its target."""
from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def evaluate_accuracy(
    model: PreTrainedModel,
    dataset: Dataset,
    processor: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
) -> float:
    """Argmax accuracy over ``dataset``.

    Text is tokenized with the tokenizer's own ``model_max_length``, which the defaults set to their training length.
    """
    model.eval()
    rows = dataset.with_format("torch") if processor is None else dataset
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = rows[start : start + batch_size]
        if processor is None:
            inputs = {"pixel_values": batch["pixel_values"]}
        else:
            inputs = processor(batch["text"], truncation=True, padding=True, return_tensors="pt")
        logits = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits
        correct += (logits.argmax(-1).cpu() == torch.as_tensor(batch["label"])).sum().item()
    return correct / len(dataset)
