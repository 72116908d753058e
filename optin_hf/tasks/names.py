"""The tasks optin-hf runs and the transformers auto class of each: plain data, because the
CLI's parser reads it at every `optimum-cli` start."""

from __future__ import annotations

from typing import Any

MODEL_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "semantic-segmentation": "AutoModelForSemanticSegmentation",
}
IMAGE_TASKS = ("image-classification", "semantic-segmentation")
TASKS = tuple(MODEL_CLASSES)


def model_class(task: str) -> Any:
    """The transformers auto class that loads a model for `task`."""
    import transformers

    return getattr(transformers, MODEL_CLASSES[task])
