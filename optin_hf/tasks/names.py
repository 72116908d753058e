"""The tasks optin-hf runs and the transformers auto class of each: plain data, because the
CLI's parser reads it at every `optimum-cli` start."""

from __future__ import annotations

from typing import Any

MODEL_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "semantic-segmentation": "AutoModelForSemanticSegmentation",
    "text-generation": "AutoModelForCausalLM",
}
# A decoder-only language model, judged by its perplexity on held-out text (`tasks.windows`).
CAUSAL_LM = "text-generation"
CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")  # class name endings: LlamaForCausalLM, GPT2LMHeadModel
TEXT_TASKS = ("text-classification", CAUSAL_LM)  # the tasks whose processor is a tokenizer
# Mask2Former predicts a mask and a class per query, not per-pixel logits, so transformers files it
# under universal segmentation; its semantic map (ArchAdapter.logits_of) serves the same task.
UNIVERSAL_SEGMENTATION = "AutoModelForUniversalSegmentation"
SEGMENTATION_HEADS = ("ForSemanticSegmentation", "ForUniversalSegmentation")  # class name endings
IMAGE_TASKS = ("image-classification", "semantic-segmentation")
TASKS = tuple(MODEL_CLASSES)


def model_class(task: str, config: Any = None) -> Any:
    """The transformers auto class that loads a model for `task` (with `config`: the one that knows its type)."""
    import transformers

    auto = getattr(transformers, MODEL_CLASSES[task])
    if task == "semantic-segmentation" and config is not None and type(config) not in auto._model_mapping:
        return getattr(transformers, UNIVERSAL_SEGMENTATION)
    return auto
