"""Tiny models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

TEXT = dict(vocab_size=120, max_position_embeddings=64, num_labels=3, initializer_range=0.2)
VISION = dict(image_size=16, patch_size=4, num_channels=3, num_labels=5, initializer_range=0.2)
BLOCK = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)

BUILDERS = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**TEXT, **BLOCK)),
    "bert-encoder": lambda: BertModel(BertConfig(**TEXT, **BLOCK)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**TEXT, **BLOCK, pad_token_id=1)),
    "distilbert": lambda: DistilBertForSequenceClassification(
        DistilBertConfig(**TEXT, dim=32, n_layers=3, n_heads=4, hidden_dim=48)
    ),
    "vit": lambda: ViTForImageClassification(ViTConfig(**VISION, **BLOCK)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(**VISION, **BLOCK)),
}
ARCHS = ["bert", "roberta", "distilbert", "vit", "deit"]


def tiny_model(name: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    model.config._attn_implementation = attn
    return model.eval()


def is_vision(name: str) -> bool:
    return name in ("vit", "deit")


def calibration(name: str, n: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A list of single examples; text ones have different lengths so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    if is_vision(name):
        return [{"pixel_values": torch.randn(3, 16, 16, generator=g)} for _ in range(n)]
    lengths = torch.randint(6, 20, (n,), generator=g)
    return [{"input_ids": torch.randint(5, 120, (int(k),), generator=g)} for k in lengths]


def batch(name: str, seed: int = 2) -> dict[str, torch.Tensor]:
    """One padded batch of 3 for comparing outputs."""
    g = torch.Generator().manual_seed(seed)
    if is_vision(name):
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    ids = torch.randint(5, 120, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_images(n: int, seed: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """`n` random [3, size, size] images as calibration examples (the vision families' tests)."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, size, size, generator=g)} for _ in range(n)]


def flop_macs(module: torch.nn.Module, pixels: torch.Tensor) -> float:
    """Torch's count of `module`'s matmuls and convs on `pixels`, in MACs (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(pixels)
    return counter.get_total_flops() / 2


def tiny_swin(seed: int = 0) -> SwinForImageClassification:
    """Two stages of different widths: 2 heads over 16 features, then 4 heads over 32."""
    torch.manual_seed(seed)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        num_labels=5, initializer_range=0.2)
    model = SwinForImageClassification(config)
    model.config._attn_implementation = "eager"  # the CPU sdpa kernel is invisible to the FLOP counter
    for stage in model.swin.encoder.layers:  # a trained model's bias tables are not zero
        for block in stage.blocks:
            torch.nn.init.normal_(block.attention.relative_position_bias.relative_position_bias_table, std=1.0)
    return model.eval()


def tiny_cnn(family: str, seed: int = 0) -> nn.Module:
    """A tiny trained-looking CNN ("resnet" or "convnext"): random BatchNorm statistics, so eval-mode BatchNorm
    is not the identity. The ResNet's stem is kept narrow so that its fixed MACs leave room for a 0.6 budget."""
    torch.manual_seed(seed)
    if family == "resnet":
        config = ResNetConfig(embedding_size=4, hidden_sizes=[32, 64], depths=[2, 1], num_labels=5, image_size=32)
        model = ResNetForImageClassification(config)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.normal_(module.weight, 1.0, 0.2)
                nn.init.normal_(module.bias, 0.0, 0.2)
    else:
        config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], num_labels=5, image_size=32,
                                layer_scale_init_value=0.5)
        model = ConvNextForImageClassification(config)
    return model.eval()


def tiny_segformer(seed: int = 0, num_labels: int = 4) -> SegformerForSemanticSegmentation:
    """Two stages: 1 head of 8 (keys and values on a map reduced 2x2), then 2 heads of 8; FFNs 32 wide."""
    torch.manual_seed(seed)
    config = SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 2], decoder_hidden_size=16, num_labels=num_labels,
        initializer_range=0.2, drop_path_rate=0.0,
    )
    model = SegformerForSemanticSegmentation(config)
    model.config._attn_implementation = "eager"  # the CPU sdpa kernel is invisible to the FLOP counter
    return model.eval()


def tiny_dinov2(seed: int = 0) -> Dinov2ForImageClassification:
    """ViT's tiny sizes on a 32x32 image, with trained-looking layer scales (the config's constant is 1.0, which
    would hide a layer scale left out of the adapter's pieces)."""
    torch.manual_seed(seed)
    config = Dinov2Config(image_size=32, patch_size=4, num_channels=3, num_labels=5, initializer_range=0.2,
                          hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2)
    model = Dinov2ForImageClassification(config)
    model.config._attn_implementation = "eager"  # the CPU sdpa kernel is invisible to the FLOP counter
    for layer in model.dinov2.encoder.layer:
        for scale in (layer.layer_scale1, layer.layer_scale2):
            torch.nn.init.uniform_(scale.lambda1, 0.2, 1.5)
    return model.eval()


# Four stages on a 48x48 image: 12x12, 6x6, 3x3 and 2x2 patch maps; the backbone runs the last two padded to one
# whole 4x4 window (a Swin classifier would shrink the window instead).
MASK2FORMER_SWIN = dict(image_size=48, patch_size=4, embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                        window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"], initializer_range=0.2)
MASK2FORMER_DECODER = dict(num_labels=5, num_queries=6, hidden_dim=32, mask_feature_size=32, feature_size=32,
                           encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32,
                           num_attention_heads=2)


def tiny_mask2former(seed: int = 0, num_labels: int = MASK2FORMER_DECODER["num_labels"]) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    config = Mask2FormerConfig(backbone_config=SwinConfig(**MASK2FORMER_SWIN), **{**MASK2FORMER_DECODER, "num_labels": num_labels})
    model = Mask2FormerForUniversalSegmentation(config)
    mask2former_eager(model)
    for stage in mask2former_backbone(model).swin.encoder.layers:  # a trained model's bias tables are not zero
        for block in stage.blocks:
            torch.nn.init.normal_(block.attention.relative_position_bias.relative_position_bias_table, std=1.0)
    return model.eval()


def mask2former_backbone(model: nn.Module) -> nn.Module:
    """The Swin backbone: what optin-hf prunes and counts of a Mask2Former."""
    return model.model.pixel_level_module.encoder


def mask2former_eager(model: nn.Module) -> None:
    """The CPU sdpa kernel is invisible to the FLOP counter (and differs from eager in rounding)."""
    model.config._attn_implementation = "eager"
    mask2former_backbone(model).config._attn_implementation = "eager"


def eager(model: nn.Module) -> None:
    """Eager attention wherever the family has it: loads default to sdpa, which rounds differently."""
    model.config._attn_implementation = "eager"


LAYER = re.compile(r"\.layers?\.\d+$")
TEXT_MACS_LEN = 11  # tokens of the one example a text family's MACs are counted on


def text_flop_macs(model: nn.Module) -> float:
    """Torch's count of a text encoder's layers (no embedding lookup, no pooler: what `count_macs` counts), in MACs,
    on one example of TEXT_MACS_LEN tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = torch.randint(5, 100, (1, TEXT_MACS_LEN), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=inputs)
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if LAYER.search(name)) / 2


# Decoder LLMs: 4 query heads in 2 KV groups (g = 2), so a unit (one KV group) differs from a query head.
LLM = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=48, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
           pad_token_id=0)
LLM_BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLM, tie_word_embeddings=True)),  # tied, as SmolLM2's
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLM)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLM)),  # q/k/v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**LLM, head_dim=12)),  # q_norm/k_norm; heads x head_dim != hidden
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64,
                                               initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)),
}


def tiny_llm(name: str, seed: int = 0) -> nn.Module:
    """A tiny causal LM (`LLM_BUILDERS`) in eager attention, with trained-looking norms (random gains and, for
    GPT-2, biases): unit gains would hide a norm applied to the wrong features."""
    torch.manual_seed(seed)
    model = LLM_BUILDERS[name]()
    eager(model)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                nn.init.normal_(module.bias, 0.0, 0.2)
    for path, param in model.named_parameters():
        if path.endswith(".bias") and ".ln_" not in path:
            nn.init.normal_(param, 0.0, 0.2)
    return model.eval()


def llm_flop_macs(model: nn.Module) -> float:
    """Torch's count of a causal LM's forward on one example of TEXT_MACS_LEN tokens, LM head included, per token
    (what `count_macs(model, TEXT_MACS_LEN)` counts for a decoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = torch.randint(5, 100, (1, TEXT_MACS_LEN), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=inputs, use_cache=False)
    return counter.get_total_flops() / 2 / TEXT_MACS_LEN


@dataclass(frozen=True)
class Family:
    """A family's tiny model and data, as the tests use them.

    examples(n, seed): calibration examples; inputs: one batch to compare outputs on; settings: the OptinConfig
    fields its tests prune with; eager: sets eager attention on a loaded model; seq_len: what `count_macs` takes
    (None: it follows the image size); torch_macs: torch's FLOP counter on what `count_macs` counts, in MACs.
    """

    build: Callable[[], nn.Module]
    examples: Callable[[int, int], list[dict[str, torch.Tensor]]]
    inputs: dict[str, torch.Tensor]
    settings: dict
    torch_macs: Callable[[nn.Module], float]
    seq_len: int | None = None
    eager: Callable[[nn.Module], None] = eager


PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
MASK2FORMER_PIXELS = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
# The families' tests prune with OPTIN itself: named, since the default (importance="auto") searches six recipes.
VISION_SETTINGS = dict(mac_constraint=0.6, importance="optin", reconstruct="none", num_samples=4, batch_size=2)
TEXT_SETTINGS = dict(mac_constraint=0.6, importance="optin", reconstruct="none", num_samples=4, batch_size=2, neuron_group_size=16)


def _text(name: str, build: Callable[[], nn.Module]) -> Family:
    return Family(build, lambda n, seed: calibration(name, n, seed), batch(name), TEXT_SETTINGS, text_flop_macs, TEXT_MACS_LEN)


def _vision(build: Callable[[], nn.Module], settings: dict, pixels: torch.Tensor = PIXELS,
            encoder: Callable[[nn.Module], nn.Module] = lambda model: model.base_model,
            eager_attention: Callable[[nn.Module], None] = eager) -> Family:
    size = pixels.shape[-1]
    return Family(build, lambda n, seed: random_images(n, seed, size), {"pixel_values": pixels}, settings,
                  lambda model: flop_macs(encoder(model), pixels[:1]), None, eager_attention)


FAMILIES: dict[str, Family] = {
    **{name: _text(name, partial(tiny_model, name)) for name in ("bert", "roberta", "distilbert")},
    **{name: _vision(partial(tiny_model, name), {**VISION_SETTINGS, "neuron_group_size": 16}, batch(name)["pixel_values"])
       for name in ("vit", "deit")},
    "swin": _vision(tiny_swin, {**VISION_SETTINGS, "neuron_group_size": 16}),
    "resnet": _vision(partial(tiny_cnn, "resnet"), {**VISION_SETTINGS, "neuron_group_size": 8}),
    "convnext": _vision(partial(tiny_cnn, "convnext"), {**VISION_SETTINGS, "neuron_group_size": 8}),
    "segformer": _vision(tiny_segformer, {**VISION_SETTINGS, "neuron_group_size": 8, "md_tokens": 64, "neurons_multiple_of": 1}),
    "dinov2": _vision(tiny_dinov2, {**VISION_SETTINGS, "neuron_group_size": 16}),
    **{name: Family(partial(tiny_llm, name), lambda n, seed: calibration("llm", n, seed), batch("llm"), TEXT_SETTINGS,
                    llm_flop_macs, TEXT_MACS_LEN) for name in LLM_BUILDERS},
    "mask2former": _vision(tiny_mask2former, {**VISION_SETTINGS, "num_samples": 2, "neuron_group_size": 32},
                           MASK2FORMER_PIXELS, mask2former_backbone, mask2former_eager),
}


def family(model_type: str) -> Family:
    """The tiny family of a registered `model_type`. One without an entry in FAMILIES is built as a sequence
    classifier from its own config class with BERT's tiny sizes: a family laid out as BERT (ELECTRA, say)
    joins the tests by its registration alone; another adds its entry above."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **TEXT, **BLOCK))
        eager(model)
        return model.eval()

    return _text(model_type, build)
