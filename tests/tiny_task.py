"""Tiny fine-tuning tasks on disk for the CLI, report and recipe tests: no download anywhere.

A word-level BERT tokenizer is built from an in-memory vocabulary; the "task" is which of three
marker words a sentence repeats, which a tiny BERT learns in a few seconds.
"""

from __future__ import annotations

import csv
import functools
import random
import types
from pathlib import Path

import datasets
import torch
from tiny import tiny_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MARKERS = ["red", "green", "blue"]
WORDS = SPECIAL + MARKERS + [f"w{i}" for i in range(120 - len(SPECIAL) - len(MARKERS))]
LABELS = ["red", "green", "blue"]


def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)}, model_max_length=64)


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(3)
        words = [f"w{rng.randrange(100)}" for _ in range(rng.randrange(6, 14))]
        for _ in range(3):
            words.insert(rng.randrange(len(words) + 1), MARKERS[label])
        rows.append((" ".join(words), label))
    return rows


def _labelled_bert():
    model = tiny_model("bert")
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    return model


@functools.cache
def _trained_weights(steps: int) -> dict[str, torch.Tensor]:
    """Trained once per test session and number of steps: training is most of a CLI test's time."""
    tok, model = tokenizer(), _labelled_bert()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = sentences(32, seed=1000 + step)
        batch = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([y for _, y in rows])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_text_model(folder: Path, steps: int = 40):
    """A tiny BERT classifier (labels named red/green/blue) and its tokenizer, saved to `folder`."""
    tok, model = tokenizer(), _labelled_bert()
    model.load_state_dict(_trained_weights(steps))
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def write_csv(path: Path, n: int = 96, seed: int = 0, label_names: bool = False) -> Path:
    """A csv with `text` and `label` columns (label as a name or an id)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text, label in sentences(n, seed):
            writer.writerow([text, LABELS[label] if label_names else label])
    return path


def stand_in_defaults(text_model_dir: Path, calls: list[str]) -> types.ModuleType:
    """A stand-in for `optin_hf.tasks.defaults` (built on another branch), with its API.

    The text defaults are the tiny model saved in `text_model_dir`; digits-vit is an untrained
    one-channel 8x8 ViT with `pixel_values` rows, as the real digits defaults have (it stands in for digits-resnet too),
    and digit-scenes-segformer an untrained one-channel SegFormer with `pixel_values` and `label` maps.
    """
    module = types.ModuleType("optin_hf.tasks.defaults")
    module.DEFAULT_NAMES = ("bbc-news", "tweet-sentiment", "digits-vit", "digits-resnet", "digit-scenes-segformer")

    def load_default(name: str) -> types.SimpleNamespace:
        calls.append(name)
        if name.startswith("digits-"):  # the image defaults: their data and task, not their architecture
            torch.manual_seed(0)
            config = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
            model = ViTForImageClassification(config).eval()
            g = torch.Generator().manual_seed(1)
            split = datasets.Dataset.from_dict(
                {"pixel_values": torch.rand(40, 1, 8, 8, generator=g).tolist(), "label": torch.randint(0, 10, (40,), generator=g).tolist()}
            )
            task, processor, labels = "image-classification", None, [str(i) for i in range(10)]
        elif name == "digit-scenes-segformer":
            torch.manual_seed(0)
            config = SegformerConfig(image_size=16, num_channels=1, num_encoder_blocks=1, depths=[1], sr_ratios=[2],
                                     hidden_sizes=[8], patch_sizes=[7], strides=[4], num_attention_heads=[1],
                                     mlp_ratios=[2], decoder_hidden_size=8, num_labels=11)
            model = SegformerForSemanticSegmentation(config).eval()
            g = torch.Generator().manual_seed(1)
            split = datasets.Dataset.from_dict(
                {"pixel_values": torch.rand(40, 1, 16, 16, generator=g).tolist(), "label": torch.randint(0, 11, (40, 16, 16), generator=g).tolist()}
            )
            task, processor, labels = "semantic-segmentation", None, ["background"] + [str(i) for i in range(10)]
        else:
            model = AutoModelForSequenceClassification.from_pretrained(text_model_dir).eval()
            rows = sentences(48, seed=3)
            split = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
            task, processor, labels = "text-classification", AutoTokenizer.from_pretrained(text_model_dir), LABELS
        return types.SimpleNamespace(name=name, task=task, model=model, processor=processor, calibration=split.select(range(16)),
                                     test=split.select(range(16, len(split))), label_names=labels, model_dir=text_model_dir,
                                     eval_window=None, max_eval_samples=None)

    module.load_default = load_default
    return module
