"""The adapter registry and the geometry adapters describe (what a unit owns and costs)."""

import dataclasses

import pytest
import torch
from tiny import BLOCK, TEXT, batch, calibration, flop_macs, output, tiny_model
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

import optin_hf.arch
from optin_hf import ArchAdapter, OptinConfig, OptinPruner, count_macs, register_adapter
from optin_hf.arch import Capabilities, get_adapter
from optin_hf.arch.base import num_features, select_features
from optin_hf.arch.bert import BERT
from optin_hf.data import prepare_calibration
from optin_hf.engine.fast import FastRunner
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.engine.run import candidate_masks
from optin_hf.hooks import apply_masks
from optin_hf.slim import slim_model


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into its own copy of the registry."""
    monkeypatch.setattr(optin_hf.arch, "ADAPTERS", dict(optin_hf.arch.ADAPTERS))


def electra() -> ElectraForSequenceClassification:
    torch.manual_seed(0)
    model = ElectraForSequenceClassification(ElectraConfig(**TEXT, **BLOCK, embedding_size=32))
    model.config._attn_implementation = "eager"
    return model.eval()


def electra_classifier(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.classifier(hidden)  # ElectraClassificationHead pools token 0 itself


def electra_adapter(**changes) -> ArchAdapter:
    """ELECTRA lays its encoder out as BERT does."""
    changes = {"model_types": ("electra",), "classifiers": {"ElectraForSequenceClassification": electra_classifier}, **changes}
    return dataclasses.replace(BERT, **changes)


def paper_macs(model, seq_len: float) -> float:
    """The OPTIN paper's count, written out: per head 3sd·dh + 2s²dh + s·dh·d, per neuron 2sd."""
    d, dh = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    heads, neurons = model.config.optin["heads_per_layer"], model.config.optin["neurons_per_layer"]
    per_head = 3 * seq_len * d * dh + 2 * seq_len**2 * dh + seq_len * dh * d
    return sum(h * per_head + n * 2 * seq_len * d for h, n in zip(heads, neurons))


def test_register_adapter_makes_a_new_model_type_prunable_end_to_end():
    model, data = electra(), calibration("bert")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, importance="magnitude", reconstruct="none"))
    with pytest.raises(ValueError, match=r"Unsupported model_type 'electra'.*register_adapter"):
        pruner.compute_masks(model, data)

    register_adapter(electra_adapter())
    masks = pruner.compute_masks(model, data)
    dense_macs = count_macs(model, pruner.seq_len)
    inputs = batch("bert")
    dense = output(model, inputs)
    with apply_masks(model, get_adapter(model), masks.head_mask.float(), masks.neuron_mask.float()):
        masked = output(model, inputs)
    assert (masked - dense).abs().max() > 1e-3  # the masks really change the model
    slim_model(model, masks)
    assert (output(model, inputs) - masked).abs().max() < 1e-4
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in electra().parameters())
    assert count_macs(model, pruner.seq_len) == pytest.approx(paper_macs(model, pruner.seq_len), rel=1e-12)
    assert count_macs(model, pruner.seq_len) == pytest.approx(0.6 * dense_macs, rel=0.02)


def test_registered_family_scores_the_same_in_the_fast_engine_as_the_reference():
    """The fast engine packs the examples and hands the task head each one's first
    `adapter.pooled_tokens` tokens; asking the adapter for more hands it more, same logits."""
    model, seen = electra(), []
    adapter = electra_adapter(
        pooled_tokens=3,
        classifiers={"ElectraForSequenceClassification": lambda m, h: seen.append(h.shape[1]) or electra_classifier(m, h)},
    )
    register_adapter(adapter)
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 5, 16, 4, 9, 18, 6, 11, 3, 15, 7]  # spread out, so packing beats length buckets
    examples = [{"input_ids": torch.randint(5, 120, (n,), generator=g)} for n in lengths]
    batches = prepare_calibration(examples, num_samples=len(lengths), batch_size=5, max_length=64)
    config = OptinConfig(md_tokens=40, batch_size=5)
    fast, reference = FastRunner(model, adapter, batches, config), ReferenceRunner(model, adapter, batches, config)
    assert all(first is not None for first in fast.first), "not packed"
    masks = candidate_masks([0, 3], 4, 1)
    got, want = torch.tensor(fast.run("head", 1, masks)), torch.tensor(reference.run("head", 1, masks))
    assert torch.allclose(got, want, rtol=1e-4, atol=0)
    assert seen and set(seen) == {3}


def test_duplicate_registration_needs_exist_ok():
    with pytest.raises(ValueError, match=r"'bert' already has an adapter; pass exist_ok=True"):
        register_adapter(dataclasses.replace(BERT, model_types=("bert", "electra")))
    assert "electra" not in optin_hf.arch.ADAPTERS  # refused whole, not half registered
    replacement = dataclasses.replace(BERT, num_prefix_tokens=0)
    register_adapter(replacement, exist_ok=True)
    assert get_adapter(tiny_model("bert")) is replacement
    with pytest.raises(TypeError, match="takes an ArchAdapter"):
        register_adapter("bert")


@pytest.mark.parametrize(("changes", "message"), [
    ({"feed_forward": None}, r"The bert adapter declares Capabilities\(fast_engine=True\) but gives no feed_forward"),
    ({"finish_feed_forward": None}, r"Capabilities\(repairs with 'weights'\) but gives no finish_feed_forward"),
    ({"capabilities": Capabilities(tokens=True)}, r"Capabilities\(tokens=True\) but gives no patch_embedding"),
    ({"capabilities": Capabilities(repairs=("weights",), readers=True)}, r"Capabilities\(readers=True\) but gives no refit_conv"),
    ({"attn_out": ""}, r"Capabilities\(heads=True, the default\) but gives no attn_out"),
    ({"capabilities": Capabilities(heads=False)},
     r"declares Capabilities\(heads=False\) but names attention modules \(attn_core, query, key, value, attn_out\)"),
])
def test_a_declared_capability_needs_the_fields_that_back_it(changes, message):
    """A declaration the adapter's fields cannot back is refused when the adapter is made, not mid-run."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BERT, **changes)


@pytest.mark.parametrize(("declared", "message"), [
    ({"repairs": ("bias",)}, r"names \['bias'\]: the repairs are \['weights', 'scales', 'batchnorm'\]"),
    ({"heads": False, "neurons": False}, "leaves nothing to prune"),
    ({"readers": True}, r"Capabilities\(readers=True\) refits convs within the weights refit"),
])
def test_a_capability_declaration_names_only_known_features(declared, message):
    with pytest.raises(ValueError, match=message):
        Capabilities(**declared)


@dataclasses.dataclass(frozen=True)
class FlatHeads(ArchAdapter):
    """A family whose heads cost 7 MACs per token (say, a linear attention)."""

    def head_macs(self, seq_len: float, config, layer: int = 0) -> float:
        return 7.0 * seq_len


def test_count_macs_uses_the_adapters_mac_formula():
    model = tiny_model("bert")
    slim_model(model, OptinPruner(OptinConfig(importance="random", seq_len=10)).compute_masks(model, calibration("bert")))
    paper = count_macs(model, 10)
    assert paper == pytest.approx(paper_macs(model, 10), rel=1e-12)
    register_adapter(FlatHeads(**vars(BERT)), exist_ok=True)
    heads, neurons = model.config.optin["heads_per_layer"], model.config.optin["neurons_per_layer"]
    assert count_macs(model, 10) == sum(h * 70.0 + n * 2 * 10 * 32 for h, n in zip(heads, neurons)) != paper


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_a_vit_with_rectangular_images_and_patches_is_counted_and_pruned(name):
    """image_size and patch_size may be (height, width) pairs, as transformers allows: the token count and
    the patch embedding's MACs follow both sides (an int-only formula raised a TypeError)."""
    config_class, model_class = (ViTConfig, ViTForImageClassification) if name == "vit" else (DeiTConfig, DeiTForImageClassification)
    torch.manual_seed(0)
    model = model_class(config_class(**{**BLOCK, "image_size": (32, 16), "patch_size": (8, 4), "num_labels": 3})).eval()
    model.config._attn_implementation = "eager"
    assert get_adapter(model).default_seq_len(model.config) == 4 * 4 + get_adapter(model).num_prefix_tokens
    pixels = torch.randn(1, 3, 32, 16)
    dense = count_macs(model)
    assert dense == flop_macs(model.base_model, pixels)
    OptinPruner(OptinConfig(importance="magnitude", reconstruct="none")).prune_model(model, [{"pixel_values": pixels[0]}])
    assert count_macs(model) == flop_macs(model.base_model, pixels) <= 0.6 * dense


@pytest.mark.parametrize("side", ["out", "in"])
def test_select_features_cuts_conv1d_as_the_transposed_linear(side):
    """A transformers Conv1D stores the weight as [in, out]; a slice names features, not a weight dim."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    conv = Conv1D(5, 6)
    conv.weight.data, conv.bias.data = linear.weight.detach().T.clone(), linear.bias.detach().clone()
    keep = torch.tensor([0, 3, 4])
    small_linear, small_conv = select_features(linear, keep, side), select_features(conv, keep, side)
    assert isinstance(small_conv, Conv1D) and num_features(small_conv, side) == num_features(small_linear, side) == 3
    x = torch.randn(2, 3 if side == "in" else 6)
    assert torch.allclose(small_conv(x), small_linear(x), atol=1e-6)
    if side == "out":
        assert torch.allclose(small_linear(x), linear(x)[:, keep], atol=1e-6)
    with pytest.raises(TypeError, match="not LayerNorm.*slim_heads"):
        select_features(nn.LayerNorm(6), keep, side)
